"""fastjson: orjson where it fits, the standard library where it does not; the same text either way."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import pytest

from service_profiler.rawdata import fastjson

VALUES = [
    {"rid": "cmpl-1", "reqs": [["a", 0, 16, 0, 16], ["b", 1, 1, 17, 16]], "kv_usage": 0.25, "ok": True, "x": None},
    {"n": 2**70},  # beyond 64 bits: orjson refuses it
    {"usage": math.nan, "infinite": math.inf, "none": None},  # orjson would write null
    {1: "int key", "nested": {"f": 1.5e-7, "neg": -3}},
    [1, 2.5, "é", ["ü"]],
    "plain",
]


def _stdlib(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("value", VALUES)
def test_json_text_reads_back_as_the_standard_library_reads_its_own(value: object) -> None:
    text = fastjson.json_text(value)
    assert json.loads(text) == json.loads(_stdlib(value).replace("NaN", "null").replace("Infinity", "null"))


def test_non_finite_floats_become_null_so_the_text_stays_valid_json() -> None:
    value = {"usage": math.nan, "inf": [math.inf, 1.0], "none": None, "big": 2**70}
    for encode in (fastjson.json_text, fastjson.stdlib_text):
        assert encode(value) == '{"usage":null,"inf":[null,1.0],"none":null,"big":1180591620717411303424}'
        json.loads(encode(value), parse_constant=lambda name: pytest.fail(f"{name} in the text"))


def test_big_ints_and_int_keys_survive() -> None:
    assert fastjson.json_text({"n": 2**70}) == '{"n":1180591620717411303424}'
    assert json.loads(fastjson.json_text({1: "a"})) == {"1": "a"}


def test_loads_accepts_what_the_raw_writer_may_emit() -> None:
    assert math.isnan(fastjson.loads(b'{"v": NaN}')["v"])
    assert fastjson.loads(b'{"v": Infinity}')["v"] == math.inf
    assert fastjson.loads(b'[18446744073709551615, -9223372036854775808]') == [2**64 - 1, -(2**63)]
    assert fastjson.loads('{"t":"rec","r":[[1,2,3,4,null]]}') == {"t": "rec", "r": [[1, 2, 3, 4, None]]}
    with pytest.raises(ValueError):
        fastjson.loads(b'{"t":"rec","r":[[1,2')  # a torn line is still an error the reader can report


def test_encode_events_is_the_middle_of_an_array() -> None:
    events = [{"ph": "X", "ts": 1.5, "dur": 0.001, "args": {"n_reqs": 3}}, {"ph": "i", "name": "é"}]
    assert json.loads("[" + fastjson.encode_events(events) + "]") == events
    assert json.loads("[" + fastjson.encode_events([{"big": 2**70}]) + "]") == [{"big": 2**70}]


def test_orjson_is_installed_where_the_suite_runs() -> None:
    # The speed figures in the README assume it; the fallback below is for platforms without a wheel.
    assert fastjson.orjson is not None


def test_without_orjson_the_standard_library_gives_the_same_results() -> None:
    code = (
        "import sys, json, pickle; sys.modules['orjson'] = None\n"
        "from service_profiler.rawdata import fastjson\n"
        "assert fastjson.orjson is None\n"
        "values = pickle.loads(sys.stdin.buffer.read())\n"
        "print(json.dumps([fastjson.json_text(v) for v in values]))\n"
        "print(fastjson.encode_events([{'a': 1}, {'b': [2]}]))\n"
        "print(fastjson.loads(b'{\"v\": [1, 2]}'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(VALUES), capture_output=True,
                         check=True).stdout.decode().splitlines()
    # the same JSON values (float spelling may differ: 1.5e-07 vs 1.5e-7)
    fallback, fast = json.loads(out[0]), [fastjson.json_text(v) for v in VALUES]
    assert [json.loads(t) for t in fallback] == [json.loads(t) for t in fast]
    assert out[1] == '{"a":1},{"b":[2]}'
    assert out[2] == "{'v': [1, 2]}"
