"""Make the tiny local Llama (random weights, a tokenizer trained on the spot) the demo, tests and
benchmarks run on; the maker ships with the package (service_profiler.workload.tiny_model).

    python examples/tiny_model.py OUT_DIR
"""

from __future__ import annotations

from service_profiler.workload.tiny_model import VOCAB_SIZE, main, make_model, make_tokenizer

__all__ = ["VOCAB_SIZE", "make_model", "make_tokenizer"]

if __name__ == "__main__":
    main()
