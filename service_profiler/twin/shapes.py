"""Which steps run a token count the engine's kernels have not recently seen.

vLLM's CPU backend runs every linear layer through a oneDNN matmul whose primitive is specific to the
number of rows (the step's scheduled tokens). A token count seen before finds its primitive in a cache;
a new one makes oneDNN generate the kernel for every distinct weight shape first, which can cost as
much as the step's own computation on a small model. Prefill chunks have varied sizes, so most steps
that complete a prompt pay it, while repeated shapes (pure decode, equal chunks of a long prompt) do
not. The step-time model takes the miss as a feature, fitted like the others (zero where the captured
engine shows no such cost), and the twin replays the same cache over the steps it schedules.

The cache that decides the cost is oneDNN's own primitive cache (1,024 primitives by default, least
recently used out); vLLM's per-layer cache of 32 sits in front of it, and a miss there that oneDNN still
holds costs a small fraction of a full miss. A decoder layer has four distinct weight shapes (qkv, o,
gate-up, down projections), so the cache holds about 256 token counts.
"""

from __future__ import annotations

from collections import OrderedDict

SHAPE_CACHE_SIZE = 1024 // 4


class ShapeCache:
    """An LRU cache of step token counts, as the engine's primitive cache holds them."""

    def __init__(self, size: int = SHAPE_CACHE_SIZE) -> None:
        self.size = size
        self._recent: OrderedDict[int, None] = OrderedDict()

    def miss(self, tokens: int) -> bool:
        """Record a step of `tokens` scheduled tokens; True when that count was not in the cache."""
        recent = self._recent
        if tokens in recent:
            recent.move_to_end(tokens)
            return False
        recent[tokens] = None
        if len(recent) > self.size:
            recent.popitem(last=False)
        return True
