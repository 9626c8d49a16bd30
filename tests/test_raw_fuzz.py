"""Malformed raw input costs only itself: each known bad shape, and random / mutated lines, through
read_run, inspect and analyze: never a traceback, a problem naming file and line, and every valid
record still read and every output still written."""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar import command
from service_profiler.rawdata import inspect_run
from service_profiler.rawdata.rawfile import read_run

DEEP = '{"a":' * 5000 + "1" + "}" * 5000
PAST_RECURSION = "[" * 1500 + "]" * 1500  # within DuckDB's JSON reader's reach, past the standard library's
MID_DEEP = '{"a":' * 600 + "1" + "}" * 600  # past orjson's nesting limit, within the standard library's
# odd but readable: no problem to report (a lone surrogate is replaced by U+FFFD)
VALID_SHAPES = {"argv_text", "deep_engine", "attrs_600_deep", "lone_surrogate"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return generate_run(tmp_path_factory.mktemp("fuzz") / "run", SyntheticConfig(requests=12, output_tokens=4, seed=3))


def _api(synth: SyntheticRun) -> Path:
    return next(p for p in synth.files if "api" in p.read_text().split("\n", 1)[0])


# (name, what to do to the API server's file: a new header field, or lines appended)
HEADER_CASES: dict[str, dict[str, Any]] = {
    "pid_text": {"pid": "abc"}, "format_v2": {"format": "v2"}, "hostname_list": {"hostname": ["h"]},
    "clock_list": {"clock": [1, 2]}, "clock_huge": {"clock": {"wall_ns": 2**70, "mono_ns": 1}},
    "clock_strings": {"clock": {"wall_ns": "1", "mono_ns": None}}, "ppid_float": {"ppid": 1.5},
    "role_dict": {"role": {"a": 1}}, "argv_text": {"argv": "x"}, "deep_engine": {"engine": json.loads(MID_DEEP)},
}
LINE_CASES: dict[str, list[str]] = {
    "chan_id_list": ['{"t":"chan","id":[1],"kind":"event","domain":"X","name":"y"}',
                     '{"t":"rec","r":[[[1],10050288582,1,null]]}'],
    "chan_kind_list": ['{"t":"chan","id":50,"kind":["span"],"domain":"X","name":"y"}'],
    "attrs_5000_deep": ['{"t":"chan","id":77,"kind":"event","domain":"X","name":"deep"}',
                        '{"t":"rec","r":[[77,10050288582,1,' + DEEP + "]]}"],
    "attrs_1500_deep": ['{"t":"chan","id":79,"kind":"event","domain":"X","name":"deep"}',
                        '{"t":"rec","r":[[79,10050288582,1,{"a":' + PAST_RECURSION + "}]]}"],
    "attrs_600_deep": ['{"t":"chan","id":78,"kind":"event","domain":"X","name":"deep"}',
                       '{"t":"rec","r":[[78,10050288582,1,' + MID_DEEP + "]]}"],
    "patch_wrong_types": ['{"t":"patch","applied":5,"pending":"x","skipped":{"a":1},"failed":[[1,2],{"symbol":[1]}]}'],
    "lone_surrogate": ['{"t":"warn","msg":"bad \\ud800 text","count":2}',
                       '{"t":"meta","key":"k\\udfff","value":"\\ud800"}',
                       '{"t":"rec","r":[[1,10050288590,1,{"rid":"r\\ud800x","api_rid":"a"}]]}'],
    "ts_2_63": ['{"t":"rec","r":[[1,9223372036854775808,1,{"rid":"x"}],[1,18446744073709551616,1,null]]}'],
    "ts_negative": ['{"t":"rec","r":[[1,-5,1,{"rid":"x"}]]}'],
    "tid_2_64": ['{"t":"rec","r":[[1,10050288582,18446744073709551616,{"rid":"y"}]]}'],
    "state_bad": ['{"t":"state","ts":99999999999999999999999,"enabled":[1],"reason":{"a":1}}',
                  '{"t":"dropped","count":"x"}', '{"t":"meta","key":[1],"value":2}',
                  '{"t":"warn","msg":[1],"count":"z"}'],
    "markers_bad": ['{"t":"flushed","until":"x"}', '{"t":"lost","count":[1],"from_ts":5,"to_ts":1}',
                    '{"t":"close","ts":null,"reason":[1]}'],
    "t_unhashable": ['{"t":[1],"r":[]}', '{"t":{"a":1}}', "[1,2]", '"text"', "1e999999", "{}"],
    "second_header": ['{"t":"header","pid":"zz"}'],
}


def _case(synth: SyntheticRun, run: Path, name: str) -> Path:
    shutil.copytree(synth.run_dir, run)
    api = run / _api(synth).name
    lines = api.read_text().splitlines()
    if name in HEADER_CASES:
        header = json.loads(lines[0])
        header.update(HEADER_CASES[name])
        lines[0] = json.dumps(header)
    else:
        lines += LINE_CASES[name]
    api.write_text("\n".join(lines) + "\n")
    return api


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "service-profiler"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service_profiler.cli"]


@pytest.mark.parametrize("name", [*HEADER_CASES, *LINE_CASES])
def test_each_malformed_shape_costs_only_itself(synth: SyntheticRun, tmp_path: Path, name: str) -> None:
    api = _case(synth, tmp_path / "run", name)
    whole = read_run([synth.run_dir])
    run = read_run([tmp_path / "run"])
    assert len(run.processes) == 2
    assert run.num_records >= whole.num_records  # every valid record still read
    assert any(str(api) in p for p in run.problems) or name in VALID_SHAPES, run.problems
    for p in run.problems:  # each problem names the file, and the line where there is one
        assert str(api) in p
    for args in (["inspect", str(tmp_path / "run")], ["inspect", "--json", str(tmp_path / "run")]):
        proc = subprocess.run([*_cli(), *args], capture_output=True, timeout=120, check=False)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    out = tmp_path / "out"
    proc = subprocess.run([*_cli(), "analyze", "--input-path", str(tmp_path / "run"), "--output-path", str(out),
                           "--format", "csv", "json", "db", "--quiet"], capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert (out / "request.csv").read_text(encoding="utf-8").count("\n") >= 1 + 12
    db = sqlite3.connect(out / "profiler.db")
    assert db.execute("SELECT count(*) FROM request").fetchone()[0] >= 12
    json.loads((out / "chrome_tracing.json").read_text(encoding="utf-8"))


def test_problems_name_the_line(synth: SyntheticRun, tmp_path: Path) -> None:
    api = _case(synth, tmp_path / "run", "chan_id_list")
    n = len(api.read_text().splitlines())
    problems = read_run([tmp_path / "run"]).problems
    assert f"{api}:{n - 1}: channel line without a valid id" in problems[0]
    api = _case(synth, tmp_path / "run2", "ts_2_63")
    problems = read_run([tmp_path / "run2"]).problems
    assert problems == [f"{api}: 2 malformed records (line {n - 1}; a record is [channel id, timestamps (ints in "
                        "[0, 2^62), end >= start), tid, attrs], see docs/DESIGN.md); skipped"]
    api = _case(synth, tmp_path / "run3", "pid_text")
    assert read_run([tmp_path / "run3"]).problems == [f"{api}:1: header pid 'abc' is not an integer; read as unknown"]


def _mutate(rng: random.Random, line: str) -> str:
    """One random change to a JSON line: a value replaced by an odd one, bytes cut, flipped or repeated."""
    odd = ["null", "true", "-1", "1.5", "1e400", "18446744073709551616", "9223372036854775807",
           "-9223372036854775808", "4611686018427387904", "NaN", "-Infinity", '"\\ud800"', "[]", "{}", "[[[]]]",
           '"x"', '{"t":"rec"}', "[1,[2,[3]]]", MID_DEEP]
    how = rng.randrange(6)
    if how == 0 and len(line) > 2:  # cut (a torn line, or a line that ends early)
        return line[:rng.randrange(1, len(line))]
    if how == 1:  # a number or a word replaced by an odd value
        spots = [i for i, c in enumerate(line) if c.isdigit() or c == '"']
        if spots:
            i = rng.choice(spots)
            j = i + 1
            while j < len(line) and line[j] not in ',]}':
                j += 1
            return line[:i] + rng.choice(odd) + line[j:]
    if how == 2:  # a byte flipped
        i = rng.randrange(len(line))
        return line[:i] + chr(rng.choice([0, 0x0C, ord("{"), ord("]"), ord('"'), 0xE9])) + line[i + 1:]
    if how == 3:
        return json.dumps({"t": rng.choice(["rec", "chan", "state", "patch", "warn", "lost", "flushed", "close",
                                            "dropped", "meta", "header"]),
                           rng.choice(["r", "id", "ts", "until", "count", "applied", "msg", "kind"]):
                           json.loads(rng.choice(odd[:-1]))})
    if how == 4:
        return line  # repeated as it is
    return "".join(rng.choice('{}[]",:0123456789tnrfaelsu \\') for _ in range(rng.randint(0, 80)))


@pytest.mark.parametrize("seed", range(40))
def test_fuzzed_lines_never_raise_and_keep_everything_valid(synth: SyntheticRun, tmp_path: Path, seed: int,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(seed)
    run = tmp_path / "run"
    run.mkdir()
    for path in synth.files:
        lines = path.read_text().splitlines()
        out = [lines[0]]
        for line in lines[1:]:
            out.append(line)
            if rng.random() < 0.5:  # a fuzzed line after each valid line half the time
                out.append(_mutate(rng, rng.choice(lines)))
        (run / path.name).write_text("\n".join(out) + "\n", encoding="utf-8")
    whole = read_run([synth.run_dir])
    data = read_run([run])
    assert data.problems
    # A fuzzed channel line that is still valid JSON but says another name for an id declared in the file
    # is told ("declared again"); which of the two is the right one no reader can know (the first is kept),
    # so that channel's records are left out of the comparison.
    conflicts = {(proc.index, int(m.group(2))) for proc in data.processes for problem in data.problems
                 if (m := re.match(r"(.*):\d+: channel (\d+) declared again", problem)) and m.group(1) == proc.path}
    unsure = {(proc.index, chan["domain"], chan["name"]) for proc in whole.processes for chan in proc.channels
              if (proc.index, chan["id"]) in conflicts}

    # every valid record is still there (fuzzed lines may add records of their own)
    def keys(records: list[Any]) -> set[tuple[Any, ...]]:
        return {tuple(r[:4]) for r in records if tuple(r[:3]) not in unsure}

    assert keys(whole.spans) <= keys(data.spans) and keys(whole.events) <= keys(data.events)
    assert keys(whole.counters) <= keys(data.counters)
    assert inspect_run.main([str(run)]) == 0
    assert inspect_run.main([str(run), "--json"]) == 0
    out = tmp_path / "out"
    assert command.main(["--input-path", str(run), "--output-path", str(out), "--format", "csv", "json", "db",
                         "--quiet"]) == 0
    capsys.readouterr()
    assert sqlite3.connect(out / "profiler.db").execute("SELECT count(*) FROM request").fetchone()[0] >= 12


def test_analyze_counts_attributes_nested_past_the_recursion_limit_as_malformed(synth: SyntheticRun,
                                                                              tmp_path: Path) -> None:
    # deep enough to break a reader of the outputs that recurses (Python's json), shallow enough for DuckDB
    api = _case(synth, tmp_path / "run", "attrs_1500_deep")
    out = tmp_path / "out"
    proc = subprocess.run([*_cli(), "analyze", "--input-path", str(tmp_path / "run"), "--output-path", str(out),
                           "--format", "db", "--quiet"], capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    problems = (out / "problems.txt").read_text(encoding="utf-8")
    assert f"{api}: 1 malformed records" in problems and "nested too deep" in problems, problems
    db = sqlite3.connect(out / "profiler.db")
    assert db.execute("SELECT count(*) FROM event WHERE name = 'deep'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM event").fetchone()[0] > 0
