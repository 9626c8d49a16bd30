"""service-profiler: a low-overhead profiler for LLM serving engines.

Importing this package is cheap and has no side effects: collection starts only through
`service_profiler.runtime.bootstrap.activate()` when `SERVICE_PROF_CONFIG_PATH` is set.
"""

from __future__ import annotations

__version__ = "0.1.0"
