"""Four workloads on vLLM's CPU build (tiny local model), each induced to one bottleneck, run under the
profiler and diagnosed. Used by the diagnosis tests and benchmarks/bench_diagnose.py.

    python examples/bottleneck_scenarios.py OUT_DIR [memory scheduling compute cache]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service_profiler.diagnose import diagnose, load_run
from service_profiler.workload import ArrivalSpec, EngineSettings, ProfilingRunner, RequestMix
from service_profiler.workload.runner import model_vocab_size


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str
    mix: RequestMix
    arrival: ArrivalSpec
    engine: dict[str, Any]


SCENARIOS = {
    # A KV pool of 24 blocks of 32 tokens for a burst of requests that each need 5-10 blocks.
    "memory": Scenario("memory", "memory-bound", RequestMix(24, (128, 224), (48, 64), seed=1),
                       ArrivalSpec("burst"), {"num_gpu_blocks_override": 24, "max_model_len": 512}),
    # Two sequence slots under a request rate the engine could otherwise serve with room to spare.
    "scheduling": Scenario("scheduling", "scheduling-bound", RequestMix(40, (64, 256), (16, 48), seed=2),
                           ArrivalSpec("poisson", rate=40.0), {"max_num_seqs": 2}),
    # Long prompts and a token budget that takes them whole: steps are long model runs, no limit binds.
    "compute": Scenario("compute", "compute-bound", RequestMix(24, (1200, 1800), (4, 8), seed=3),
                        ArrivalSpec("poisson", rate=40.0), {"max_num_batched_tokens": 16384, "max_num_seqs": 64}),
    # Every prompt starts with the same 256 tokens, and prefix caching is off.
    "cache": Scenario("cache", "cache-bound", RequestMix(24, (320, 400), (4, 8), prefix_tokens=256, seed=4),
                      ArrivalSpec("poisson", rate=10.0), {"enable_prefix_caching": False}),
}


def run_scenario(scenario: Scenario, model: Path, out: Path) -> dict[str, Any]:
    """Run the scenario on a real engine and diagnose it; returns the diagnosis plus the wall time."""
    started = time.monotonic()
    requests = scenario.mix.build(scenario.arrival, model_vocab_size(str(model)))
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    engine = {"max_model_len": max(2048, longest), **scenario.engine}
    settings = EngineSettings(model=str(model), **engine)
    runner = ProfilingRunner(model, out / scenario.name, name=scenario.name)
    result = runner.run_requests(requests, scenario.arrival, settings, warmup_requests=0)
    doc = diagnose(load_run(Path(result["run_dirs"][0])))
    doc["wall_s"] = time.monotonic() - started
    return doc


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_model import make_model

    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    model = make_model(out / "tiny-llama")
    failures = 0
    print(f"{'scenario':<12} {'expected':<18} {'verdicts':<40} {'busy':>5} {'wait':>5} {'kv p90':>6} {'preempt':>7} "
          f"{'hit':>5} {'overlap':>7}")
    for name in names:
        scenario = SCENARIOS[name]
        doc = run_scenario(scenario, model, out)
        kinds = [v["kind"] for v in doc["verdicts"]]
        ok = bool(kinds) and kinds[0] == scenario.expected and (
            scenario.expected == "compute-bound" or "compute-bound" not in kinds)
        failures += not ok
        s = doc["signals"]
        print(f"{name:<12} {scenario.expected:<18} {', '.join(kinds) or '-':<40} {s['busy_share']:>5.2f} "
              f"{s['waiting_share']:>5.2f} {(s['kv_usage_p90'] or 0):>6.2f} {s['preemptions']:>7} "
              f"{(s['prefix_hit_rate'] or 0):>5.2f} {(s['prefix_overlap'] or 0):>7.2f}  {'ok' if ok else 'WRONG'}"
              f"  ({doc['wall_s']:.0f}s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
