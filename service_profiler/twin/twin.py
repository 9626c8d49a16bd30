"""`Twin`: a captured workload plus a step-time source, replayed through vLLM's real scheduler for any
engine configuration."""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..model.step_model import StepModelV2, fit_step_model
from . import engine_config
from .capture import CapturedRun, StepRecord, read_run
from .prediction import Prediction, captured_metrics, metrics_of
from .simulator import PromptCache, SimRequest, Simulation, StepFeatures, StepTimer, arrival_order
from .trace import TraceRequest, rebased

EngineArgs = Sequence[str] | Mapping[str, Any] | str | None
# Stalls below this share of the captured busy time are not worth a note in the prediction.
STALL_NOTE_SHARE = 0.05


class StepTimeModel:
    """Step durations from a fitted model: v2 (tokens, context, kernel-cache misses, fixed costs) or the
    T(B,S) baseline, whichever predicted the captured run's held-out steps better.

    A step's duration is its cycle (schedule start to the next schedule start); its outputs are ready
    `output_lag_ns` before the cycle ends (the engine loop's work after `update_from_output`: output
    processing, new requests), which is when the captured run's first tokens and completions count."""

    def __init__(self, v2: StepModelV2, use: str = "v2", tbs_params: dict[str, float] | None = None,
                 output_lag_ns: int = 0) -> None:
        self.v2 = v2
        self.use = use
        self.tbs_params = tbs_params
        self.output_lag_ns = output_lag_ns

    def __call__(self, index: int, f: StepFeatures) -> int:
        b = f.num_prefill_reqs + f.num_decode_reqs
        s = f.prefill_tokens + f.decode_tokens
        if self.use == "tbs" and self.tbs_params is not None and b > 0 and s > 0:
            p = self.tbs_params
            thr = p["P_max"] * -math.expm1(-p["k_B"] * b) * -math.expm1(-p["k_S"] * s)
            ms = p["tau_0"] + (p["w_0"] + p["w_1"] * s) / thr + p["tau_B"] * b + p["tau_S"] * s
        else:
            ms = self.v2.time_scale * self.v2.predict_ms(b, f.prefill_tokens, f.decode_tokens, f.prefill_context,
                                                         f.decode_context, f.new_shape)
        return int(ms * 1e6)

    def output_lag(self, index: int) -> int:
        return self.output_lag_ns

    def describe(self) -> dict[str, Any]:
        return {"used": self.use, "v2": self.v2.to_dict(), "output_lag_ms": self.output_lag_ns / 1e6}


def fit_from_steps(steps: Sequence[StepRecord]) -> StepTimeModel:
    """Fit v2 (and score T(B,S)) on the steps whose cycle ended with the next step starting at once."""
    busy = [s for s in steps if s.followed_by_work and s.num_prefill_reqs + s.num_decode_reqs > 0]
    x = np.array([[s.num_prefill_reqs + s.num_decode_reqs, s.prefill_tokens, s.decode_tokens, s.prefill_context,
                   s.decode_context, float(s.new_shape)] for s in busy], dtype=float).reshape(-1, 6)
    y = np.array([s.cycle_ns / 1e6 for s in busy], dtype=float)
    v2 = fit_step_model(x, y)
    lags = [s.cycle_ns - s.busy_ns for s in busy if 0 <= s.busy_ns <= s.cycle_ns]
    lag = int(np.median(lags)) if lags else 0
    test = v2.metrics.get("test", {}).get("all", {}).get("mape_pct")
    base = v2.metrics.get("baseline_tbs_test", {})
    base_mape = base.get("all", {}).get("mape_pct") if isinstance(base, dict) else None
    if test is not None and base_mape is not None and base_mape < test:
        return StepTimeModel(v2, "tbs", base.get("params"), output_lag_ns=lag)
    return StepTimeModel(v2, "v2", output_lag_ns=lag)


def stall_notes(model: StepTimeModel) -> list[str]:
    """A note when host stalls held a large share of the captured busy time. Stalls are found against
    step model v2 (its slow-side residuals beyond 5 MADs), whichever model the twin replays with: v2
    leaves them out of every predicted step, while T(B,S) was fitted to every step, stalls included."""
    stalls = model.v2.metrics.get("stalls") or {}
    share = float(stalls.get("share_of_busy_time") or 0.0)
    if share < STALL_NOTE_SHARE:
        return []
    found = (f"{stalls.get('count', 0)} captured steps were host stalls (slower than step model v2 by more than "
             f"5 MADs) holding {share:.0%} of the busy time")
    if model.use == "tbs":
        return [f"{found}; the twin replayed with the T(B,S) model, fitted to every step with the stalls in, so "
                "its predicted steps carry them spread out"]
    return [f"{found}; step model v2, which the twin replayed with, leaves them out of predicted steps"]


