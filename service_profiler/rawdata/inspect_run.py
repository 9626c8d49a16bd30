"""`service-profiler inspect <run dir>`: what a run holds, before analysing it.

Processes (host, pid, role, engine, dp_rank, time span, records), record counts per kind/domain/name,
patch reports (applied / awaiting import / skipped / failed with reasons), records dropped by the
bounded buffer, warnings the processes counted, collection on/off switches, and the reader's problems (torn or
corrupt lines, files without header). `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from service_profiler.rawdata.rawfile import RunData, read_run

EXIT_OK, EXIT_NO_DATA = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="+", type=Path,
                        help="run directory, directory of runs, or raw files (*.sprof.jsonl)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _utc(ns: int | None) -> str:
    if ns is None:
        return "-"
    try:
        return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):  # outside the calendar: shown as it is
        return f"{ns} ns"


def describe_run(run: RunData) -> dict[str, Any]:
    """Everything `inspect` reports, as plain JSON-ready data."""
    per_proc: Counter[int] = Counter()
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    kinds: Counter[tuple[str, str, str]] = Counter()

    def seen(kind: str, proc: int, domain: str, name: str, ts: int, end: int) -> None:
        kinds[(kind, domain, name)] += 1
        per_proc[proc] += 1
        if proc not in first or ts < first[proc]:
            first[proc] = ts
        if proc not in last or end > last[proc]:
            last[proc] = end

    for s in run.spans:
        seen("span", s.proc, s.domain, s.name, s.start_ns, s.end_ns)
    for e in run.events:
        seen("event", e.proc, e.domain, e.name, e.ts_ns, e.ts_ns)
    for c in run.counters:
        seen("counter", c.proc, c.domain, c.name, c.ts_ns, c.ts_ns)
    processes = []
    for p in run.processes:
        patch = p.patch or {}
        processes.append({
            "index": p.index, "key": p.key, "hostname": p.hostname, "pid": p.pid, "ppid": p.ppid,
            "role": p.role, "engine": p.engine, "dp_rank": p.meta.get("dp_rank"),
            "profiler_version": p.profiler_version, "path": p.path, "records": per_proc.get(p.index, 0),
            "first_utc": _utc(first.get(p.index)), "last_utc": _utc(last.get(p.index)),
            "duration_s": (last[p.index] - first[p.index]) / 1e9 if p.index in first else None,
            "wall_offset_ns": p.wall_offset_ns, "meta": p.meta, "dropped": p.dropped,
            "warnings": p.warnings, "channels": len(p.channels),
            "completeness": p.loss.status, "close_reason": p.loss.close_reason or None,
            "flushed_until_utc": _utc(p.loss.flushed_until_ns),
            "gaps": [{**g.as_dict(), "start_utc": _utc(g.start_ns),
                      "end_utc": "end of run" if g.as_dict()["end_ns"] is None else _utc(g.end_ns)}
                     for g in p.loss.all_gaps()],
            "patch": None if p.patch is None else {
                "applied": list(patch.get("applied") or []),
                "pending": list(patch.get("pending") or []),
                "skipped": list(patch.get("skipped") or []),
                "failed": list(patch.get("failed") or []),
            },
        })
    return {
        "processes": processes,
        "records": [{"kind": k, "domain": d, "name": n, "count": c} for (k, d, n), c in sorted(kinds.items())],
        "total_records": run.num_records,
        "dropped": sum(p.dropped for p in run.processes),
        "states": [{"process": run.processes[proc].key, "utc": _utc(ts), "enabled": on, "reason": why}
                   for proc, ts, on, why in run.states],
        "problems": list(run.problems),
    }


def _reason(item: Any) -> tuple[str, str]:
    if isinstance(item, dict):
        return str(item.get("symbol", "?")), str(item.get("reason", ""))
    return str(item), ""


def format_report(info: dict[str, Any]) -> str:
    out: list[str] = []
    procs = info["processes"]
    out.append(f"processes ({len(procs)}):")
    out.append(f"  {'#':>2}  {'host:pid':<28} {'role':<14} {'engine':<16} {'dp':>3} {'records':>10} "
               f"{'dropped':>8}  {'first (UTC)':<29} duration")
    for p in procs:
        engine = p["engine"] or {}
        eng = f"{engine.get('name', '')} {engine.get('version', '')}".strip() or "-"
        dur = f"{p['duration_s']:.1f} s" if p["duration_s"] is not None else "-"
        dp = "-" if p["dp_rank"] is None else str(p["dp_rank"])
        out.append(f"  {p['index']:>2}  {p['key']:<28} {p['role'] or '-':<14} {eng:<16} {dp:>3} "
                   f"{p['records']:>10,} {p['dropped']:>8,}  {p['first_utc']:<29} {dur}")
    out.append(f"\nrecords ({info['total_records']:,}):")
    out.append(f"  {'kind':<8} {'domain':<16} {'name':<28} {'count':>10}")
    for r in info["records"]:
        out.append(f"  {r['kind']:<8} {r['domain']:<16} {r['name']:<28} {r['count']:>10,}")
    out.append("\npatches:")
    for p in procs:
        patch = p["patch"]
        if patch is None:
            out.append(f"  {p['key']}: no patch report")
            continue
        out.append(f"  {p['key']}: applied {len(patch['applied'])}, awaiting import {len(patch['pending'])}, "
                   f"skipped {len(patch['skipped'])}, failed {len(patch['failed'])}")
        for sym in patch["applied"]:
            out.append(f"    applied  {_reason(sym)[0]}")
        for sym in patch["pending"]:
            out.append(f"    pending  {_reason(sym)[0]}: awaiting import of its module")
        for status in ("skipped", "failed"):
            for item in patch[status]:
                sym, why = _reason(item)
                out.append(f"    {status:<8} {sym}: {why}")
    if info["dropped"]:
        out.append(f"\nDROPPED: {info['dropped']:,} records were lost to the bounded buffer "
                   "(raise max_buffered_records or lower the flush interval)")
        for p in procs:
            if p["dropped"]:
                out.append(f"  {p['key']}: {p['dropped']:,}")
    else:
        out.append("\ndropped: none")
    # handlers report their own failures as process metadata (e.g. vllm_handler_failures: {handler: count})
    warnings = [(p["key"], f"{k}: {v}") for p in procs for k, v in p["meta"].items() if k.endswith("_failures") and v]
    warnings += [(p["key"], w) for p in procs for w in p["warnings"]]
    out.append(f"\nwarnings ({len(warnings)}):" if warnings else "\nwarnings: none")
    out.extend(f"  {key}: {w}" for key, w in warnings)
    out.extend(completeness_lines(procs))
    switches = [s for s in info["states"] if s["reason"] != "startup"]
    if switches:
        out.append(f"\ncollection switched ({len(switches)}):")
        out.extend(f"  {s['utc']} {s['process']}: {'on' if s['enabled'] else 'off'} ({s['reason']})"
                   for s in switches)
    problems = info["problems"]
    out.append(f"\nproblems ({len(problems)}):" if problems else "\nproblems: none")
    out.extend(f"  {p}" for p in problems)
    return "\n".join(out)


def completeness_lines(procs: list[dict[str, Any]]) -> list[str]:
    """Per process: closed cleanly or not, and the time ranges whose records are missing or uncertain."""
    out = ["\ncompleteness:"]
    unknown = [p["key"] for p in procs if p["completeness"] == "unknown"]
    for p in procs:
        if p["completeness"] == "unknown" and not p["gaps"]:
            continue
        state = {"closed": f"closed cleanly ({p['close_reason'] or 'no reason given'})",
                 "not closed": f"NOT CLOSED: no final flush; complete up to {p['flushed_until_utc']}",
                 "unknown": "unknown"}[p["completeness"]]
        out.append(f"  {p['key']}: {state}")
        for g in p["gaps"]:
            count = f"{g['count']:,} records, " if g["count"] is not None else ""
            out.append(f"    missing or uncertain {g['start_utc']} .. {g['end_utc']} ({count}{g['reason']})")
    if unknown:
        out.append(f"  {len(unknown)} file(s) without completeness markers (written by an older profiler): "
                   "whether they closed cleanly is unknown")
    return out


def run(args: argparse.Namespace) -> int:
    data = read_run(args.path)
    info = describe_run(data)
    # text from the raw files may hold what the console cannot encode (a lone surrogate): escape it
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print(format_report(info))
    if not data.processes:
        print("error: no readable raw files (*.sprof.jsonl) in " + " ".join(map(str, args.path)), file=sys.stderr)
        return EXIT_NO_DATA
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service-profiler inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
