"""Fuzz the two loaders a user feeds by hand: the JSON config and the symbols YAML.

Random and mutated inputs (including the shapes that once escaped as bare exceptions: a 5,000-digit
integer, NUL and form-feed characters, 100k-deep nesting, a NUL in prof_dir) must always give a valid
result or a clear message naming the file, never an exception. Seeds are fixed: a failure reproduces.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from service_profiler.runtime.settings import ProfilerSettings, load_settings, shipped_default_text
from service_profiler.runtime.shipped import engines_dir
from service_profiler.runtime.symbols import SymbolSpec, parse_symbols

HOSTILE = ["\x00", "\x0c", "\x1b", "\ud800", "9" * 5000, "-" + "9" * 5000, "[" * 100_000, "{" * 50_000,
           "\"a\\u0000b\"", "1e999", "NaN", "-Infinity", "\ufeff", "\u2028", "!!python/object:os.system",
           "*alias", "&anchor", "<<: *x", "? ", "%YAML 1.1\n", "---\n", "...\n", "'", "\"", "\\", ":", "-",
           "\t", "\r", "\n" * 3]


def _mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(text))
        choice = rng.random()
        if choice < 0.4:
            text = text[:position] + rng.choice(HOSTILE) + text[position:]
        elif choice < 0.6:
            text = text[:position] + text[position + rng.randint(1, 40):]
        elif choice < 0.8:
            text = text[:position] + chr(rng.randint(0, 0x2FFF)) + text[position + 1:]
        else:
            text = text[:position]
    return text


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(HOSTILE + list("abc{}[]:,\"' 019-.\n")) for _ in range(rng.randint(0, 60)))


def _config_cases() -> list[str]:
    rng = random.Random(20261206)
    base = shipped_default_text()
    cases = [
        '{"enable": 0, "timelimit": ' + "9" * 5000 + "}",
        '{"enable": 0, "flush_interval_s": ' + "9" * 5000 + ".5}",
        '{"enable": 1, "prof_dir": "/tmp/a\\u0000b"}',
        '{"enable": 1, "prof_dir": "/tmp/a\\nb"}',
        "[" * 100_000 + "]" * 100_000,
        '{"enable": 0, "domain": ' + "[" * 5000 + "]" * 5000 + "}",
        "\x00\x0c",
        '{"enable": "\\ud800"}',
    ]
    cases += [_mutate(base, rng) for _ in range(150)]
    cases += [_random_text(rng) for _ in range(50)]
    return cases


def test_the_config_loader_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    for index, text in enumerate(_config_cases()):
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        result = load_settings(path)  # must not raise, whatever the text
        assert isinstance(result.settings, ProfilerSettings), index
        assert "\x00" not in result.settings.prof_dir, index
        for problem in result.problems:
            assert problem.startswith(str(path)) and len(problem) < 2000, (index, problem[:300])
        if result.failed:
            assert not result.settings.enable and result.problems, index


def test_known_shapes_name_the_key_and_keep_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"enable": 0, "timelimit": ' + "9" * 5000 + ', "flush_interval_s": 2}')
    result = load_settings(path)
    assert not result.failed and not result.settings.enable and result.settings.flush_interval_s == 2.0
    assert result.problems == [f'{path}: "timelimit" = 999999999999... (an integer of 5000 digits) is out of range; '
                               'expected an integer 0..7200 (seconds, 0 = unlimited); using 0']
    path.write_text(json.dumps({"enable": 1, "prof_dir": "/tmp/a\x00b"}))
    result = load_settings(path)
    assert result.settings.enable and "\x00" not in result.settings.prof_dir
    assert "contains a NUL or control character" in result.problems[0]
    path.write_text("[" * 100_000 + "]" * 100_000)
    result = load_settings(path)
    assert result.failed and "nested too deeply" in result.problems[0]


def _symbols_cases() -> list[str]:
    rng = random.Random(61206)
    base = (engines_dir() / "vllm" / "vllm_v1.yaml").read_text(encoding="utf-8")
    cases = [
        "- symbol: a.b:c\x00\n",
        "- symbol: a.b:c\n  domain: x\x0cy\n",
        "- symbol: a.b:c\n  attributes: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "- symbol: a.b:c\n  domain: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n",
        "- symbol: a.b:c\n  min_version: " + "1" * 5000 + "\n",
        "- symbol: a.b:c\n  attributes: [{name: x, expr: '" + "1" * 5000 + "'}]\n",
        "- symbol: a.b:c\n  attributes: [{name: x, expr: 'args[" + "9" * 5000 + "]'}]\n",
        "- &a [*a]\n",
        "- symbol: !!python/object/apply:os.system ['true']\n",
    ]
    cases += [_mutate(base, rng) for _ in range(120)]
    cases += [_random_text(rng) for _ in range(60)]
    return cases


def test_the_symbols_loader_never_raises() -> None:
    for index, text in enumerate(_symbols_cases()):
        result = parse_symbols(text, "fuzz.yaml")  # must not raise, whatever the text
        assert all(isinstance(spec, SymbolSpec) for spec in result.specs), index
        for problem in result.problems:
            assert problem.startswith("fuzz.yaml") and len(problem) < 2000, (index, problem[:300])
        for spec in result.specs:
            assert spec.module and spec.qualname and spec.source.startswith("fuzz.yaml"), index


@pytest.mark.parametrize("text", [
    "- symbol: a.b:c\x00\n",
    "- symbol: a.b:c\n  attributes: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "- symbol: a.b:c\n  attributes: [{name: x, expr: '" + "1" * 5000 + "'}]\n",
], ids=["nul", "deep", "huge-int"])
def test_check_gives_a_message_not_a_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / "symbols.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "service_profiler.cli", "check", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 1 and str(path) in proc.stdout
