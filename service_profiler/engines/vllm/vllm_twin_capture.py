"""What the digital twin needs to replay a run and vLLM does not otherwise say: per request, its prompt
as chained block hashes and its sampling limits; once per engine, the scheduler and KV-cache settings.

`engine_add_request_handler` wraps `EngineCore.add_request(request, request_wave)`. After the original
returned it records

- `Request/twinRequest` {rid, prompt_tokens, max_tokens, min_tokens, ignore_eos, priority,
  hash_block, block_hashes}: `block_hashes[i]` chains the hash of prompt tokens
  [i*hash_block, (i+1)*hash_block) onto `block_hashes[i-1]` (Python's tuple-of-int hash, which does not
  depend on the process's hash seed), so two prompts share hash i exactly when they share their first
  (i+1)*hash_block tokens; the twin turns each hash back into tokens and vLLM's prefix cache sees the
  same hits for any block size that is a multiple of `hash_block`. The token ids themselves never leave
  the engine.
- `Request/twinConfig` (first request of each EngineCore process only): the scheduler class and the
  settings a replay must match (num_gpu_blocks, block_size, max_num_seqs, ...).

Cost: O(prompt length / HASH_BLOCK) tuple hashes per new request, nothing per step. Stdlib only; any
failure is counted by the vLLM probe state and never reaches the engine.
"""

from __future__ import annotations

from typing import Any

from service_profiler import record

from .vllm_v1 import STATE, Original, _arg

HASH_BLOCK = 16
"""Prompt tokens per hash: vLLM's block sizes (16 on CUDA, multiples of 32 on CPU) are multiples of it."""

_configured_engines: set[int] = set()


def engine_add_request_handler(original_func: Original, this: Any, *args: Any, **kwargs: Any) -> Any:
    result = original_func(this, *args, **kwargs)
    if not record.enabled("Request"):
        return result
    if id(this) not in _configured_engines:
        _configured_engines.add(id(this))
        try:
            record.event("Request", "twinConfig", engine_settings(this))
        except Exception as exc:
            STATE.failed("twin_capture_config", exc)
    try:
        record.event("Request", "twinRequest", request_facts(_arg(args, kwargs, "request")))
    except Exception as exc:
        STATE.failed("twin_capture", exc)
    return result


def prompt_block_hashes(token_ids: Any, hash_block: int = HASH_BLOCK) -> list[int]:
    """Chained hashes of the prompt's full `hash_block`-token blocks (a trailing partial block has none)."""
    hashes: list[int] = []
    previous = 0
    tokens = tuple(token_ids)
    for start in range(0, len(tokens) - hash_block + 1, hash_block):
        previous = hash((previous, tokens[start:start + hash_block]))
        hashes.append(previous)
    return hashes


def request_facts(request: Any) -> dict[str, Any]:
    params = request.sampling_params
    token_ids = request.prompt_token_ids
    return {
        "rid": request.request_id,
        "prompt_tokens": request.num_prompt_tokens,
        "max_tokens": params.max_tokens if params is not None else None,
        "min_tokens": params.min_tokens if params is not None else None,
        "ignore_eos": bool(params.ignore_eos) if params is not None else None,
        "priority": request.priority,
        "arrival_time": request.arrival_time,
        "hash_block": HASH_BLOCK,
        "block_hashes": prompt_block_hashes(token_ids) if token_ids is not None else None,
    }


def engine_settings(engine: Any) -> dict[str, Any]:
    scheduler = engine.scheduler
    config = scheduler.scheduler_config
    cache = scheduler.cache_config
    return {
        "scheduler_class": type(scheduler).__name__,
        "async_scheduling": bool(getattr(config, "async_scheduling", False)),
        "batch_queue_size": int(getattr(engine, "batch_queue_size", 1) or 1),
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": scheduler.vllm_config.model_config.max_model_len,
        "enable_chunked_prefill": bool(config.enable_chunked_prefill),
        "long_prefill_token_threshold": config.long_prefill_token_threshold,
        "watermark": getattr(config, "watermark", 0.0),
        "prefill_schedule_interval": getattr(config, "prefill_schedule_interval", 1),
        "scheduler_reserve_full_isl": getattr(config, "scheduler_reserve_full_isl", True),
        "policy": str(config.policy),
        "block_size": cache.block_size,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "num_gpu_blocks": cache.num_gpu_blocks,
        "pool_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
    }
