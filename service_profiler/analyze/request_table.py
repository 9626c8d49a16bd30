"""The request table (one row per engine request id). Metric definitions: `tables` module docstring.

Large runs hold millions of per-request entries in batch spans and API `tokens` events, so the passes
over them use C-level dict/Counter operations where they can: walking batches newest-first and
`dict.update`-ing makes the oldest batch win, which gives "first batch containing the rid" without a
Python-level test per entry.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from service_profiler.rawdata.rawfile import EventRecord, SpanRecord

from .tables import MS, REQUEST_COLUMNS, RecordIndex, Table


def _rid_of(item: Any) -> Any:
    return item[0] if isinstance(item, list | tuple) and item else item


def _reason_of(item: Any) -> Any:
    return item[1] if isinstance(item, list | tuple) and len(item) > 1 else None


def _first_by_rid(events: list[EventRecord]) -> dict[Any, EventRecord]:
    first: dict[Any, EventRecord] = {}
    for e in reversed(events):
        if e.attrs:
            first[e.attrs.get("rid")] = e
    return first


class _EventFacts:
    """Per-rid facts from the Request and KVCache events."""

    def __init__(self, idx: RecordIndex) -> None:
        self.http = _first_by_rid(idx.events("Request", "httpReq"))
        self.enqueue = _first_by_rid(idx.events("Request", "enqueue"))
        self.response = _first_by_rid(idx.events("Request", "httpRes"))
        self.tokens = idx.events("Request", "tokens")
        self.preempted: Counter[Any] = Counter()
        self.finished_state: dict[Any, tuple[int, str]] = {}
        for e in idx.events("Request", "state"):
            a = e.attrs or {}
            to = a.get("to")
            if to == "PREEMPTED":
                self.preempted[a.get("rid")] += 1
            elif isinstance(to, str) and to.startswith("FINISHED"):
                self.finished_state.setdefault(a.get("rid"), (e.ts_ns, to))
        self.hits: dict[Any, tuple[Any, Any]] = {}
        for e in reversed(idx.events("KVCache", "cacheHit")):
            a = e.attrs or {}
            self.hits[a.get("rid")] = (a.get("hit_tokens"), a.get("query_tokens"))
        # peak blocks held: allocate adds, free releases, in time order
        kv = [(e.ts_ns, 1, e.attrs) for e in idx.events("KVCache", "allocate") if e.attrs]
        kv += [(e.ts_ns, 0, e.attrs) for e in idx.events("KVCache", "free") if e.attrs]
        kv.sort(key=lambda t: (t[0], t[1]))
        held: dict[Any, int] = {}
        self.peak_blocks: dict[Any, int] = {}
        for _, is_alloc, a in kv:
            rid, blocks = a.get("rid"), a.get("blocks")
            if not isinstance(blocks, int):
                continue
            if is_alloc:
                h = held[rid] = held.get(rid, 0) + blocks
                if h > self.peak_blocks.get(rid, 0):
                    self.peak_blocks[rid] = h
            else:
                held[rid] = max(0, held.get(rid, 0) - blocks)


def _token_facts(tokens: list[EventRecord], need_counts: set[Any]) -> tuple[
        dict[Any, int], dict[Any, tuple[int, Any]], dict[Any, int]]:
    """first token ts, (finish ts, reason), and summed new tokens (only for rids in need_counts)."""
    first: dict[Any, int] = {}
    for e in reversed(tokens):
        ts = e.ts_ns
        first.update({x[0]: ts for x in (e.attrs or {}).get("reqs") or () if x[1]})
    done: dict[Any, tuple[int, Any]] = {}
    counts: dict[Any, int] = {}
    for e in tokens:
        reqs = (e.attrs or {}).get("reqs") or ()
        for x in [x for x in reqs if x[2]]:
            if x[0] not in done:
                done[x[0]] = (e.ts_ns, x[3] if len(x) > 3 else None)
        if need_counts:
            for x in reqs:
                if x[0] in need_counts:
                    counts[x[0]] = counts.get(x[0], 0) + x[1]
    return first, done, counts


def build_request_table(idx: RecordIndex, batches: Table, spans: list[SpanRecord],
                        finished_lists: list[list[Any]]) -> Table:
    facts = _EventFacts(idx)
    first_batch: dict[Any, int] = {}
    first_entry: dict[Any, Any] = {}
    iterations: Counter[Any] = Counter()
    batch_preempted: Counter[Any] = Counter()
    for i in range(len(spans) - 1, -1, -1):
        a = spans[i].attrs or {}
        reqs = a.get("reqs") or ()
        rids = [x[0] for x in reqs]
        first_batch.update(dict.fromkeys(rids, i))
        first_entry.update(zip(rids, reqs, strict=True))
        iterations.update(rids)
        if a.get("preempted"):
            batch_preempted.update(a["preempted"])
    engine_done: dict[Any, tuple[int, Any]] = {}
    for i, finished in enumerate(finished_lists):
        for item in finished:
            engine_done.setdefault(_rid_of(item), (i, _reason_of(item)))

    all_rids = list(dict.fromkeys([*facts.http, *facts.enqueue, *first_batch]))
    need_counts = {rid for rid in all_rids if rid in facts.http and rid not in facts.response}
    api_first, api_done, api_counts = _token_facts(facts.tokens, need_counts)
    engine_rids = {rid for rid in all_rids if rid not in facts.http}
    eng_first, eng_counts = _engine_tokens(spans, engine_rids)

    bcol = {name: i for i, name in enumerate(batches.columns)}
    brows = batches.rows

    def batch_out_ns(i: int) -> int:
        row = brows[i]
        return row[bcol["update_end_ns"]] or row[bcol["model_end_ns"]] or row[bcol["end_ns"]]

    rows: list[tuple[Any, ...]] = []
    for rid in all_rids:
        http, enq, res = facts.http.get(rid), facts.enqueue.get(rid), facts.response.get(rid)
        ha = http.attrs or {} if http else {}
        ra = res.attrs or {} if res else {}
        fb = first_batch.get(rid)
        entry = first_entry.get(rid)
        engine_arrival = enq.ts_ns if enq else None
        first_sched = brows[fb][bcol["start_ns"]] if fb is not None else None
        if http is not None:
            source = "api"
            arrival: int | None = http.ts_ns
            first_tok = api_first.get(rid)
            done = api_done.get(rid)
            completion = done[0] if done else (res.ts_ns if res else None)
            out_tokens = ra.get("output_tokens")
            if out_tokens is None:
                out_tokens = api_counts.get(rid, 0) if rid in api_counts or first_tok is not None else None
            reason = ra.get("finish_reason") or (done[1] if done else None)
        else:
            source = "engine"
            arrival = engine_arrival
            fi = eng_first.get(rid)
            first_tok = batch_out_ns(fi) if fi is not None else None
            ed = engine_done.get(rid)
            completion = batch_out_ns(ed[0]) if ed else None
            out_tokens = eng_counts.get(rid)
            reason = None
        ed = engine_done.get(rid)
        if not reason and ed:
            reason = ed[1]
        if not reason and rid in facts.finished_state:
            reason = facts.finished_state[rid][1]
        if completion is None and rid in facts.finished_state and source == "engine":
            completion = facts.finished_state[rid][0]
        input_tokens = ha.get("prompt_tokens")
        if input_tokens is None and enq is not None:
            input_tokens = (enq.attrs or {}).get("prompt_tokens")
        if input_tokens is None and entry is not None and len(entry) > 4:
            input_tokens = entry[4]
        decode = _ms(first_tok, completion)
        tpot = decode / (out_tokens - 1) if decode is not None and isinstance(out_tokens, int) \
            and out_tokens > 1 else None
        hit, query = facts.hits.get(rid, (None, None))
        denom = query or input_tokens
        hit_rate = hit / denom if isinstance(hit, int | float) and denom else None
        brow = brows[fb] if fb is not None else None
        rows.append((
            rid, ha.get("api_rid"), arrival, engine_arrival, first_sched, first_tok, completion,
            _ms(engine_arrival, first_sched), _ms(first_sched, first_tok), decode, _ms(arrival, first_tok),
            tpot, _ms(arrival, completion), input_tokens, out_tokens,
            max(facts.preempted.get(rid, 0), batch_preempted.get(rid, 0)), hit,
            facts.peak_blocks.get(rid), reason, hit_rate, iterations.get(rid, 0),
            brow[bcol["batch_id"]] if brow else None,
            brow[bcol["dp_rank"]] if brow else None,
            brow[bcol["proc"]] if brow else (enq.proc if enq else None), source,
        ))
    order = sorted(range(len(rows)), key=lambda k: _sort_key(rows[k]))
    return Table("request", list(REQUEST_COLUMNS), [rows[k] for k in order])


def _sort_key(row: tuple[Any, ...]) -> tuple[int, int]:
    for ts in (row[2], row[3], row[4]):
        if ts is not None:
            return (0, ts)
    return (1, 0)


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else (b - a) / MS


def _engine_tokens(spans: list[SpanRecord], rids: set[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
    """For requests with no API-server data: the batch in which each produced its first token (its
    prefill completed, or it decoded) and how many tokens it produced, from the batch entries."""
    first: dict[Any, int] = {}
    counts: dict[Any, int] = {}
    if not rids:
        return first, counts
    for i, s in enumerate(spans):
        for x in (s.attrs or {}).get("reqs") or ():
            rid = x[0]
            if rid in rids and (x[1] != 0 or (len(x) > 4 and x[3] + x[2] >= x[4])):
                first.setdefault(rid, i)
                counts[rid] = counts.get(rid, 0) + 1
    return first, counts
