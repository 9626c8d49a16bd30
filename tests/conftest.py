from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
# examples/ holds the tiny-model maker and the real-server harness shared with the demo and benchmarks.
sys.path.insert(0, str(TESTS.parent / "examples"))

from runtime_harness import Workspace  # noqa: E402


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama made on the spot (no model hub). Needs torch + transformers: fails, never skips."""
    from tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("tiny-llama"))
