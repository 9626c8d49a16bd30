"""Per-call cost of evaluating compiled attribute expressions (ns per evaluate, min of repeats).

Run: .venv/bin/python benchmarks/bench_expressions.py
Compilation is done once, outside the timed loop, exactly as the patching layer does it.
"""

from __future__ import annotations

import inspect
import timeit
from dataclasses import dataclass, field

from service_profiler.runtime.expressions import CompiledExpression, compile_expression


@dataclass
class InputBatch:
    req_ids: list[str] = field(default_factory=lambda: [f"req-{i}" for i in range(64)])


@dataclass
class ModelRunner:
    device: str = "cuda:0"
    input_batch: InputBatch = field(default_factory=InputBatch)

    def execute_model(self, scheduler_output: object, intermediate_tensors: object = None) -> object:
        return scheduler_output


@dataclass
class SchedulerOutput:
    input_ids: list[int] = field(default_factory=lambda: list(range(128)))


def _measure(expr: CompiledExpression, args: tuple, kwargs: dict, result: object, number: int) -> float:
    timer = timeit.Timer(lambda: expr.evaluate(args, kwargs, result))
    best = min(timer.repeat(repeat=7, number=number))
    return best / number * 1e9


def _baseline_ns(number: int) -> float:
    """The cost of the timing lambda plus one method call with three arguments, for reference."""

    class Empty:
        def evaluate(self, args: tuple, kwargs: dict, result: object) -> object:
            return None

    empty = Empty()
    timer = timeit.Timer(lambda: empty.evaluate((), {}, None))
    return min(timer.repeat(repeat=7, number=number)) / number * 1e9


def main() -> None:
    number = 200_000
    signature = inspect.signature(ModelRunner.execute_model)
    runner, output = ModelRunner(), SchedulerOutput()
    args: tuple = (runner, output)
    kwargs: dict = {}
    cases = [
        "args[0] | attr input_batch | attr req_ids | len",
        "args[0] | attr device | str",
        "len(scheduler_output.input_ids)",
        "return | attr input_ids | len | str",
        "intermediate_tensors | bool",
    ]
    print(f"{'expression':<50} {'ns/eval':>8}")
    for source in cases:
        expr = compile_expression(source, signature)
        ns = _measure(expr, args, kwargs, output, number)
        print(f"{source:<50} {ns:8.0f}")
    print(f"{'(baseline: empty method call, same harness)':<50} {_baseline_ns(number):8.0f}")


if __name__ == "__main__":
    main()
