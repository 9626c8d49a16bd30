"""The reader's per-record loop (rawdata/rawentries.py) and its C version (rawdata/_records.c).

Every test that reads runs against both the C loop and the pure-Python one (`impl`), and the fuzz test
reads the same random files (valid and malformed records, malformed per-request entries) with both,
whole and streamed, and requires identical records and problem reports. Outside CI the C runs skip
when the extension was not built in place; in CI `test_c_extension_is_built` fails instead.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from synthetic import SyntheticConfig, generate_run

from service_profiler.analyze.command import main as analyze_main
from service_profiler.rawdata import rawentries, rawfile
from service_profiler.rawdata.rawfile import RECORD_CLASSES, CounterRecord, EventRecord, RunData, SpanRecord, read_run

IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}
BUILD_HINT = "C extension not built: run `.venv/bin/python setup.py build_ext --inplace`"

HEADER = {"t": "header", "format": 1, "hostname": "h", "pid": 7, "ppid": 1, "role": "engine_core",
          "clock": {"wall_ns": 1_000_000, "mono_ns": 0}}
CHANNELS = [
    {"t": "chan", "id": 1, "kind": "span", "domain": "BatchSchedule", "name": "batchFrameworkProcessing"},
    {"t": "chan", "id": 2, "kind": "event", "domain": "Request", "name": "tokens"},
    {"t": "chan", "id": 3, "kind": "event", "domain": "Request", "name": "enqueue"},
    {"t": "chan", "id": 4, "kind": "counter", "domain": "KVCache", "name": "kvcache"},
    {"t": "chan", "id": 5, "kind": "span", "domain": "ModelExecute", "name": "modelExec"},
]


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The reader's loop for this test: the C extension's or the pure-Python one."""
    if request.param == "c":
        if not rawentries.HAVE_C_RECORDS:
            pytest.skip(BUILD_HINT)
        monkeypatch.setattr(rawfile, "add_records", rawentries._c_add_records)
    else:
        monkeypatch.setattr(rawfile, "add_records", rawentries.add_records_py)
    return str(request.param)


def test_c_extension_is_built() -> None:
    if not rawentries.HAVE_C_RECORDS and not IN_CI:
        pytest.skip(BUILD_HINT)
    assert rawentries.HAVE_C_RECORDS, "CI must build service_profiler.rawdata._records (gcc is present there)"
    assert rawentries.add_records is rawentries._c_add_records


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


def _read_streamed(run_dir: Path) -> tuple[RunData, list[Any]]:
    """read_run as a stream; every record the drains saw, in reading order."""
    seen: list[Any] = []

    def drain(run: RunData) -> None:
        seen.extend(run.spans + run.events + run.counters)
        run.spans.clear()
        run.events.clear()
        run.counters.clear()

    return read_run([run_dir], drain), seen


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


def test_malformed_entries_are_dropped_counted_and_reported(tmp_path: Path, impl: str) -> None:
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

    # A stream reports the same; a `reqs` whose entries are all good is left as it was read.
    streamed, seen = _read_streamed(tmp_path / "run")
    assert streamed.problems == run.problems
    by_ts = {r[3] - 1_000_000: r for r in seen}
    assert by_ts[10].attrs["reqs"] == [tuple(e) for e in GOOD_BATCH]
    assert by_ts[50].attrs["reqs"] == []


def test_ids_are_interned_and_token_counts_shared_on_a_whole_read(tmp_path: Path, impl: str) -> None:
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


def test_a_bad_record_after_cleaned_entries_counts_each_entry_once(tmp_path: Path, impl: str) -> None:
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


def _fuzz_value(rng: random.Random) -> Any:
    return rng.choice([None, True, False, 0, 1, -3, 2**40, 1.5, "", "x", [], {}, [1], {"a": 1}])


def _fuzz_entry(rng: random.Random, batch: bool) -> Any:
    if batch:
        entry: list[Any] = [rng.choice(["ra", "rb", "rc", 4]), rng.choice([0, 1]), rng.randint(1, 90),
                            rng.randint(0, 2000), rng.randint(1, 2000), rng.choice([0, 1])]
    else:
        entry = [rng.choice(["ra", "rb", 4]), rng.randint(0, 3), rng.choice([0, 1]), rng.choice([None, "stop"])]
    entry = entry[:rng.randint(3, len(entry))]
    if rng.random() < 0.15:
        entry[rng.randrange(len(entry))] = _fuzz_value(rng)
    if rng.random() < 0.03:
        return rng.choice([entry[:2], {"e": entry}, "e", 3])
    return entry


