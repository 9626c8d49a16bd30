"""Per-step cost of the vLLM schedule handler (extraction + recording) on vLLM's real v1 Scheduler.

    python benchmarks/bench_vllm_handlers.py [--steps 300]

For batch sizes 8, 64 and 256 (all requests decoding, one token each per step) it reports, in µs per
step, medians over `--steps` steps:
  schedule()         the engine's own Scheduler.schedule
  + handler          what the handler adds: extraction and recording after schedule() returned,
                     plus its bookkeeping around the call (the wrapper's own flag check is not included)
  handler / batch    the added cost per scheduled request: flat across sizes means O(batch)
  + update handler   what the update_from_output handler adds (modelExec, updateFromOutput, states)
  console            the extra cost with the live console on (console_every_n_steps > 0)
Records go through the runtime's own Recorder channel table into its buffer, as in an engine process
(the buffer is cleared every 200 steps, as the writer thread would). Target: O(batch), and small
compared to schedule() itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import vllm_scheduler_harness as h
from vllm.v1.core.sched.scheduler import Scheduler

from service_profiler import record
from service_profiler.engines.vllm import console, vllm_v1
from service_profiler.runtime.recorder import COUNTER, EVENT, SPAN, Recorder

BATCH_SIZES = (8, 64, 256)
PROMPT = 32


class RecorderSink:
    """The runtime's sink path: channel lookup, then one tuple appended to the recorder's buffer."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def domain_enabled(self, domain: str) -> bool:
        return True

    def span(self, domain: str, name: str, start_ns: int, end_ns: int, tid: int, attrs: Any) -> None:
        self.recorder.buffer.append((self.recorder.channel(SPAN, domain, name), start_ns, end_ns, tid, attrs))

    def event(self, domain: str, name: str, ts_ns: int, tid: int, attrs: Any) -> None:
        self.recorder.buffer.append((self.recorder.channel(EVENT, domain, name), ts_ns, tid, attrs))

    def counter(self, domain: str, name: str, ts_ns: int, values: Mapping[str, float]) -> None:
        self.recorder.buffer.append((self.recorder.channel(COUNTER, domain, name), ts_ns, dict(values)))

    def meta(self, key: str, value: object) -> None:
        pass


def _decoding_scheduler(batch: int) -> Scheduler:
    scheduler = h.make_scheduler(num_blocks=batch * 40, max_num_seqs=batch, max_num_batched_tokens=8192,
                                 max_model_len=4096)
    for i in range(batch):
        scheduler.add_request(h.make_request(f"req-{i}", h.prompt_of(PROMPT, 1 + i * PROMPT),
                                             max_tokens=3000))
    out = scheduler.schedule()  # every prefill at once; from here on every step decodes the batch
    scheduler.update_from_output(out, h.made_up_output(scheduler, out))
    return scheduler


def measure(batch: int, steps: int, recorder: Recorder) -> dict[str, float]:
    scheduler = _decoding_scheduler(batch)
    raw_us: list[float] = []
    added_us: list[float] = []
    update_us: list[float] = []
    console_us: list[float] = []
    now = time.perf_counter_ns
    quiet = console.ConsoleWindow(every_n=lambda: 0)
    loud = console.ConsoleWindow(every_n=lambda: 1_000_000, write=lambda line: None)  # counts, never prints
    for i in range(steps):
        if i % 200 == 0:
            recorder.buffer.clear()
        if i % 2 == 0:
            t0 = now()
            out = Scheduler.schedule(scheduler)
            raw_us.append((now() - t0) / 1e3)
            scheduler.update_from_output(out, h.made_up_output(scheduler, out))
            continue
        state = vllm_v1.STATE
        state.console = loud if i % 4 == 3 else quiet
        t0 = now()
        out = vllm_v1.schedule_handler(Scheduler.schedule, scheduler)
        total = (now() - t0) / 1e3
        # The handler's time stamps bracket the engine's call: total minus that is what it added.
        inner = _last_schedule_span_us(recorder)
        (console_us if state.console is loud else added_us).append(total - inner)
        model_output = h.made_up_output(scheduler, out)
        t0 = now()
        vllm_v1.update_from_output_handler(Scheduler.update_from_output, scheduler, out, model_output)
        with_handler = (now() - t0) / 1e3
        update_us.append(with_handler - _last_update_span_us(recorder))
    handler = statistics.median(added_us)
    return {
        "schedule": statistics.median(raw_us),
        "handler": handler,
        "per_req": handler / batch,
        "update": statistics.median(update_us),
        "console": statistics.median(console_us) - handler,
    }


def _last_span_us(recorder: Recorder, name: str) -> float:
    chan = recorder.channel(SPAN, "BatchSchedule", name)
    for item in reversed(recorder.buffer):
        if item[0] == chan:
            return float(item[2] - item[1]) / 1e3
    raise AssertionError(f"no {name} span recorded")


def _last_schedule_span_us(recorder: Recorder) -> float:
    return _last_span_us(recorder, "batchFrameworkProcessing")


def _last_update_span_us(recorder: Recorder) -> float:
    return _last_span_us(recorder, "updateFromOutput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    recorder = Recorder(Path(tempfile.mkdtemp(prefix="sp-bench-")))
    record.set_sink(RecorderSink(recorder))
    h.reset_state()
    print(f"{'batch':>6} {'schedule() µs':>14} {'+ handler µs':>13} {'handler/req µs':>15} "
          f"{'+ update µs':>12} {'console µs':>11} {'handler/schedule':>17}")
    for batch in BATCH_SIZES:
        r = measure(batch, args.steps, recorder)
        print(f"{batch:>6} {r['schedule']:>14.1f} {r['handler']:>13.1f} {r['per_req']:>15.3f} "
              f"{r['update']:>12.1f} {r['console']:>11.1f} {r['handler'] / r['schedule']:>16.1%}")
    record.set_sink(None)


if __name__ == "__main__":
    main()
