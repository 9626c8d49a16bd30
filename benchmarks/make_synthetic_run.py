"""Write a synthetic raw run (format v1, vLLM vocabulary) with known ground truth.

    python benchmarks/make_synthetic_run.py --requests 1000 --output-tokens 64 --out /tmp/run

writes `<out>/<host>-<pid>.sprof.jsonl` for the API server and each EngineCore, and `<out>.truth.json`
(or --truth PATH): the true arrival / first scheduled / first token / completion times and the TTFT,
queue, prefill, decode, e2e, TPOT of every request, and the true per-batch times. The generator is
`tests/synthetic.py` (importable by tests); this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic import SyntheticConfig, generate_run, write_truth  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True, help="run directory to create")
    parser.add_argument("--truth", type=Path, help="ground-truth JSON (default: <out>.truth.json)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--arrival-rate", type=float, default=200.0, help="requests/s; <= 0: all at once")
    parser.add_argument("--num-gpu-blocks", type=int, default=100_000, help="small values cause preemptions")
    parser.add_argument("--dp-size", type=int, default=1, help="EngineCore processes (data parallel)")
    parser.add_argument("--engine-mono-offset-ns", type=int, default=0,
                        help="shift the engines' monotonic clock (as if on another host)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(
        requests=args.requests, output_tokens=args.output_tokens, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, arrival_rate_per_s=args.arrival_rate,
        num_gpu_blocks=args.num_gpu_blocks, dp_size=args.dp_size,
        engine_mono_offset_ns=args.engine_mono_offset_ns, seed=args.seed,
    )
    run = generate_run(args.out, cfg)
    truth = args.truth or args.out.with_name(args.out.name + ".truth.json")
    write_truth(run, truth)
    print(f"wrote {len(run.files)} raw files ({run.num_records:,} records, {len(run.batches):,} batches) "
          f"to {args.out}; ground truth in {truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
