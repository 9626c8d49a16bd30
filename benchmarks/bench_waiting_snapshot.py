"""Per-step cost of the waiting-queue snapshot (`VLLM_SCHEDULER_LOG_WAITING=1`) on vLLM's real v1 Scheduler.

    python benchmarks/bench_waiting_snapshot.py [--steps 200] [--queues 0 100 1000 10000]

For each waiting-queue length it fills a Scheduler (max_num_seqs 8, all 8 running requests decoding) with
that many more requests that cannot be admitted, then times, per step, in µs of this thread's CPU time (so
that other processes on a busy machine do not inflate the figures; median and P90 over
`--steps` steps; both are timed in the same steps, so the machine's drift hits both alike):
  schedule()        the engine's own Scheduler.schedule (the queue is scanned by vLLM itself too)
  snapshot          `vllm_waiting.waiting_snapshot` alone (what the opt-in adds: two list entries per request)
  snapshot / req    its cost per waiting request: flat across lengths means O(queue)
The front door's own per-row work (CSV rows on the recorder's writer thread) is not on the engine's thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vllm.v1.core.sched.scheduler import Scheduler
from vllm_scheduler_harness import made_up_output, make_request, make_scheduler, prompt_of

from service_profiler.engines.vllm import vllm_waiting

RUNNING = 8


def _filled(queue: int) -> Scheduler:
    scheduler = make_scheduler(num_blocks=4096, max_num_seqs=RUNNING, max_num_batched_tokens=8192)
    for i in range(RUNNING + queue):
        scheduler.add_request(make_request(f"r{i}", prompt_of(8, start=1 + 8 * (i % 100)), max_tokens=1 << 20))
    for _ in range(2):  # admit the first RUNNING and get them decoding
        out = scheduler.schedule()
        scheduler.update_from_output(out, made_up_output(scheduler, out))
    return scheduler


def _us(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def measure(queue: int, steps: int) -> dict[str, float]:
    scheduler = _filled(queue)
    schedule_us: list[float] = []
    snapshot_us: list[float] = []
    for _ in range(steps):
        t0 = time.thread_time_ns()
        out = scheduler.schedule()
        t1 = time.thread_time_ns()
        rids, _ = vllm_waiting.waiting_snapshot(scheduler, out)
        t2 = time.thread_time_ns()
        scheduler.update_from_output(out, made_up_output(scheduler, out))
        schedule_us.append((t1 - t0) / 1e3)
        snapshot_us.append((t2 - t1) / 1e3)
        assert len(rids) == queue, (len(rids), queue)
    sched_med, sched_p90 = _us(schedule_us)
    snap_med, snap_p90 = _us(snapshot_us)
    return {"queue": queue, "schedule_med": sched_med, "schedule_p90": sched_p90, "snapshot_med": snap_med,
            "snapshot_p90": snap_p90, "per_req_ns": snap_med * 1e3 / queue if queue else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--queues", type=int, nargs="+", default=[0, 100, 1000, 10000])
    args = parser.parse_args()
    print(f"{'waiting':>8} {'schedule() µs med/P90':>22} {'snapshot µs med/P90':>20} {'ns per waiting req':>19}")
    for queue in args.queues:
        r = measure(queue, args.steps)
        print(f"{queue:>8} {r['schedule_med']:>12.1f} / {r['schedule_p90']:<7.1f} {r['snapshot_med']:>10.1f} / "
              f"{r['snapshot_p90']:<7.1f} {r['per_req_ns']:>12.0f}")


if __name__ == "__main__":
    main()
