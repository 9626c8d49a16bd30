"""Loads service-profiler at interpreter start-up, then runs the user's own sitecustomize, if any.

Used only where the installed `service_profiler.pth` is not processed: add this directory to
PYTHONPATH. It is a few lines on purpose; all logic lives in `service_profiler.runtime.bootstrap`.
"""

import importlib.machinery
import importlib.util
import os
import sys

if (os.environ.get("SERVICE_PROF_CONFIG_PATH") or os.environ.get("VLLM_SCHEDULER_LOGGING")
        or os.environ.get("VLLM_ENABLE_SCHEDULER_PROFILING")):
    try:
        from service_profiler.runtime.bootstrap import activate_from_startup

        activate_from_startup()
    except Exception:
        pass

# Chain to the next sitecustomize on sys.path, which this file shadows.
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None and _spec.origin != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
