"""Old dotted names of the vLLM handlers, kept working: `service_profiler.handlers.<module>`.

User symbol YAMLs written for earlier releases name handlers as `service_profiler.handlers.vllm_v1:...`.
The handlers now live in `service_profiler.engines.vllm`; importing this module registers each of them
under its old name as the SAME module object (an alias, not a second copy: handler modules hold
per-process state), so `importlib.import_module` of an old name returns the new module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from service_profiler.engines import vllm as _vllm

for _info in pkgutil.iter_modules(_vllm.__path__):
    _module = importlib.import_module(f"{_vllm.__name__}.{_info.name}")
    sys.modules[f"{__name__}.{_info.name}"] = _module
    globals()[_info.name] = _module