def _fuzz_record(rng: random.Random, ts: int) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        reqs: Any = [_fuzz_entry(rng, True) for _ in range(rng.randint(0, 6))]
        rec: list[Any] = _batch(ts, reqs if rng.random() > 0.05 else _fuzz_value(rng))
    elif kind == 1:
        rec = _tokens(ts, [_fuzz_entry(rng, False) for _ in range(rng.randint(0, 4))])
    elif kind == 2:
        rec = [3, ts, 1, {"rid": rng.choice(["ra", "rb", 5, None])}]
    elif kind == 3:
        rec = [4, ts, {"used_blocks": rng.randint(0, 9)}]
    elif kind == 4:
        rec = [5, ts, ts + 3, 1, rng.choice([None, {"batch_id": ts}])]
    else:
        rec = [rng.choice([1, 2, 3, 4, 5]), ts, ts + 1, 1, None]  # right or wrong length for its channel
    if rng.random() < 0.05:  # a malformed record: its line goes to the slow path
        rec = rng.choice([[rec[0], float(ts), *rec[2:]], [rec[0], True, *rec[2:]], rec[:2], [99, ts, 1, None],
                          "rec", [], [[1]], {"r": 1}, [rec[0], 2**63, *rec[2:]], [rec[0], -1, *rec[2:]],
                          [5, ts + 9, ts, 1, None], [5, ts, ts + 1, 2**64, None], [3, ts, -2**64, None],
                          [[rec[0]], ts, 1, None]])
    return rec


def _fuzz_lines(seed: int) -> list[Any]:
    rng = random.Random(seed)
    lines: list[Any] = []
    ts = 100
    for _ in range(60):
        recs = []
        for _ in range(rng.randint(1, 8)):
            ts += rng.randint(0, 3)
            recs.append(_fuzz_record(rng, ts))
        lines.append(_rec(*recs))
    return lines


def _snapshot(records: list[Any]) -> list[tuple[str, Any]]:
    """Records with their exact classes (tuples and lists compare equal, but are not the same shape)."""
    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return (type(value).__name__, [shape(v) for v in value])
        return (type(value).__name__, value)

    return [(type(r).__name__, shape(tuple(r))) for r in records]