class MeasuredStepTimes:
    """The captured run's own steps: each replayed step starts no earlier than the captured one did and
    lasts its measured cycle; steps beyond the captured ones come from `fallback`."""

    def __init__(self, steps: Sequence[StepRecord], fallback: StepTimeModel, origin_ns: int) -> None:
        self.cycles = [s.cycle_ns for s in steps]
        self.lags = [max(s.cycle_ns - s.busy_ns, 0) for s in steps]
        self.starts = [s.start_ns - origin_ns for s in steps]
        self.fallback = fallback

    def __call__(self, index: int, f: StepFeatures) -> int:
        return self.cycles[index] if index < len(self.cycles) else self.fallback(index, f)

    def output_lag(self, index: int) -> int:
        return self.lags[index] if index < len(self.lags) else self.fallback.output_lag(index)


def _lognormal(values: Sequence[float]) -> tuple[float, float] | None:
    positive = np.array([v for v in values if v > 0], dtype=float)
    if positive.size < 5:
        return None
    logs = np.log(positive)
    return float(logs.mean()), float(logs.std())


class Twin:
    """A workload and what the twin knows of the engine that ran it.

    `Twin.from_run(dir)` loads an analyzed run (the output directory of `service-profiler analyze`);
    `Twin.from_trace(requests, base_settings=..., step_model=...)` starts from a trace.
    `run(engine_args)` replays the workload through vLLM's real scheduler configured by `engine_args`
    (a list or string of `vllm serve` arguments, or a dict of EngineArgs fields, on top of the captured
    run's settings) and returns a `Prediction`.
    """

    def __init__(self, requests: Sequence[TraceRequest], *, base_settings: Mapping[str, Any],
                 step_model: StepTimeModel | None = None, captured: CapturedRun | None = None,
                 notes: Sequence[str] = ()) -> None:
        self.requests = rebased(requests)
        self.base_settings = dict(base_settings)
        self.captured = captured
        self.notes = list(notes)
        self._step_model = step_model
        self._captured_metrics: dict[str, Any] | None = None
        self._own_workload = captured is not None  # the requests are the captured run's
        self._prompts = PromptCache()

    @classmethod
    def from_run(cls, path: str | Path) -> Twin:
        """Load an analyzed run; raises capture.CaptureError naming what is missing."""
        run = read_run(path)
        return cls(run.requests, base_settings=run.settings, captured=run, notes=run.notes)

    @classmethod
    def from_trace(cls, requests: Sequence[TraceRequest], *, base_settings: Mapping[str, Any],
                   step_model: StepTimeModel) -> Twin:
        return cls(requests, base_settings=base_settings, step_model=step_model)

    @property
    def step_model(self) -> StepTimeModel:
        if self._step_model is None:
            if self.captured is None:
                raise ValueError("no step-time model: pass step_model= or load the twin from a run")
            self._step_model = fit_from_steps(self.captured.steps)
        return self._step_model

    @property
    def captured_metrics(self) -> dict[str, Any] | None:
        if self._captured_metrics is None and self.captured is not None and self._own_workload:
            preempted = sum(s.num_preempted for s in self.captured.steps)
            self._captured_metrics = captured_metrics(self.captured.truth, preempted)
        return self._captured_metrics

    def with_requests(self, requests: Sequence[TraceRequest]) -> Twin:
        """The same engine knowledge (settings, step-time model, front-end delays) with another workload."""
        twin = Twin(requests, base_settings=self.base_settings, step_model=self.step_model, captured=self.captured,
                    notes=self.notes)
        twin._own_workload = False
        return twin

    def _sim_requests(self, measured: bool, seed: int) -> tuple[list[SimRequest], list[str]]:
        notes = []
        engine_fit = _lognormal([r.engine_delay_ms for r in (self.captured.requests if self.captured else [])
                                 if r.engine_delay_ms is not None])
        reply_fit = _lognormal([r.reply_delay_ms for r in (self.captured.requests if self.captured else [])
                                if r.reply_delay_ms is not None])
        if not measured and (engine_fit is None or reply_fit is None):
            notes.append("front-end delays (HTTP arrival -> engine, engine output -> client) not in the run: "
                         "taken as zero where missing")
        rng = np.random.default_rng(seed)
        draws = rng.standard_normal((len(self.requests), 2))
        out = []
        for i, r in enumerate(self.requests):
            if measured and r.engine_delay_ms is not None:
                engine_ms = r.engine_delay_ms
            else:
                engine_ms = math.exp(engine_fit[0] + engine_fit[1] * draws[i, 0]) if engine_fit else 0.0
            if measured and r.reply_delay_ms is not None:
                reply_ms = r.reply_delay_ms
            else:
                reply_ms = math.exp(reply_fit[0] + reply_fit[1] * draws[i, 1]) if reply_fit else 0.0
            arrival = round(r.arrival_s * 1e9)
            out.append(SimRequest(trace=r, arrival_ns=arrival, engine_arrival_ns=arrival + round(engine_ms * 1e6),
                                  reply_delay_ns=round(reply_ms * 1e6)))
        return out, notes

    def _make_prompts(self, step_times: str, seed: int) -> None:
        """Make the workload's prompts for this arrival order now (a sweep's workers then share them)."""
        sims, _ = self._sim_requests(step_times == "measured", seed)
        for index, sim in enumerate(arrival_order(sims)):
            self._prompts.get(sim.trace, index)

    def sweep(self, configs: Sequence[tuple[str, EngineArgs]], *, step_times: str = "model",
              workers: int | None = None) -> list[tuple[str, Prediction]]:
        """Predict several configurations: [(name, Prediction)] in the order given (see `sweep`)."""
        return sweep(self, configs, step_times=step_times, workers=workers)

    def run(self, engine_args: EngineArgs = None, *, step_times: str = "model", seed: int = 0) -> Prediction:
        """Predict the workload under `engine_args`. `step_times="measured"` replays the captured run's
        own step durations (for checking the twin against the run it came from); "model" uses the fitted
        step-time model. Raises engine_config.EngineArgsError for arguments vLLM or the twin rejects."""
        if step_times not in ("model", "measured"):
            raise ValueError(f"step_times must be 'model' or 'measured', got {step_times!r}")
        overrides = engine_config.parse_engine_args(engine_args)
        settings = engine_config.resolve_settings(self.base_settings, overrides)
        scheduler = engine_config.build_scheduler(settings)
        measured = step_times == "measured"
        if measured and not self._own_workload:
            raise ValueError("step_times='measured' replays the captured run's own steps: it needs the captured "
                             "workload (Twin.from_run without another trace)")
        model = self.step_model
        timer: StepTimer = model
        if measured and self.captured is not None:
            timer = MeasuredStepTimes(self.captured.steps, model, self.captured.origin_ns)
        sims, notes = self._sim_requests(measured, seed)
        depth = int(self.base_settings.get("batch_queue_size") or 2) if settings.async_scheduling else 1
        result = Simulation(scheduler, sims, timer, block_size=settings.block_size,
                            prefix_caching=settings.enable_prefix_caching, batch_queue_size=depth,
                            prompts=self._prompts).run()
        origin = self.captured.origin_ns if self.captured is not None else 0
        if not measured:
            notes.extend(stall_notes(model))
        return Prediction(
            metrics=metrics_of(result), result=result, origin_ns=origin, settings=settings.to_dict(),
            step_times="measured" if measured else model.use, step_model=model.describe(),
            notes=self.notes + notes + result.notes, captured_metrics=self.captured_metrics)


