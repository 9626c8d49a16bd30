"""A replay's steps as a few flat arrays, the form a sweep's worker sends them back in.

A 1,000-request replay has tens of thousands of steps; as objects (a step, its features, a row per
scheduled request) they are hundreds of thousands of small objects to pickle, unpickle and keep, and
the garbage collector walks them all again and again while a sweep's results pile up. As arrays they
pickle as a few byte strings, and the objects are built again only when a table needs them.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

STEP_FIELDS = ("batch_id", "start_ns", "end_ns", "running", "waiting", "kv_used_blocks", "kv_total_blocks",
               "finished")
FEATURE_FIELDS = ("prefill_tokens", "decode_tokens", "num_prefill_reqs", "num_decode_reqs", "prefill_context",
                  "decode_context", "new_shape")
PHASES = ("prefill", "decode")


def pack_steps(steps: Sequence[Any]) -> dict[str, Any]:
    """SimSteps -> {column: array('q') | list}: equal values, in the same order."""
    packed: dict[str, Any] = {name: array("q", [getattr(s, name) for s in steps]) for name in STEP_FIELDS}
    for name in FEATURE_FIELDS:
        packed[f"features.{name}"] = array("q", [getattr(s.features, name) for s in steps])
    packed["rows"] = array("q", [len(s.composition) for s in steps])
    rids: list[str] = []
    decode = array("b")
    scheduled, before, prompt = array("q"), array("q"), array("q")
    for step in steps:
        for rid, phase, tokens, computed_before, prompt_tokens in step.composition:
            rids.append(rid)
            decode.append(PHASES.index(phase))
            scheduled.append(tokens)
            before.append(computed_before)
            prompt.append(prompt_tokens)
    packed.update({"rid": rids, "phase": decode, "scheduled": scheduled, "computed_before": before,
                   "prompt_tokens": prompt,
                   "preempted": {i: s.preempted for i, s in enumerate(steps) if s.preempted}})
    return packed


def unpack_steps(packed: dict[str, Any]) -> list[Any]:
    """The SimSteps `pack_steps` packed."""
    from .simulator import SimStep, StepFeatures

    features = zip(*(packed[f"features.{name}"] for name in FEATURE_FIELDS), strict=True)
    rows = zip(packed["rid"], (PHASES[p] for p in packed["phase"]), packed["scheduled"], packed["computed_before"],
               packed["prompt_tokens"], strict=True)
    preempted = packed["preempted"]
    steps = []
    columns = zip(*(packed[name] for name in STEP_FIELDS), packed["rows"], features, strict=True)
    for i, (batch_id, start, end, running, waiting, used, total, finished, count, feats) in enumerate(columns):
        composition = tuple(next(rows) for _ in range(count))
        steps.append(SimStep(batch_id, start, end, composition, StepFeatures(*feats), running, waiting, used, total,
                             preempted.get(i, ()), finished))
    return steps


def packed_preemptions(packed: dict[str, Any]) -> int:
    return sum(len(p) for p in packed["preempted"].values())
