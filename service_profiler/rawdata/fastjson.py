"""JSON for the analysis side: orjson where it is installed and the value fits it, the standard library
otherwise, with the same results for everything the profiler writes.

A long run is millions of records read once and written two or three times (SQLite attrs, the chrome
trace, CSV list cells), so the codec is most of the analysis time: orjson parses the raw files ~2.2x
and encodes ~5x faster than `json`. It is an analysis dependency only; the engine-side runtime never
imports this module. orjson refuses what the standard library accepts in two places that matter here,
and both fall back rather than fail:
  - decoding: `NaN`/`Infinity` literals (a float attribute the engine recorded as nan): the line is
    parsed again by `json.loads`;
  - encoding: integers beyond 64 bits: the value is encoded by the standard library's C encoder.
Text written here is always valid JSON: a NaN/inf float is written as null (what orjson does; the
standard library's default would be the `NaN` literal, which SQLite's json_extract and strict parsers
reject).
One difference remains: orjson reads an integer beyond 64 bits (unsigned) as a float. The profiler's own
fields (timestamps, ids, counts) never get there; an attribute expression that returns such a number
is read back rounded to a double.
"""

from __future__ import annotations

import functools
import json
import json.encoder
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

orjson: ModuleType | None
try:
    import orjson
except ImportError:  # a platform without an orjson wheel: the standard library does it all, slower
    orjson = None


def _make_stdlib_encoder() -> Callable[[Any], str]:
    """Compact JSON text of one value; ValueError on NaN/inf. The C encoder that `json.dumps` wraps
    costs half as much when called directly (no per-call Python wrapper)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return functools.partial(json.dumps, separators=(",", ":"), allow_nan=False)
    encode = make(None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False)
    join = "".join
    return lambda value: join(encode(value, 0))


_stdlib_strict = _make_stdlib_encoder()


def _finite_only(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None (JSON has no such numbers)."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is dict:
        return {k: _finite_only(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_finite_only(v) for v in value]
    return value


def stdlib_text(value: Any) -> str:
    """`json_text` by the standard library alone (no orjson)."""
    try:
        return _stdlib_strict(value)
    except ValueError:  # a NaN/inf somewhere: rare, so only then the walk
        return _stdlib_strict(_finite_only(value))


if orjson is not None:
    _dumps, _loads = orjson.dumps, orjson.loads
    _OPTS = orjson.OPT_NON_STR_KEYS
    _ORJSON_ERRORS = (orjson.JSONEncodeError, TypeError)
    _DECODE_ERROR: type[ValueError] = orjson.JSONDecodeError

    def json_text(value: Any) -> str:
        """Compact, valid JSON text of `value`: NaN/inf are written as null."""
        try:
            return str(_dumps(value, option=_OPTS), "utf-8")
        except _ORJSON_ERRORS:
            return stdlib_text(value)

    # `json_text` as two C-callable halves, for C code that encodes many values (service_profiler/
    # _records.c): the UTF-8 bytes of the value, TypeError for what orjson cannot encode, and the
    # standard library's text for those.
    JSON_ENCODERS: tuple[Callable[[Any], bytes | str], Callable[[Any], str]] = (
        functools.partial(_dumps, option=_OPTS), stdlib_text)

    def loads(data: bytes | str) -> Any:
        """`json.loads`, faster; NaN/Infinity literals still parse."""
        try:
            return _loads(data)
        except _DECODE_ERROR:
            return json.loads(data)

else:
    json_text = stdlib_text
    JSON_ENCODERS = (stdlib_text, stdlib_text)

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


def encode_events(events: list[Any]) -> str:
    """`events` as comma-separated JSON values (no enclosing brackets): the middle of a JSON array that
    is written a chunk at a time."""
    return json_text(events)[1:-1]