@pytest.mark.skipif(not rawentries.HAVE_C_RECORDS and not IN_CI, reason=BUILD_HINT)
@pytest.mark.parametrize("seed", range(12))
def test_c_and_python_loops_read_the_same(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_run(tmp_path / "run", _fuzz_lines(seed))
    results = {}
    for name, loop in (("c", rawentries._c_add_records), ("python", rawentries.add_records_py)):
        monkeypatch.setattr(rawfile, "add_records", loop)
        whole = read_run([tmp_path / "run"])
        streamed, seen = _read_streamed(tmp_path / "run")
        results[name] = (_snapshot(whole.spans + whole.events + whole.counters), whole.problems,
                         _snapshot(seen), streamed.problems)
    assert results["c"] == results["python"]
    snapshot, problems = results["c"][0], results["c"][1]
    assert snapshot and any("malformed per-request entries" in p for p in problems), "the fuzz must exercise both"


@pytest.mark.skipif(not rawentries.HAVE_C_RECORDS, reason=BUILD_HINT)
def test_c_loop_builds_records_and_keeps_references_balanced() -> None:
    add = rawentries._c_add_records
    assert add is not None
    domain, name, rid = "BatchSchedule", "batchFrameworkProcessing", "leak-check-rid"
    chans = {1: (0, domain, name, rawentries.BATCH_REQS), 2: (1, "Request", "x", rawentries.RID),
             3: (2, "KVCache", "kv", rawentries.NO_IDS)}
    before = (sys.getrefcount(domain), sys.getrefcount(name))
    for _ in range(200):
        lists: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        dropped = [0]
        line = [[1, 5, 9, 3, {"reqs": [[rid, 1, 1, 500, 600], ["bad"]]}], [2, 7, 3, {"rid": rid}],
                [3, 8, {"used": 1}]]
        add(line, chans, 10, 0, *lists, RECORD_CLASSES, {}, dropped)
        span, event, counter = lists[0][0], lists[1][0], lists[2][0]
        assert type(span) is SpanRecord and type(event) is EventRecord and type(counter) is CounterRecord
        assert span == SpanRecord(0, domain, name, 15, 19, 3, {"reqs": [(rid, 1, 1, 500, 600)]})
        assert span.start_ns == 15 and event.ts_ns == 17 and counter.values == {"used": 1}
        assert hash(counter[:4]) == hash((0, "KVCache", "kv", 18)) and dropped == [1]
        del lists, span, event, counter, line
    assert (sys.getrefcount(domain), sys.getrefcount(name)) == before


@pytest.mark.skipif(not rawentries.HAVE_C_RECORDS, reason=BUILD_HINT)
@pytest.mark.parametrize("bad", [
    [[1, 5.0, 9, 3, None]], [[1, True, 9, 3, None]], [[1, 5, 9, 3]], [[2, 5, 3, []]], [[3, 5, None]],
    [[1, 5, 9, "tid", None]], ["rec"], [[]],
    # out of range (timestamps in [0, 2^62), tids int64) or a span ending before it starts
    [[1, 2**62, 2**62 + 1, 3, None]], [[1, -1, 9, 3, None]], [[1, 9, 5, 3, None]], [[1, 5, 9, 2**63, None]],
    [[2, 2**70, 3, None]], [[2, 5, -2**63 - 1, None]], [[3, 2**64, {}]],
])
def test_c_loop_rejects_what_the_slow_path_rejects(bad: list[Any]) -> None:
    add = rawentries._c_add_records
    assert add is not None
    chans = {1: (0, "D", "s", 0), 2: (1, "D", "e", 0), 3: (2, "D", "c", 0)}
    code = {1: 0, 2: 1, 3: 2}.get(bad[0][0] if isinstance(bad[0], list) and bad[0] else 0, 0)
    assert not (isinstance(bad[0], list) and bad[0] and rawentries.valid_record(code, bad[0]))
    with pytest.raises((ValueError, TypeError)):
        add(bad, chans, 0, 0, [], [], [], RECORD_CLASSES, None, [0])
    with pytest.raises(KeyError):
        add([[9, 1, 1, None]], chans, 0, 0, [], [], [], RECORD_CLASSES, None, [0])
    with pytest.raises(TypeError):
        add([], chans, 0, 0, [], [], [], (tuple, tuple), None, [0])  # wrong classes: no crash
    with pytest.raises(TypeError):
        add([])  # type: ignore[call-arg]


def test_analyze_goes_on_past_malformed_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert analyze_main(["--input-path", str(run.run_dir), "--output-path", str(tmp_path / "out"), "--quiet"]) == 0
    problems = (tmp_path / "out" / "problems.txt").read_text()
    assert "1 malformed per-request entries" in problems
    assert (tmp_path / "out" / "batch.csv").exists() and (tmp_path / "out" / "profiler.db").exists()


def _odd_attrs_lines() -> list[Any]:
    """Records whose attrs take every branch of the raw rows: empty attrs, a non-scalar batch_id / rid,
    a batch span's entries (left out of its attrs text), a tokens event's entries (kept), and a value
    orjson cannot encode: an int above 64 bits, which the reader keeps as an int only on a line that
    needs the standard library's parser (a NaN), and which the standard library's encoder then writes."""
    return [
        _rec([1, 10, 15, 1, {"batch_id": 3, "reqs": [["r1", 1, 1, 5, 5, 0]], "running": 1}],
             [1, 11, 16, 1, {}], [1, 12, 17, 1, None], [5, 13, 18, 1, {"batch_id": [1, 2]}]),
        _rec(_tokens(20, [["r1", 1, 1, "stop"]]), [3, 21, 1, {"rid": {"odd": 1}, "batch_id": "b7"}],
             [3, 22, 1, {}], [3, 23, 1, None], [2, 24, 1, None]),
        '{"t":"rec","r":[[4,30,{"used_blocks":NaN,"x":1.5,"big":1180591620717411303424}],[4,31,{}]]}',
    ]


def _raw_tables(path: Path) -> dict[str, list[Any]]:
    import sqlite3

    con = sqlite3.connect(path)
    return {name: con.execute(f"SELECT * FROM {name} ORDER BY id").fetchall() for name in ("span", "event", "counter")}


@pytest.mark.skipif(not rawentries.HAVE_C_RECORDS and not IN_CI, reason=BUILD_HINT)
@pytest.mark.parametrize("seed", [*range(8), "odd"])
def test_c_and_python_raw_rows_write_the_same_tables(tmp_path: Path, seed: int | str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The database's raw tables are streamed from the files (write_raw_db) through the C rows
    # (_records.add_raw_rows) or the Python definition (build_raw_rows_py): the same tables either way,
    # and the same as the rows made from a whole read (write_raw_db_from).
    from service_profiler.analyze import sqlite_export
    from service_profiler.rawdata import rawfile as rawfile_module

    _write_run(tmp_path / "run", _odd_attrs_lines() if seed == "odd" else _fuzz_lines(int(seed)))
    monkeypatch.setattr(rawfile_module, "DRAIN_RECORDS", 5)
    assert (sqlite_export.build_raw_rows is not sqlite_export.build_raw_rows_py) == rawentries.HAVE_C_RECORDS
    tables = {}
    for name, build in (("c", sqlite_export.build_raw_rows), ("python", sqlite_export.build_raw_rows_py)):
        monkeypatch.setattr(sqlite_export, "build_raw_rows", build)
        tables[name] = _raw_tables(sqlite_export.write_raw_db([tmp_path / "run"], tmp_path / f"{name}.db"))
    whole = _raw_tables(sqlite_export.write_raw_db_from(read_run([tmp_path / "run"]), tmp_path / "whole.db"))
    assert tables["c"] == tables["python"] == whole
    assert tables["c"]["span"] and tables["c"]["event"] and tables["c"]["counter"]
    if seed == "odd":
        spans = {row[4] - 1_000_000: row for row in tables["c"]["span"]}
        assert json.loads(spans[10][9]) == {"batch_id": 3, "running": 1}  # the entries are batch_req's
        assert spans[11][8:] == (None, "{}") and spans[12][8:] == (None, None)
        assert spans[13][8:] == ("[1,2]", '{"batch_id":[1,2]}')
        events = {row[4] - 1_000_000: row for row in tables["c"]["event"]}
        assert json.loads(events[20][8]) == {"reqs": [["r1", 1, 1, "stop"]]}
        assert events[21][6:8] == ('{"odd":1}', "b7")
        assert [row[5] for row in tables["c"]["counter"]] == [
            '{"used_blocks":null,"x":1.5,"big":1180591620717411303424}', "{}"]
