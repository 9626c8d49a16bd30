"""Background samplers: host CPU/memory (`host_system_usage_freq`) and device memory
(`npu_memory_usage_freq`: CUDA or NPU memory of this process's device when one is in use).

Samplers run only while collection is on. The host sampler runs in the run's first process only
(the host is the same for every process of a service); the device sampler runs in each process that
has initialised a device, and reports once that there is nothing to sample otherwise.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from . import record
from .threads import start_daemon


class _PeriodicSampler:
    def __init__(self, name: str, hz: int, sample: Callable[[], None]) -> None:
        self.hz = hz
        self._sample = sample
        self._stop = threading.Event()
        self._thread = start_daemon(self._run, name)

    def _run(self) -> None:
        period = 1.0 / self.hz
        while not self._stop.wait(period):
            try:
                self._sample()
            except Exception:
                return  # a sampler that cannot sample stops; the engine is untouched

    def stop(self) -> None:
        self._stop.set()


def sample_host() -> None:
    import psutil

    memory = psutil.virtual_memory()
    record.counter("System", "host", {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "mem_used_bytes": float(memory.used),
        "mem_percent": memory.percent,
    })


def _device_memory_reader() -> Callable[[], dict[str, float]] | None:
    """A reader for this process's device memory, or None when no device is in use here."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    npu = getattr(torch, "npu", None)
    for backend in (npu, getattr(torch, "cuda", None)):
        if backend is None:
            continue
        try:
            if not backend.is_initialized():
                continue
        except Exception:
            continue

        def read(backend: Any = backend) -> dict[str, float]:
            free, total = backend.mem_get_info()
            return {"used_bytes": float(total - free), "total_bytes": float(total),
                    "allocated_bytes": float(backend.memory_allocated()),
                    "reserved_bytes": float(backend.memory_reserved())}

        return read
    return None


class Samplers:
    """Starts and stops the samplers to match the settings while collection is on."""

    def __init__(self, on_problem: Callable[[str], None]) -> None:
        self._on_problem = on_problem
        self._host: _PeriodicSampler | None = None
        self._device: _PeriodicSampler | None = None

    def update(self, settings: Any, host: bool) -> None:
        host_hz = settings.host_system_usage_freq if settings is not None and host else -1
        device_hz = settings.npu_memory_usage_freq if settings is not None else -1
        self._host = self._restart(self._host, "host", host_hz, sample_host)
        if device_hz > 0 and (self._device is None or self._device.hz != device_hz):
            reader = _device_memory_reader()
            if reader is None:
                self._on_problem("npu_memory_usage_freq: no CUDA or NPU device is in use in this process; "
                                 "device memory is not sampled here")
                device_hz = -1
            else:
                self._device = self._restart(self._device, "device", device_hz,
                                             lambda: record.counter("System", "device_memory", reader()))
                return
        if device_hz <= 0:
            self._device = self._restart(self._device, "device", -1, lambda: None)

    @staticmethod
    def _restart(current: _PeriodicSampler | None, name: str, hz: int,
                 sample: Callable[[], None]) -> _PeriodicSampler | None:
        if current is not None and current.hz == hz:
            return current
        if current is not None:
            current.stop()
        return _PeriodicSampler(name, hz, sample) if hz > 0 else None
