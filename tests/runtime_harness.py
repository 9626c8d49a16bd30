"""Helpers for tests that run the collection runtime in real subprocesses.

Each test gets a directory with a toy target module, a symbols YAML and a JSON config; `run_python`
starts a fresh interpreter with the two environment variables set (so the installed .pth activates
the profiler, exactly as in a `vllm serve` process) and `read_records` parses the run directory with
a deliberately tiny, independent reader of the raw format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOY_MODULE = '''
import asyncio

class Engine:
    class Inner:
        def step(self, x):
            return x * 2

    def __init__(self):
        self.calls = 0
        self.batch = [1, 2, 3]

    def schedule(self, n, scale=1):
        self.calls += 1
        return n * scale

    @classmethod
    def build(cls, v):
        return v + 1

    @staticmethod
    def helper(v):
        return -v

    async def serve(self, v):
        await asyncio.sleep(0)
        return v

    def tokens(self, n):
        for i in range(n):
            yield i

    async def stream(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    def fail(self):
        raise KeyError("engine-owned")

class SubEngine(Engine):
    pass

def forward(input_ids, training=False):
    return len(input_ids)
'''


@dataclass
class Run:
    """One process's raw file, parsed."""

    path: Path
    header: dict[str, Any]
    channels: dict[int, dict[str, Any]] = field(default_factory=dict)
    records: list[list[Any]] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)

    def spans(self, name: str) -> list[list[Any]]:
        ids = {cid for cid, chan in self.channels.items() if chan["name"] == name}
        return [r for r in self.records if r[0] in ids]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["t"] == kind]


def read_records(run_root: Path) -> dict[int, Run]:
    """pid -> Run for every raw file below `run_root`. A torn last line is ignored."""
    runs: dict[int, Run] = {}
    for path in sorted(run_root.rglob("*.sprof.jsonl")):
        run: Run | None = None
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if line["t"] == "header":
                run = Run(path, line)
                runs[line["pid"]] = run
                continue
            assert run is not None, f"{path}: record before header"
            run.lines.append(line)
            if line["t"] == "chan":
                run.channels[line["id"]] = line
            elif line["t"] == "rec":
                run.records.extend(line["r"])
    return runs


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.prof_dir = root / "prof"
        self.config = root / "ms_service_profiler_config.json"
        self.symbols = root / "service_profiling_symbols.yaml"
        (root / "toymod.py").write_text(TOY_MODULE)

    def write_config(self, **fields: Any) -> None:
        data = {"enable": 1, "prof_dir": str(self.prof_dir), **fields}
        self.config.write_text(json.dumps(data))

    def write_symbols(self, yaml_text: str) -> None:
        self.symbols.write_text(textwrap.dedent(yaml_text))

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_PROF")}
        env.update({
            "SERVICE_PROF_CONFIG_PATH": str(self.config),
            "PROFILING_SYMBOLS_PATH": str(self.symbols),
            "PYTHONPATH": str(self.root),
        })
        env.update(extra)
        return {k: v for k, v in env.items() if v != ""}  # "" means: leave the variable unset

    def run_python(self, code: str, timeout: float = 60, check: bool = True,
                   **extra_env: str) -> subprocess.CompletedProcess[str]:
        # A file, not `-c`: spawned children must be able to import the main module.
        script = self.root / "main.py"
        script.write_text(textwrap.dedent(code))
        proc = subprocess.run([sys.executable, str(script)], cwd=self.root,
                              env=self.env(**extra_env), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def runs(self) -> dict[int, Run]:
        return read_records(self.prof_dir)

    def single_run(self) -> Run:
        """The one process file the test expects."""
        runs = self.runs()
        assert len(runs) == 1, runs
        return next(iter(runs.values()))
