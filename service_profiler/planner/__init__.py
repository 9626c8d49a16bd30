"""Schedule planner: engine settings for an objective, searched with the digital twin."""

from __future__ import annotations

from .search import OBJECTIVES, Search, Slo
from .space import KNOBS, Plan, SearchSpace

__all__ = ["KNOBS", "OBJECTIVES", "Plan", "Search", "SearchSpace", "Slo"]
