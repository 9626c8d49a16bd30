"""Workload generator: profiling cells (C, M, B, block_size) and request workloads on a real engine."""

from __future__ import annotations

from .config import EngineSettings, ProfilingConfig, WorkloadConfigError, expand_sweep
from .requests import ArrivalSpec, RequestMix, WorkloadRequest
from .runner import ProfilingRunner, WorkloadRunError

__all__ = ["ArrivalSpec", "EngineSettings", "ProfilingConfig", "ProfilingRunner", "RequestMix", "WorkloadConfigError",
           "WorkloadRequest", "WorkloadRunError", "expand_sweep"]