_SWEEP_TWIN: Twin | None = None


def _sweep_one(job: tuple[str, Any, str, int]) -> tuple[str, Prediction]:
    name, engine_args, step_times, seed = job
    assert _SWEEP_TWIN is not None
    return name, _SWEEP_TWIN.run(engine_args, step_times=step_times, seed=seed)


def sweep(twin: Twin, configs: Sequence[tuple[str, EngineArgs]], *, step_times: str = "model", seed: int = 0,
          workers: int | None = None) -> list[tuple[str, Prediction]]:
    """`twin.run` for each (name, engine_args), in order; with several workers the configs run in forked
    processes (each replay is independent and deterministic, so the results equal a serial sweep).
    Engine args are checked first, so a bad config fails before any replay."""
    global _SWEEP_TWIN
    for _, engine_args in configs:
        engine_config.resolve_settings(twin.base_settings, engine_config.parse_engine_args(engine_args))
    twin.step_model  # noqa: B018  (fitted once, before forking)
    twin._make_prompts(step_times, seed)
    jobs = [(name, engine_args, step_times, seed) for name, engine_args in configs]
    count = min(workers if workers is not None else (os.cpu_count() or 1), len(jobs))
    _SWEEP_TWIN = twin
    try:
        if count <= 1:
            return [_sweep_one(job) for job in jobs]
        import multiprocessing

        with _frozen_heap(), multiprocessing.get_context("fork").Pool(count) as pool:
            return pool.map(_sweep_one, jobs, chunksize=1)
    finally:
        _SWEEP_TWIN = None


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Move the objects alive now (vLLM, torch, the twin: hundreds of thousands) out of the garbage
    collector's sight while a sweep runs. Without it every full collection walks them: in each worker
    (which also copies the pages it touches from the parent) and in this process while it unpickles the
    workers' results, which costs more than the unpickling itself. Where the caller froze objects of its
    own already, nothing is frozen: `gc.unfreeze` cannot tell ours from theirs, so ours would stay frozen
    (never collected) for the rest of the process."""
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


__all__ = ["MeasuredStepTimes", "StepTimeModel", "Twin", "fit_from_steps", "stall_notes", "sweep"]
