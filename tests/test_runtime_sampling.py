"""Device-memory sampling (`npu_memory_usage_freq`) through the real runtime, with a fake `torch` (and
`torch.npu`, as `torch_npu` adds it) put into `sys.modules` after the profiler started, as an engine
initialises its device long after interpreter start-up. Also: a failing reader never reaches the host
and is reported once."""

from __future__ import annotations

import pytest
from runtime_harness import Workspace

FAKE_TORCH = """
import sys, types

class FakeDevice:
    def __init__(self, initialized, fail=False):
        self.initialized, self.fail, self.reads = initialized, fail, 0
    def is_initialized(self):
        return self.initialized
    def mem_get_info(self):
        self.reads += 1
        if self.fail:
            raise RuntimeError("device lost")
        return (3_000_000, 10_000_000)
    def memory_allocated(self):
        return 5_000_000
    def memory_reserved(self):
        return 6_000_000

def install_fake_torch(backend, fail=False):
    torch = types.ModuleType("torch")
    device = FakeDevice(True, fail)
    torch.cuda = FakeDevice(backend == "cuda", fail) if backend != "cuda" else device
    if backend == "npu":
        torch.npu = device
        sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    sys.modules["torch"] = torch
    return device

def wait_until(condition, what, timeout=30):
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
"""


@pytest.mark.parametrize("backend", ["cuda", "npu"])
def test_device_memory_counters_carry_what_the_device_reports(workspace: Workspace, backend: str) -> None:
    workspace.write_config(npu_memory_usage_freq=20)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    (workspace.root / "fake_torch.py").write_text(FAKE_TORCH)
    proc = workspace.run_python(f"""
    import sys, toymod
    from fake_torch import install_fake_torch, wait_until
    assert "torch" not in sys.modules              # the profiler started without it
    device = install_fake_torch({backend!r})
    print(toymod.Engine().schedule(7))
    wait_until(lambda: device.reads >= 5, "device memory never read")
    """)
    assert proc.stdout.split() == ["7"]
    run = next(iter(workspace.runs().values()))
    channels = [chan for chan in run.channels.values() if chan["name"] == "device_memory"]
    assert [(chan["kind"], chan["domain"]) for chan in channels] == [("counter", "System")]
    samples = [record[2] for record in run.spans("device_memory")]  # counter records: [chan, ts, values]
    assert len(samples) >= 4, samples
    assert all(sample == {"used_bytes": 7_000_000.0, "total_bytes": 10_000_000.0,
                          "allocated_bytes": 5_000_000.0, "reserved_bytes": 6_000_000.0} for sample in samples)
    timestamps = [record[1] for record in run.spans("device_memory")]
    assert timestamps == sorted(timestamps)
    assert not [line for line in run.of_type("warn") if "sampling failed" in line["msg"]]


def test_failing_device_reader_never_reaches_the_host_and_is_reported_once(workspace: Workspace) -> None:
    workspace.write_config(npu_memory_usage_freq=20)
    workspace.write_symbols("- symbol: toymod:Engine.schedule\n")
    (workspace.root / "fake_torch.py").write_text(FAKE_TORCH)
    config = str(workspace.config)
    proc = workspace.run_python(f"""
    import json, os, time, toymod
    from fake_torch import install_fake_torch, wait_until
    from service_profiler.runtime import bootstrap
    rt = bootstrap.current_runtime()
    device = install_fake_torch("cuda", fail=True)
    e = toymod.Engine()
    print(e.schedule(1))
    wait_until(lambda: device.reads == 1, "device memory never read")
    time.sleep(0.3)                      # six sampling periods: a failed sampler does not read again
    print(device.reads, e.schedule(2))
    for n, hz in enumerate((25, 30), start=1):    # each new frequency restarts the sampler: fails again
        with open({config!r}, "w") as f:
            json.dump({{"enable": 1, "prof_dir": {str(workspace.prof_dir)!r}, "npu_memory_usage_freq": hz}}, f)
        os.utime({config!r}, ns=(time.time_ns(), time.time_ns() + n))
        wait_until(lambda: device.reads == 1 + n, "sampler not restarted")
    print(e.schedule(3))
    """)
    assert proc.stdout.split() == ["1", "1", "2", "3"]
    run = next(iter(workspace.runs().values()))
    failures = [line for line in run.of_type("warn") if "sampling failed" in line["msg"]]
    assert [line["msg"] for line in failures] == [
        "device memory sampling failed (RuntimeError('device lost')); it stops in this process"]
    assert proc.stderr.count("device memory sampling failed") == 1, proc.stderr
    assert run.spans("device_memory") == []
    assert len(run.spans("schedule")) == 3
