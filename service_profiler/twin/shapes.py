"""Which steps run a token count the engine's kernels have not recently seen.

vLLM's CPU backend runs every linear layer through a oneDNN matmul handler that keeps a small LRU cache
of primitives keyed by the number of rows (the step's scheduled tokens); a step whose token count is
not in the cache builds new primitives for every layer first, which can cost as much as the step's
own computation on a small model. Prefill chunks have varied sizes, so most steps that
complete a prompt pay it, while repeated shapes (pure decode, equal chunks of a long prompt) do not.
The step-time model takes the miss as a feature, fitted like the others (zero where the captured
engine shows no such cost), and the twin replays the same cache over the steps it schedules.
"""

from __future__ import annotations

from collections import OrderedDict

# vLLM's CPU linear dispatch creates its oneDNN handlers with a primitive cache of 32 token counts.
SHAPE_CACHE_SIZE = 32


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
