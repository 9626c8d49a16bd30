"""The in-memory reader's per-record loop (rawdata/rawentries.py, behind `inspect` and the front doors'
files): malformed per-request entries are dropped, counted and reported; ids are shared; and `analyze`
(the DuckDB reader) goes on past the same malformed entries."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from synthetic import SyntheticConfig, generate_run

from service_profiler.rawdata.rawfile import read_run

HEADER = {"t": "header", "format": 1, "hostname": "h", "pid": 7, "ppid": 1, "role": "engine_core",
          "clock": {"wall_ns": 1_000_000, "mono_ns": 0}}
CHANNELS = [
    {"t": "chan", "id": 1, "kind": "span", "domain": "BatchSchedule", "name": "batchFrameworkProcessing"},
    {"t": "chan", "id": 2, "kind": "event", "domain": "Request", "name": "tokens"},
    {"t": "chan", "id": 3, "kind": "event", "domain": "Request", "name": "enqueue"},
    {"t": "chan", "id": 4, "kind": "counter", "domain": "KVCache", "name": "kvcache"},
    {"t": "chan", "id": 5, "kind": "span", "domain": "ModelExecute", "name": "modelExec"},
]


def _write_run(run_dir: Path, lines: list[Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "h-7.sprof.jsonl"
    with path.open("w") as fh:
        for obj in [HEADER, *CHANNELS, *lines]:
            fh.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    return path


def _rec(*records: Any) -> dict[str, Any]:
    return {"t": "rec", "r": list(records)}


def _batch(ts: int, reqs: Any) -> list[Any]:
    return [1, ts, ts + 5, 1, {"batch_id": ts, "reqs": reqs}]


def _tokens(ts: int, reqs: Any) -> list[Any]:
    return [2, ts, 1, {"reqs": reqs}]


GOOD_BATCH = [["r1", 0, 64, 0, 64, 0], ["r2", 1, 1, 300, 200], ["r3", True, 1, None, 1.5, None], [7, 1, 1]]
BAD_BATCH = [
    {"rid": "x"},  # an object, not an array
    ["r4", 1],  # too short
    [None, 1, 1],  # rid neither str nor int
    [True, 1, 1],  # a bool is not a rid
    ["r5", "1", 1],  # phase a string
    ["r6", 1, 1.0],  # scheduled tokens a float
    ["r7", 1, 1, [3]],  # computed tokens a list
    ["r8", 1, 1, 3, 3, {"resumed": 1}],  # resumed an object
    "r9",
    5,
]
GOOD_TOKENS = [["r1", 1, 0, None], ["r2", 3, 1, "stop"], ["r3", 1, True], [9, 0, None]]
BAD_TOKENS = [["r1", 1], ["r2", None, 0], ["r3", 1, "yes"], ["r4", 1, 1, 5], [["r5"], 1, 1]]


def test_malformed_entries_are_dropped_counted_and_reported(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "run", [
        _rec(_batch(10, GOOD_BATCH + BAD_BATCH), _tokens(20, BAD_TOKENS + GOOD_TOKENS)),
        _rec(_batch(30, "not a list"), _batch(40, None), _batch(50, []), _tokens(60, {"r1": 1})),
    ])
    run = read_run([tmp_path / "run"])
    batches = {s.start_ns - 1_000_000: s.attrs for s in run.spans}
    assert batches[10]["reqs"] == [tuple(e) for e in GOOD_BATCH]  # type: ignore[index]
    assert all(type(e) is tuple for e in batches[10]["reqs"])  # type: ignore[index]
    assert batches[30]["reqs"] == [] and batches[40]["reqs"] is None and batches[50]["reqs"] == []  # type: ignore[index]
    tokens = {e.ts_ns - 1_000_000: e.attrs for e in run.events}
    assert tokens[20]["reqs"] == [tuple(e) for e in GOOD_TOKENS]  # type: ignore[index]
    assert tokens[60]["reqs"] == []  # type: ignore[index]
    dropped = len(BAD_BATCH) + len(BAD_TOKENS) + 2  # each non-list `reqs` counts once
    assert run.problems == [f"{path}: {dropped} malformed per-request entries (`reqs` of batch or tokens records; "
                            "see docs/DESIGN.md for their shape); dropped"]


def test_ids_are_interned_and_token_counts_shared(tmp_path: Path) -> None:
    # json.dumps makes each occurrence a new string / int object once parsed
    _write_run(tmp_path / "run", [
        _rec(_batch(10, [["req-a", 1, 1, 1000, 700]]), [3, 11, 1, {"rid": "req-a"}]),
        _rec(_batch(20, [["req-a", 1, 1, 1001, 700]]), _tokens(21, [["req-a", 1, 0, None]])),
    ])
    run = read_run([tmp_path / "run"])
    first, second = (s.attrs["reqs"][0] for s in run.spans)  # type: ignore[index]
    token_entry = run.events[-1].attrs["reqs"][0]  # type: ignore[index]
    assert first[0] is second[0] is token_entry[0] is run.events[0].attrs["rid"] is sys.intern("req-a")  # type: ignore[index]
    assert first[4] is second[4]  # prompt tokens: one object per value


def test_a_bad_record_after_cleaned_entries_counts_each_entry_once(tmp_path: Path) -> None:
    # The fast path cleans the first record's entries, then meets a malformed record and gives the
    # line to the slow path, which sees the cleaned entries again.
    _write_run(tmp_path / "run", [_rec(_batch(10, [["r1", 1, 1], ["bad"]]), [5, 1.5, 2, 1, None],
                                       _batch(20, [["r2", 1, 1]]))])
    run = read_run([tmp_path / "run"])
    assert [s.attrs["reqs"] for s in run.spans] == [[("r1", 1, 1)], [("r2", 1, 1)]]  # type: ignore[index]
    found = sorted(p.split(": ", 1)[1] for p in run.problems)
    assert found[0] == ("1 malformed per-request entries (`reqs` of batch or tokens records; see docs/DESIGN.md for "
                        "their shape); dropped")
    assert found[1].startswith("1 malformed records (line 7; ") and found[1].endswith("; skipped")
    assert len(found) == 2


def test_analyze_goes_on_past_malformed_entries(tmp_path: Path) -> None:
    # Before the entries were checked, one object among a batch's entries crashed the batch table.
    run = generate_run(tmp_path / "run", SyntheticConfig(requests=6, output_tokens=4))
    engine = next(p for p in run.run_dir.glob("*.sprof.jsonl") if '"engine_core"' in p.read_text().splitlines()[0])
    lines = engine.read_text().splitlines()
    victim = next(i for i, line in enumerate(lines) if '"reqs":[[' in line and line.startswith('{"t":"rec"'))
    obj = json.loads(lines[victim])
    batch = next(r for r in obj["r"] if isinstance(r[-1], dict) and r[-1].get("reqs"))
    batch[-1]["reqs"].append({"rid": "odd"})
    lines[victim] = json.dumps(obj)
    engine.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "service_profiler.cli", "analyze", "--input-path", str(run.run_dir),
                           "--output-path", str(tmp_path / "out"), "--format", "csv", "db", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    problems = (tmp_path / "out" / "problems.txt").read_text()
    assert "1 malformed per-request entries" in problems
    assert (tmp_path / "out" / "batch.csv").exists() and (tmp_path / "out" / "profiler.db").exists()
    # the batch keeps its good entries and only them: every request still completes, no batch grows
    with (tmp_path / "out" / "request.csv").open() as fh:
        assert sum(1 for _ in fh) == 6 + 1
    with (tmp_path / "out" / "batch.csv").open() as fh:
        sizes = [int(row["total_batch_size"]) for row in csv.DictReader(fh)]
    assert sizes == [b.batch_size for b in run.batches]


_GOOD = {1: [1, 10, 15, 1, {"batch_id": 1, "reqs": []}], 3: [3, 10, 1, {"rid": "a"}], 4: [4, 10, {"u": 1}]}
_ODD_VALUES = [None, True, False, -1, 0, 2**62 - 1, 2**62, 2**63, -(2**63) - 1, 1.5, "7", [], {}, [1], {"a": 1}]


def test_the_reader_loop_accepts_exactly_what_valid_record_accepts() -> None:
    # add_records writes valid_record's checks out per kind: every field of each kind of record, set to
    # each odd value, and every length, is accepted by one exactly when it is by the other
    from service_profiler.rawdata import rawentries
    from service_profiler.rawdata.rawfile import RECORD_CLASSES

    chans = {1: (rawentries.SPAN, "BatchSchedule", "batchFrameworkProcessing", rawentries.BATCH_REQS),
             3: (rawentries.EVENT, "Request", "enqueue", rawentries.RID),
             4: (rawentries.COUNTER, "KVCache", "kvcache", rawentries.NO_IDS)}
    cases: list[list[Any]] = []
    for good in _GOOD.values():
        cases += [good, good[:-1], [*good, None]]
        cases += [[*good[:i], value, *good[i + 1:]] for i in range(1, len(good)) for value in _ODD_VALUES]
    cases.append([1, 20, 10, 1, None])  # ends before it starts
    accepted = 0
    for rec in cases:
        lists: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        try:
            rawentries.add_records([rec], chans, 0, 0, *lists, RECORD_CLASSES, {}, [0])
            ok = True
        except (ValueError, TypeError):
            ok = False
        assert ok == rawentries.valid_record(chans[rec[0]][0], rec), rec
        assert sum(map(len, lists)) == ok
        accepted += ok
    assert 10 < accepted < len(cases) - 50
