"""The records of one raw `rec` line, built into RunData's lists; per-request entries checked on the way.

Two records carry a list of per-request entries (docs/DESIGN.md "Vocabulary"):
- BatchSchedule `batchFrameworkProcessing`: `reqs` = [[rid, phase, scheduled_tokens, computed_tokens_before,
  prompt_tokens, resumed], ...] (the last three may be missing);
- Request `tokens`: `reqs` = [[rid, new_tokens, finished, finish_reason], ...] (the reason may be missing).

Each entry must have that shape (`clean_attrs`); one that does not is
dropped and counted, so that one bad entry costs itself rather than its readers (every consumer of
the entries indexes and sums them). A `reqs` that is not a list counts as one dropped entry and
becomes []. The entries kept become tuples (16 bytes less each than a list).

Request ids are interned and the token counts of batch entries (fields 3 and 4, mostly ints above 256,
a new object per occurrence) share one object per value (`shared`): a rid costs ~90 bytes per occurrence
and an int 32, which roughly halves the memory of a long run read whole.

`add_records` appends a line's records. It is all-or-nothing for the records it appends: on the first
record that `valid_record` rejects (or of an unknown channel) it raises, and the caller removes what
this line appended and re-reads it record by record. What it did to the entries of the records before
that stays done: cleaning is idempotent (tuples pass again, already-dropped entries are gone) and
`dropped` counts each bad entry once.
"""

from __future__ import annotations

import sys
from typing import Any

from .rawcheck import MAX_TS

NO_IDS, RID, TOKEN_REQS, BATCH_REQS = 0, 1, 2, 3
SPAN, EVENT, COUNTER = 0, 1, 2

_RID_CLASSES = frozenset({str, int})
_INT_CLASSES = frozenset({int, bool})
_OPT_INT = frozenset({int, bool, type(None)})
_OPT_NUM = frozenset({int, float, type(None)})
_OPT_STR = frozenset({str, type(None)})

_INT64 = 2**63


def valid_record(code: int, rec: list[Any]) -> bool:
    """A span [chan, start, end, tid, attrs|null] (end >= start), event [chan, ts, tid, attrs|null] or
    counter [chan, ts, {values}]; timestamps are ints (not bools) in [0, MAX_TS), tids int64."""
    def is_ts(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_TS

    def is_tid(v: Any) -> bool:
        return isinstance(v, int) and -_INT64 <= v < _INT64

    if code == SPAN:
        return (len(rec) == 5 and is_ts(rec[1]) and is_ts(rec[2]) and rec[2] >= rec[1] and is_tid(rec[3])
                and (rec[4] is None or isinstance(rec[4], dict)))
    if code == EVENT:
        return len(rec) == 4 and is_ts(rec[1]) and is_tid(rec[2]) and (
            rec[3] is None or isinstance(rec[3], dict))
    return len(rec) == 3 and is_ts(rec[1]) and isinstance(rec[2], dict)


def clean_attrs(attrs: Any, fields: int, shared: dict[int, int], dropped: list[int]) -> None:
    """Check and intern the ids / entries of one record's attrs in place; count each dropped entry in
    dropped[0]. `fields`: RID, TOKEN_REQS or BATCH_REQS."""
    if attrs.__class__ is not dict:
        return
    if fields == RID:
        rid = attrs.get("rid")
        if rid.__class__ is str:
            attrs["rid"] = sys.intern(rid)
        return
    reqs = attrs.get("reqs")
    if reqs is None:
        return
    if reqs.__class__ is not list:
        attrs["reqs"] = []
        dropped[0] += 1
        return
    # The shapes of docs/DESIGN.md "Vocabulary", checked per entry inline: this loop runs over every entry
    # of a run, and a call per entry would cost about as much as the rest of it.
    intern, share = sys.intern, shared.setdefault
    out: list[tuple[Any, ...]] = []
    append = out.append
    if fields == BATCH_REQS:  # [rid, phase, scheduled, computed?, prompt?, resumed?]
        for e in reqs:
            if not ((e.__class__ is list or e.__class__ is tuple) and (n := len(e)) >= 3
                    and e[0].__class__ in _RID_CLASSES and e[1].__class__ in _INT_CLASSES
                    and e[2].__class__ in _INT_CLASSES and (n < 4 or e[3].__class__ in _OPT_NUM)
                    and (n < 5 or e[4].__class__ in _OPT_NUM) and (n < 6 or e[5].__class__ in _OPT_INT)):
                continue
            rid = e[0]
            if rid.__class__ is str:
                rid = intern(rid)
            if n > 4:
                computed, prompt = e[3], e[4]
                if computed.__class__ is int:
                    computed = share(computed, computed)
                if prompt.__class__ is int:
                    prompt = share(prompt, prompt)
                append((rid, e[1], e[2], computed, prompt, e[5]) if n == 6
                       else (rid, e[1], e[2], computed, prompt, *e[5:]))
            else:
                append((rid, *e[1:]))
    else:  # [rid, new_tokens, finished, finish_reason?]
        for e in reqs:
            if not ((e.__class__ is list or e.__class__ is tuple) and (n := len(e)) >= 3
                    and e[0].__class__ in _RID_CLASSES and e[1].__class__ in _INT_CLASSES
                    and e[2].__class__ in _OPT_INT and (n < 4 or e[3].__class__ in _OPT_STR)):
                continue
            rid = e[0]
            if rid.__class__ is str:
                rid = intern(rid)
            append((rid, e[1], e[2], e[3]) if n == 4 else (rid, *e[1:]))
    if len(out) < len(reqs):
        dropped[0] += len(reqs) - len(out)
    attrs["reqs"] = out


def add_records(records: list[Any], chans: dict[Any, tuple[int, str, str, int]], off: int, pi: int,
                spans: list[Any], events: list[Any], counters: list[Any], classes: tuple[type, type, type],
                shared: dict[int, int], dropped: list[int]) -> None:
    """Append the line's records, built as `classes` (span, event, counter NamedTuples, by
    tuple.__new__ straight from C: a NamedTuple's own __new__ is a Python function, ~0.15 µs more).

    The checks are `valid_record`'s, written out per kind on the exact classes a JSON parser makes (int,
    bool, dict): this loop is most of a read's time, and a call per record would add about a third."""
    new = tuple.__new__
    span_cls, event_cls, counter_cls = classes
    for rec in records:
        code, domain, name, ids = chans[rec[0]]
        if code == SPAN:
            _, start, end, tid, attrs = rec  # ValueError when it is not 5 long
            if not (start.__class__ is int and end.__class__ is int and 0 <= start <= end < MAX_TS
                    and isinstance(tid, int) and -_INT64 <= tid < _INT64
                    and (attrs is None or attrs.__class__ is dict)):
                raise ValueError("malformed record")
            if ids:
                clean_attrs(attrs, ids, shared, dropped)
            spans.append(new(span_cls, (pi, domain, name, start + off, end + off, tid, attrs)))
        elif code == EVENT:
            _, ts, tid, attrs = rec
            if not (ts.__class__ is int and 0 <= ts < MAX_TS and isinstance(tid, int)
                    and -_INT64 <= tid < _INT64 and (attrs is None or attrs.__class__ is dict)):
                raise ValueError("malformed record")
            if ids:
                clean_attrs(attrs, ids, shared, dropped)
            events.append(new(event_cls, (pi, domain, name, ts + off, tid, attrs)))
        else:
            _, ts, values = rec
            if not (ts.__class__ is int and 0 <= ts < MAX_TS and values.__class__ is dict):
                raise ValueError("malformed record")
            counters.append(new(counter_cls, (pi, domain, name, ts + off, values)))
