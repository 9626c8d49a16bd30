"""Join one scheduler step's records by `batch_id`: the schedule span, the model run, the update and the
engine step, as `analyze`'s batch table does (docs/DESIGN.md, "Analysis tables").

The handlers emit them at different moments (the schedule span when `schedule()` returns, `modelExec` and
`updateFromOutput` when the output comes back, possibly one step later with a batch queue, `step` when the
engine step returns), so a batch is held until all of its parts are in, then released in batch order.
"""

from __future__ import annotations

from typing import Any

MAX_PENDING = 16
"""Batches held at most: a part that never comes (a step cut short by shutdown, collection switched off
half-way) must not hold back the batches after it. The batch queue holds 2 (async) or PP-size batches."""


class JoinedBatch:
    """One scheduler step. Times are in the caller's clock (monotonic ns live, epoch ns offline)."""

    __slots__ = ("attrs", "batch_id", "dp_rank", "finished", "model_end", "model_start", "rows",
                 "sched_end", "sched_start", "step_end", "step_start", "update_end", "update_start")

    def __init__(self, start: int, end: int, attrs: dict[str, Any]) -> None:
        self.batch_id: int = attrs["batch_id"]
        self.dp_rank: int = attrs.get("dp_rank") or 0
        self.sched_start, self.sched_end, self.attrs = start, end, attrs
        self.model_start: int | None = None
        self.model_end: int | None = None
        self.update_start: int | None = None
        self.update_end: int | None = None
        self.step_start: int | None = None
        self.step_end: int | None = None
        self.finished: list[Any] = []
        self.rows: list[Any] = []  # per-request rows a builder attaches until the batch is released

    @property
    def total_tokens(self) -> int:
        return int(self.attrs.get("total_tokens") or 0)

    def complete(self) -> bool:
        return self.step_end is not None and (self.update_end is not None or self.total_tokens == 0)


class BatchJoiner:
    def __init__(self) -> None:
        self.pending: dict[int, JoinedBatch] = {}

    def schedule(self, start: int, end: int, attrs: dict[str, Any]) -> JoinedBatch | None:
        if not isinstance(attrs.get("batch_id"), int):
            return None
        batch = JoinedBatch(start, end, attrs)
        self.pending[batch.batch_id] = batch
        return batch

    def model(self, start: int, end: int, attrs: dict[str, Any]) -> JoinedBatch | None:
        batch = self.pending.get(attrs.get("batch_id"))  # type: ignore[arg-type]
        if batch is not None:
            batch.model_start, batch.model_end = start, end
        return batch

    def update(self, start: int, end: int, attrs: dict[str, Any]) -> JoinedBatch | None:
        batch = self.pending.get(attrs.get("batch_id"))  # type: ignore[arg-type]
        if batch is not None:
            batch.update_start, batch.update_end = start, end
            batch.finished = list(attrs.get("finished") or ())
        return batch

    def step(self, start: int, end: int, attrs: dict[str, Any]) -> None:
        batch = self.pending.get(attrs.get("batch_id"))  # type: ignore[arg-type]
        if batch is not None:
            batch.step_start, batch.step_end = start, end

    def release(self, final: bool = False) -> list[JoinedBatch]:
        """Batches whose parts are all in, in batch order; with `final`, everything still held."""
        out: list[JoinedBatch] = []
        pending = self.pending
        for batch_id in sorted(pending):
            batch = pending[batch_id]
            if final or batch.complete() or len(pending) > MAX_PENDING:
                out.append(pending.pop(batch_id))
            else:
                break  # keep batch order: a later complete batch waits for this one
        return out
