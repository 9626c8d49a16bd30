"""The embedded default model: a tiny Llama made on local disk (config, random weights, and a tokenizer
trained on the spot).

No model hub is needed. The model is meaningless (random weights) but real: vLLM loads and runs it
exactly as it would a production checkpoint, which is all profiling, the twin and the planner need to
show their work in minutes on a CPU. `service-profiler workflow` builds it when no --model is given.

    python -m service_profiler.workload.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
# A little text with enough variety for a BPE tokenizer of VOCAB_SIZE entries.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language model serving engines schedule requests in batches.",
    "Prefill processes the prompt; decode produces one token per step.",
    "The KV cache stores keys and values of previous tokens in blocks.",
    "Profilers measure time spent in the scheduler and in the model runner.",
    "Beijing is a city. Seoul is a city. Paris is a city. Lima is a city.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()[]{}",
]


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 2048,
        "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def make_model(out: Path, seed: int = 0) -> Path:
    """Write the tiny model into `out` (idempotent) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # `torch_dtype` is read from **kwargs (the config's saved dtype), which the type stubs do not list.
    params: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    model: Any = LlamaForCausalLM(LlamaConfig(**params))
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(out)
    return out


def describe() -> str:
    return f"a tiny Llama (random weights, 2 layers, hidden size 128, {VOCAB_SIZE}-token vocabulary)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    print(make_model(parser.parse_args().out))


if __name__ == "__main__":
    main()
