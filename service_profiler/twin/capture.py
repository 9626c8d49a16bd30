"""Read what the twin needs from the output directory of `service-profiler analyze`.

- request.csv: per request its arrivals (HTTP `arrival_ns`, engine `engine_arrival_ns`), prompt and output
  lengths, first token and completion times (the captured run's truth to compare against).
- batch.csv + per_iteration_requests.csv: every engine step's start, its duration and its composition
  (which requests, how many tokens each, and the context each attended): the measured step times and the
  step-time model's training data.
- profiler.db `event` rows `Request/twinRequest` and `Request/twinConfig` (written by the twin capture
  handler): prompt block hashes, sampling limits, priority, and the scheduler settings of the run.
  A run without them still replays, with what is missing said in `notes`.
"""

from __future__ import annotations

import bisect
import csv
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .shapes import ShapeCache
from .trace import TraceRequest


class CaptureError(ValueError):
    """An analysis directory the twin cannot use; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class StepRecord:
    """One engine step of the captured run."""

    batch_id: int
    start_ns: int
    busy_ns: int  # schedule start -> update end
    cycle_ns: int  # schedule start -> next schedule start (== busy_ns for the last step)
    followed_by_work: bool  # the next step started without waiting for an arrival
    composition: tuple[tuple[str, int], ...]  # (rid, scheduled tokens), in the scheduler's order
    prefill_tokens: int
    decode_tokens: int
    num_prefill_reqs: int
    num_decode_reqs: int
    prefill_context: int  # sum over prefill chunks of chunk * (tokens before + chunk / 2)
    decode_context: int  # sum over decode requests of the tokens attended
    num_preempted: int
    new_shape: bool = False  # its token count missed the engine's kernel cache (see shapes.py)


@dataclass
class CapturedRun:
    """A captured run: its workload, its steps and its settings."""

    path: Path
    requests: list[TraceRequest]
    truth: list[dict[str, str]]  # request.csv rows of complete requests
    steps: list[StepRecord]
    settings: dict[str, Any]
    origin_ns: int  # the first HTTP arrival: time 0 of the trace
    notes: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int | None:
        """KV blocks of the run's pool (with vLLM's null block), from the capture or the KV records."""
        value = self.settings.get("pool_blocks")
        return int(value) if value else None


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise CaptureError(f"{path}: missing; the twin needs the output directory of `service-profiler analyze` "
                           "run on a vLLM capture (request.csv, batch.csv, per_iteration_requests.csv)")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CaptureError(f"{path}: missing column(s) {', '.join(missing)}; re-run `service-profiler analyze` "
                               "with this version")
        return list(reader)


def _int(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)  # epoch nanoseconds exceed a float's 53 bits: parse integers as integers
    except ValueError:
        pass
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return None


def _twin_events(db: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    if not db.is_file():
        return {}, None
    facts: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] | None = None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT name, attrs FROM event WHERE domain = 'Request' AND name IN "
                           "('twinRequest', 'twinConfig') ORDER BY ts_ns, id").fetchall()
    except sqlite3.Error:
        rows = []
    finally:
        con.close()
    for name, attrs in rows:
        try:
            doc = json.loads(attrs)
        except (TypeError, ValueError):
            continue
        if name == "twinConfig":
            settings = settings or doc
        elif isinstance(doc, dict) and isinstance(doc.get("rid"), str):
            facts.setdefault(doc["rid"], doc)
    return facts, settings


def read_run(path: str | Path) -> CapturedRun:
    """Load an analyzed run; raises CaptureError naming the missing file or column."""
    root = Path(path)
    if not root.is_dir():
        raise CaptureError(f"{root}: not a directory; pass the --output-path of `service-profiler analyze`")
    req_rows = _read_csv(root / "request.csv", ("rid", "arrival_ns", "engine_arrival_ns", "input_tokens",
                                                "output_tokens", "first_token_ns", "completion_ns"))
    batch_rows = _read_csv(root / "batch.csv", ("batch_id", "start_ns", "update_end_ns", "num_preempted"))
    iter_rows = _read_csv(root / "per_iteration_requests.csv", ("batch_id", "rid", "phase", "scheduled_tokens",
                                                                "computed_tokens_before", "prompt_tokens"))
    notes: list[str] = []
    facts, settings = _twin_events(root / "profiler.db")
    if settings is None:
        notes.append("no twinConfig record (capture without the twin handler): scheduler settings come from the "
                     "engine args and vLLM's defaults, KV blocks from the KV records")
        settings = {}
    processes = {r.get("process") for r in batch_rows if r.get("process")}
    if len(processes) > 1:
        raise CaptureError(f"{root}: the run has {len(processes)} engine processes (data parallel); the twin "
                           "replays one engine: analyze one rank's files")
    steps = _steps(batch_rows, iter_rows, req_rows)
    if not steps:
        raise CaptureError(f"{root / 'batch.csv'}: no engine steps; the capture must include the BatchSchedule "
                           "domain (Scheduler.schedule / update_from_output)")
    if "pool_blocks" not in settings:
        totals = [_int(r.get("kv_total_blocks") or r.get("total_blocks")) for r in batch_rows]
        known = [t for t in totals if t]
        if known:
            settings["pool_blocks"] = max(known) + 1  # + vLLM's null block
    requests, truth, origin = _requests(req_rows, facts, batch_rows, iter_rows, notes, root, steps)
    return CapturedRun(root, requests, truth, steps, settings, origin, notes)


def _steps(batch_rows: list[dict[str, str]], iter_rows: list[dict[str, str]],
           req_rows: list[dict[str, str]]) -> list[StepRecord]:
    by_batch: dict[int, list[dict[str, str]]] = {}
    for row in iter_rows:
        batch_id = _int(row["batch_id"])
        if batch_id is not None:
            by_batch.setdefault(batch_id, []).append(row)
    arrival = {r["rid"]: _int(r["engine_arrival_ns"]) or 0 for r in req_rows}
    ordered = sorted((r for r in batch_rows if _int(r["start_ns"]) is not None), key=lambda r: int(r["start_ns"]))
    steps = []
    shapes = ShapeCache()
    for i, row in enumerate(ordered):
        batch_id = int(row["batch_id"])
        start = int(row["start_ns"])
        end = _int(row["update_end_ns"]) or _int(row.get("end_ns")) or start
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        members = by_batch.get(batch_id, [])
        followed = False
        cycle = end - start
        if nxt is not None:
            cycle = int(nxt["start_ns"]) - start
            next_members = by_batch.get(int(nxt["batch_id"]), [])
            followed = not next_members or any(arrival.get(m["rid"], 0) <= end for m in next_members)
        pre_t = dec_t = pre_n = dec_n = pre_ctx = dec_ctx = 0
        comp = []
        for m in members:
            tokens = _int(m["scheduled_tokens"]) or 0
            if tokens <= 0:
                continue  # listed in the step (preempted in it) but given no tokens
            before = _int(m["computed_tokens_before"]) or 0
            comp.append((m["rid"], tokens))
            if m["phase"] == "prefill":
                pre_t += tokens
                pre_n += 1
                pre_ctx += tokens * (before + tokens // 2)
            else:
                dec_t += tokens
                dec_n += 1
                dec_ctx += before + tokens
        new_shape = shapes.miss(pre_t + dec_t) if pre_t + dec_t > 0 else False
        steps.append(StepRecord(batch_id, start, max(end - start, 0), max(cycle, 0), followed, tuple(comp),
                                pre_t, dec_t, pre_n, dec_n, pre_ctx, dec_ctx, _int(row["num_preempted"]) or 0,
                                new_shape))
    return steps


def _step_overlap_ns(steps: list[StepRecord], starts: list[int], lo: int, hi: int) -> int:
    """How long engine steps (schedule start -> update end) ran within [lo, hi]."""
    total = 0
    for step in steps[max(bisect.bisect_right(starts, lo) - 1, 0):bisect.bisect_left(starts, hi)]:
        total += max(min(step.start_ns + step.busy_ns, hi) - max(step.start_ns, lo), 0)
    return total


def _requests(req_rows: list[dict[str, str]], facts: dict[str, dict[str, Any]], batch_rows: list[dict[str, str]],
              iter_rows: list[dict[str, str]], notes: list[str], root: Path, steps: list[StepRecord]
              ) -> tuple[list[TraceRequest], list[dict[str, str]], int]:
    usable = [r for r in req_rows if _int(r["engine_arrival_ns"]) and (_int(r["input_tokens"]) or 0) > 0]
    if not usable:
        raise CaptureError(f"{root / 'request.csv'}: no request with an engine arrival and a prompt length; the "
                           "capture must include the Request domain")
    complete = [r for r in usable if r.get("complete", "1") != "0" and _int(r["completion_ns"])]
    if len(complete) < len(usable):
        notes.append(f"{len(usable) - len(complete)} request(s) only partly observed: replayed with the tokens seen, "
                     "left out of the captured-run metrics")
    update_end = {int(r["batch_id"]): _int(r["update_end_ns"]) for r in batch_rows if _int(r["batch_id"]) is not None}
    first_token_engine: dict[str, int] = {}
    for row in iter_rows:
        rid = row["rid"]
        if rid in first_token_engine or row["phase"] != "prefill":
            continue
        done = (_int(row["computed_tokens_before"]) or 0) + (_int(row["scheduled_tokens"]) or 0)
        batch_id = _int(row["batch_id"])
        end = update_end.get(batch_id) if batch_id is not None else None  # batch 0 is a batch too
        if done >= (_int(row["prompt_tokens"]) or 0) and end:
            first_token_engine[rid] = end
    arrivals = {r["rid"]: _int(r["arrival_ns"]) or _int(r["engine_arrival_ns"]) or 0 for r in usable}
    origin = min(arrivals.values())
    have_api = any(r.get("timing_source") == "api" for r in usable)
    if not have_api:
        notes.append("no API-server timings in request.csv: front-end delays are taken as zero")
    no_hashes = 0
    out: list[TraceRequest] = []
    starts = [s.start_ns for s in steps]
    for r in usable:
        rid = r["rid"]
        fact = facts.get(rid, {})
        engine_arrival = _int(r["engine_arrival_ns"]) or 0
        api = r.get("timing_source") == "api"
        engine_delay = 0.0
        if api:
            # The engine takes new requests between steps: the time a step ran after the hand-off (the
            # API server done with the request) is a wait for the engine, which the replay's own steps
            # make again, not a front-end cost.
            handoff = max(_int(r.get("handoff_ns")) or arrivals[rid], arrivals[rid])
            waited = _step_overlap_ns(steps, starts, handoff, engine_arrival)
            engine_delay = max(engine_arrival - arrivals[rid] - waited, 0) / 1e6
        reply_delay = None
        first_api = _int(r["first_token_ns"])
        if api and first_api and rid in first_token_engine:
            reply_delay = max(first_api - first_token_engine[rid], 0) / 1e6
        hashes = fact.get("block_hashes")
        if not isinstance(hashes, list):
            no_hashes += 1
            hashes = None
        out.append(TraceRequest(
            rid=rid, arrival_s=(arrivals[rid] - origin) / 1e9, prompt_tokens=int(r["input_tokens"]),
            output_tokens=max(_int(r["output_tokens"]) or 1, 1), max_tokens=fact.get("max_tokens"),
            min_tokens=fact.get("min_tokens"), priority=int(fact.get("priority") or 0),
            hash_block=fact.get("hash_block") if hashes is not None else None,
            block_hashes=tuple(hashes) if hashes is not None else None,
            engine_delay_ms=engine_delay, reply_delay_ms=reply_delay))
    if no_hashes:
        notes.append(f"{no_hashes} request(s) without prompt block hashes (capture without the twin handler): "
                     "their prompts share no prefix in the replay")
    out.sort(key=lambda t: (t.arrival_s, t.rid))
    return out, complete, origin
