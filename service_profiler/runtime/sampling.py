"""Background samplers: host CPU/memory (`host_system_usage_freq`) and device memory
(`npu_memory_usage_freq`: CUDA or NPU memory of this process's device when one is in use).

Samplers run only while collection is on. The host sampler runs in the run's first process only
(the host is the same for every process of a service); the device sampler runs in each process and
starts reading once the process has initialised a device: the profiler starts at interpreter
start-up, long before an engine initialises CUDA or the NPU, so the device is looked for again (at
most once a second) until one is in use. A process that has none yet says so once.

A sampler that fails stops, is reported once per process, and never touches the engine.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import record
from .threads import start_daemon

_DEVICE_LOOKUP_INTERVAL_S = 1.0


class _PeriodicSampler:
    def __init__(self, name: str, hz: int, sample: Callable[[], None], on_failure: Callable[[str, Exception], None]
                 ) -> None:
        self.name = name
        self.hz = hz
        self._sample = sample
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread = start_daemon(self._run, name)

    def _run(self) -> None:
        period = 1.0 / self.hz
        while not self._stop.wait(period):
            try:
                self._sample()
            except Exception as exc:
                self._on_failure(self.name, exc)
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
    """A reader for this process's device memory, or None when no device is in use here.

    Only looks at a `torch` the engine has already imported (never imports it, never initialises a
    device); `torch.npu` exists once `torch_npu` is imported."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    for backend in (getattr(torch, "npu", None), getattr(torch, "cuda", None)):
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


class _DeviceMemory:
    """The device sampler's tick: finds the device once it is in use, then records its memory."""

    def __init__(self, on_problem: Callable[[str], None],
                 find_reader: Callable[[], Callable[[], dict[str, float]] | None]) -> None:
        self._on_problem = on_problem
        self._find_reader = find_reader
        self._reader: Callable[[], dict[str, float]] | None = None
        self._next_lookup = 0.0
        self._said_none = False

    def __call__(self) -> None:
        if self._reader is None:
            now = time.monotonic()
            if now < self._next_lookup:
                return
            self._next_lookup = now + _DEVICE_LOOKUP_INTERVAL_S
            self._reader = self._find_reader()
            if self._reader is None:
                if not self._said_none:
                    self._said_none = True
                    self._on_problem("npu_memory_usage_freq: no CUDA or NPU device is in use in this process "
                                     "(yet); device memory is sampled from when one is initialised")
                return
        record.counter("System", "device_memory", self._reader())


class Samplers:
    """Starts and stops the samplers to match the settings while collection is on."""

    def __init__(self, on_problem: Callable[[str], None],
                 find_device_reader: Callable[[], Callable[[], dict[str, float]] | None] = _device_memory_reader
                 ) -> None:
        self._on_problem = on_problem
        self._failed: set[str] = set()
        self._host: _PeriodicSampler | None = None
        self._device: _PeriodicSampler | None = None
        # One per process (not per sampler thread): the reader found and "no device yet" said once.
        self._device_memory = _DeviceMemory(on_problem, find_device_reader)

    def update(self, settings: Any, host: bool) -> None:
        host_hz = settings.host_system_usage_freq if settings is not None and host else -1
        device_hz = settings.npu_memory_usage_freq if settings is not None else -1
        self._host = self._restart(self._host, "host", host_hz, sample_host)
        self._device = self._restart(self._device, "device", device_hz, self._device_memory)

    def _sampler_failed(self, name: str, exc: Exception) -> None:
        # Once per sampler and process: a sampler restarted later (another frequency, collection
        # switched off and on) that fails again is not reported again.
        if name in self._failed:
            return
        self._failed.add(name)
        what = "device memory" if name == "device" else "host CPU/memory"
        self._on_problem(f"{what} sampling failed ({exc!r}); it stops in this process")

    def _restart(self, current: _PeriodicSampler | None, name: str, hz: int,
                 sample: Callable[[], None]) -> _PeriodicSampler | None:
        if current is not None and current.hz == hz:
            return current
        if current is not None:
            current.stop()
        return _PeriodicSampler(name, hz, sample, self._sampler_failed) if hz > 0 else None
