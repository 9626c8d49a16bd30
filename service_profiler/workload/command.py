"""`service-profiler workload`: profiling cells (C, M, B, block_size) or a request workload on a real engine.

    service-profiler workload --model DIR --C 256 512 --M 0 2 --B 8 16 --profiling-type mixed --output-dir out
    service-profiler workload --model DIR --arrival poisson --rate 6 --num-requests 64 --output-dir out
    service-profiler workload --model DIR --trace trace.jsonl --output-dir out
    service-profiler workload --server http://127.0.0.1:8000 --arrival gamma --rate 8 --burstiness 0.5 ...
    service-profiler workload --server http://127.0.0.1:8000 --trace trace.jsonl [--server-run-dir PROF_RUN]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import PROFILING_TYPES, ProfilingConfig, WorkloadConfigError, expand_sweep
from .http_client import HttpTarget, served_model
from .requests import ARRIVALS, ArrivalSpec, RequestMix, WorkloadError, WorkloadRequest, read_requests, retime
from .runner import ProfilingRunner, WorkloadRunError, model_vocab_size

# Token ids every tokenizer of a served LLM has: generated prompts stay below it when the vocabulary is unknown.
SAFE_VOCAB_SIZE = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or name vLLM can load (with --server: optional, the "
                        "served model's directory, for its vocabulary size)")
    parser.add_argument("--output-dir", type=Path, default=Path("workload_out"))
    parser.add_argument("--name", default="profiling", help="results file: <name>_results.json")
    parser.add_argument("--C", type=int, nargs="+", default=[256], help="prompt tokens per request (sweepable)")
    parser.add_argument("--M", type=int, nargs="+", default=[0], help="shared cached prefix, in KV blocks")
    parser.add_argument("--B", type=int, nargs="+", default=[8], help="batch size (sweepable)")
    parser.add_argument("--block-size", type=int, nargs="+", default=[32], help="KV block size (one engine each)")
    parser.add_argument("--profiling-type", nargs="+", choices=PROFILING_TYPES, default=["mixed"])
    parser.add_argument("--num-warmup", type=int, default=1)
    parser.add_argument("--num-measurements", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16, help="output tokens per request (decode, mixed)")
    parser.add_argument("--quick-test", action="store_true", help="one small cell, two measurements")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra vLLM engine argument (JSON value), e.g. max_num_seqs=4; repeatable")
    req = parser.add_argument_group("request workload (instead of cells)")
    req.add_argument("--arrival", choices=ARRIVALS, help="arrival process; switches to a request workload")
    req.add_argument("--trace", type=Path, help="replay a trace (the twin's JSONL format)")
    req.add_argument("--rate", type=float, default=4.0, help="requests/s (poisson, gamma)")
    req.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson, < 1 burstier)")
    req.add_argument("--concurrency", type=int, default=4, help="requests in flight (closed loop)")
    req.add_argument("--num-requests", type=int, default=32)
    req.add_argument("--prompt-tokens", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"))
    req.add_argument("--output-tokens", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"))
    req.add_argument("--prefix-tokens", type=int, default=0, help="shared prefix length for request workloads")
    req.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival schedule")
    http = parser.add_argument_group("a running server over HTTP (instead of the in-process engine)")
    http.add_argument("--server", metavar="URL", help="e.g. http://127.0.0.1:8000 (a running `vllm serve`)")
    http.add_argument("--server-run-dir", type=Path,
                      help="the server's profiler run directory: step times, memory, preemptions, prefix hits")
    http.add_argument("--vocab-size", type=int, help="token ids of generated prompts stay below it (default: "
                      "the served model's config.json when local, else 1000)")
    http.add_argument("--request-timeout", type=float, default=300.0, help="seconds for the whole workload")


def parse_engine_args(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WorkloadConfigError(f"--engine-arg {item!r}: write KEY=VALUE, e.g. max_num_seqs=4")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _print_cells(doc: dict[str, object]) -> None:
    print(f"{'cell':<40} {'steps':>5} {'step p50 ms':>11} {'p99':>8} {'cv':>5} {'out tok/s':>9} {'hit':>5}  checks")
    for cell in doc["cells"]:  # type: ignore[attr-defined]
        st = cell["step_time_ms"]
        hit = cell["cache"]["hit_rate"]
        print(f"{cell['name']:<40} {cell['steps_measured']:>5} {st['p50'] or 0:>11.2f} {st['p99'] or 0:>8.2f} "
              f"{st['cv'] or 0:>5.2f} {cell['throughput']['output_tokens_per_s'] or 0:>9.0f} {hit or 0:>5.2f}  "
              f"{'ok' if cell['checks']['passed'] else 'FAILED (see checks)'}")


def _request_workload(args: argparse.Namespace, vocab: int) -> tuple[list[WorkloadRequest], ArrivalSpec]:
    """The requests and their arrival process: a trace (its own times unless --arrival re-times it) or a
    generated mix; the schedule is computed here, before anything is sent, from --seed."""
    if args.trace:
        arrival = ArrivalSpec(args.arrival or "trace", args.rate, args.burstiness, args.concurrency)
        return retime(read_requests(args.trace, vocab, args.seed), arrival, args.seed + 1), arrival
    arrival = ArrivalSpec(args.arrival or "burst", args.rate, args.burstiness, args.concurrency)
    mix = RequestMix(args.num_requests, tuple(args.prompt_tokens), tuple(args.output_tokens), args.prefix_tokens,
                     seed=args.seed)
    return mix.build(arrival, vocab), arrival


def _run_server(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    target = HttpTarget.from_url(args.server)
    served, root = served_model(target)
    target = replace(target, model=served)
    vocab = args.vocab_size or model_vocab_size(args.model or root, default=0)
    if not vocab:
        vocab = SAFE_VOCAB_SIZE
        progress(f"vocabulary of {served!r} unknown (not a local directory): prompt token ids below {vocab}; "
                 "pass --vocab-size or --model DIR to use the whole vocabulary")
    if args.server_run_dir is not None and not args.server_run_dir.is_dir():
        raise WorkloadError(f"--server-run-dir {args.server_run_dir}: not a directory; pass the profiler's run "
                            "directory of the server (under its prof_dir)")
    requests, arrival = _request_workload(args, vocab)
    runner = ProfilingRunner(served, args.output_dir, args.name, timeout_s=args.request_timeout, progress=progress)
    return runner.run_over_http(target, requests, arrival, args.server_run_dir)


def run(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.server:
            doc = _run_server(args, progress)
            print(json.dumps(doc["metrics"], indent=1))
            print(f"results: {args.output_dir / (args.name + '_results.json')}")
            return 0 if doc["metrics"]["requests"] else 1
        if not args.model:
            raise WorkloadConfigError("--model is required (or --server URL to drive a running server)")
        overrides = parse_engine_args(args.engine_arg)
        runner = ProfilingRunner(args.model, args.output_dir, args.name, engine_overrides=overrides,
                                 progress=progress)
        if args.arrival or args.trace:
            requests, arrival = _request_workload(args, model_vocab_size(args.model))
            doc = runner.run_requests(requests, arrival)
            print(json.dumps(doc["metrics"], indent=1))
        else:
            if args.quick_test:
                base = ProfilingConfig(num_warmup=1, num_measurements=2, decode_tokens=8)
                sweep: dict[str, list[object]] = {"C": [128], "M": [2], "B": [4]}
            else:
                base = ProfilingConfig(num_warmup=args.num_warmup, num_measurements=args.num_measurements,
                                       decode_tokens=args.decode_tokens)
                sweep = {"C": args.C, "M": args.M, "B": args.B}
            sweep.update({"block_size": args.block_size, "profiling_type": args.profiling_type})
            doc = runner.run(expand_sweep(base, sweep))
            _print_cells(doc)
    except (WorkloadConfigError, WorkloadError, WorkloadRunError) as exc:
        print(f"service-profiler workload: {exc}", file=sys.stderr)
        return 2
    print(f"results: {args.output_dir / (args.name + '_results.json')}; run dirs: {', '.join(doc['run_dirs'])}")
    return 0
