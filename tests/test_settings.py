from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from service_profiler.runtime.settings import (
    ProfilerSettings,
    load_settings,
    settings_from_mapping,
    shipped_default_text,
    unsupported_options,
)


def write(tmp_path: Path, data: object, name: str = "cfg.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_missing_file_is_created_from_shipped_defaults(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ms_service_profiler_config.json"
    first = load_settings(path)
    assert first.created and first.problems == []
    assert first.settings == ProfilerSettings()
    assert path.read_text(encoding="utf-8") == shipped_default_text()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    again = load_settings(path)
    assert not again.created and again.problems == [] and again.settings == ProfilerSettings()


def test_shipped_defaults_match_dataclass_and_cover_every_field() -> None:
    shipped = json.loads(shipped_default_text())
    assert set(shipped) == {f.name for f in dataclasses.fields(ProfilerSettings)}
    result = settings_from_mapping(shipped, "default_config.json")
    assert result.problems == []
    assert result.settings == ProfilerSettings()
    assert shipped["enable"] == 0 and shipped["prof_dir"] == "$HOME/.ms_service_profiler"


def test_every_documented_field_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "enable": 1, "prof_dir": str(tmp_path / "out"), "profiler_level": "info",
        "host_system_usage_freq": 50, "npu_memory_usage_freq": 1, "acl_task_time": 2,
        "acl_prof_task_time_level": "L1,10", "api_filter": "matmul;add", "kernel_filter": "gemm",
        "timelimit": 7200, "domain": "Request; KVCache", "console_every_n_steps": 10,
        "flush_interval_s": 2, "max_buffered_records": 5000,
    })
    result = load_settings(path)
    assert result.problems == []
    s = result.settings
    assert s.enable is True and s.prof_dir == str(tmp_path / "out") and s.profiler_level == "INFO"
    assert (s.host_system_usage_freq, s.npu_memory_usage_freq, s.acl_task_time) == (50, 1, 2)
    assert (s.acl_level, s.acl_duration_s) == ("L1", 10)
    assert s.api_filter == ("matmul", "add") and s.kernel_filter == ("gemm",)
    assert s.timelimit == 7200 and s.domain == frozenset({"Request", "KVCache"})
    assert s.domain_enabled("Request") and not s.domain_enabled("BatchSchedule")
    assert s.console_every_n_steps == 10 and s.max_buffered_records == 5000
    assert s.flush_interval_s == 2.0 and isinstance(s.flush_interval_s, float)


@pytest.mark.parametrize(("raw", "expected"), [
    (0, False), (1, True), (True, True), (False, False), ("1", True), ("true", True), ("FALSE", False),
    (1.0, True),
])
def test_enable_accepts_switch_values(tmp_path: Path, raw: object, expected: bool) -> None:
    result = load_settings(write(tmp_path, {"enable": raw}))
    assert result.problems == [] and result.settings.enable is expected


@pytest.mark.parametrize("raw", [2, -1, "yes", None, [1]])
def test_bad_enable_is_reported_and_off(tmp_path: Path, raw: object) -> None:
    path = write(tmp_path, {"enable": raw})
    result = load_settings(path)
    assert result.settings.enable is False
    assert result.problems == [
        f'{path}: "enable" = {json.dumps(raw)} is not a switch; expected 0 or 1 (true/false also accepted); '
        f"using 0"]


def test_out_of_range_message_names_file_key_value_range_and_fallback(tmp_path: Path) -> None:
    path = write(tmp_path, {"enable": 1, "host_system_usage_freq": 80})
    result = load_settings(path)
    assert result.problems == [f'{path}: "host_system_usage_freq" = 80 is out of range; expected an integer '
                               f"1..50 (Hz) or -1 (off); using -1"]
    assert result.settings.host_system_usage_freq == -1 and result.settings.enable is True


@pytest.mark.parametrize(("key", "raw", "what"), [
    ("timelimit", True, "is not an integer"),
    ("timelimit", "10", "is not an integer"),
    ("timelimit", 7201, "is out of range"),
    ("timelimit", 1.5, "is not an integer"),
    ("npu_memory_usage_freq", 0, "is out of range"),
    ("acl_task_time", 4, "is out of range"),
    ("acl_prof_task_time_level", "L2", "is not a valid level"),
    ("acl_prof_task_time_level", "L0,1000", "is not a valid level"),
    ("acl_prof_task_time_level", "L0,0", "is not a valid level"),
    ("acl_prof_task_time_level", 1, "is not a string"),
    ("flush_interval_s", 0.05, "is out of range"),
    ("flush_interval_s", "1", "is not a number"),
    ("max_buffered_records", 10, "is out of range"),
    ("console_every_n_steps", -1, "is out of range"),
    ("profiler_level", "", "is not a non-empty string"),
    ("domain", 3, "is not a string"),
    ("api_filter", ["a", 1], "is not a string"),
])
def test_bad_value_uses_that_keys_default(tmp_path: Path, key: str, raw: object, what: str) -> None:
    path = write(tmp_path, {"enable": 1, key: raw})
    result = load_settings(path)
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert problem.startswith(f"{path}: {json.dumps(key)} = {json.dumps(raw)} {what}; expected ")
    default = json.loads(shipped_default_text())[key]
    assert problem.endswith(f"; using {json.dumps(default)}")
    assert getattr(result.settings, key) == getattr(ProfilerSettings(), key)
    assert result.settings.enable is True  # the other keys still apply


def test_invalid_json_names_line_and_column_and_keeps_collection_off(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "enable": 1,\n  "timelimit" 5\n}')
    result = load_settings(path)
    assert result.settings == ProfilerSettings()
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"{path} line 3 column 15: invalid JSON (Expecting ':' delimiter)")


@pytest.mark.parametrize("text", ["", "[1, 2]", "1"])
def test_empty_or_non_object_config_gives_defaults(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    result = load_settings(path)
    assert result.settings == ProfilerSettings() and len(result.problems) == 1
    assert result.problems[0].startswith(str(path))


def test_unknown_keys_are_one_problem_with_suggestions(tmp_path: Path) -> None:
    path = write(tmp_path, {"enabel": 1, "colour": "red", "timelimit": 5})
    result = load_settings(path)
    assert result.settings.timelimit == 5 and result.settings.enable is False
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert problem.startswith(f'{path}: unknown keys "enabel" (did you mean "enable"?), "colour" ignored')
    assert "(known keys: enable, prof_dir, profiler_level," in problem


def test_duplicate_key_is_reported_and_last_wins(tmp_path: Path) -> None:
    path = write(tmp_path, '{"enable": 0, "enable": 1}')
    result = load_settings(path)
    assert result.settings.enable is True
    assert result.problems == [f'{path}: key "enable" appears more than once; the last value (1) is used']


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"enable": 1}).encode())
    assert load_settings(path).settings.enable is True


def test_prof_dir_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROF_ROOT", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    cases = {
        "$HOME/.ms_service_profiler": tmp_path / "home" / ".ms_service_profiler",
        "~/prof": tmp_path / "home" / "prof",
        "${PROF_ROOT}/x": tmp_path / "root" / "x",
        "vllm_prof": tmp_path / "vllm_prof",  # relative: the current directory, as the reference does
    }
    for raw, expected in cases.items():
        result = settings_from_mapping({"prof_dir": raw}, "cfg.json")
        assert result.problems == [] and result.settings.prof_dir == str(expected), raw
    assert ProfilerSettings().prof_dir == str(tmp_path / "home" / ".ms_service_profiler")


def test_prof_dir_with_unset_variable_uses_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NO_SUCH_VAR_SP", raising=False)
    result = settings_from_mapping({"prof_dir": "$NO_SUCH_VAR_SP/prof"}, "cfg.json")
    assert result.settings.prof_dir == str(tmp_path / ".ms_service_profiler")
    assert result.problems == ['cfg.json: "prof_dir" = "$NO_SUCH_VAR_SP/prof" uses unset environment '
                               "variable(s) NO_SUCH_VAR_SP; set them or write the path out; using "
                               '"$HOME/.ms_service_profiler"']


@pytest.mark.parametrize(("raw", "expected"), [
    ("matmul；add", ("matmul", "add")),  # full-width separator, as typed on a Chinese keyboard
    (" matmul ; ; add;", ("matmul", "add")),
    (["matmul", "add"], ("matmul", "add")),
    ("", ()),
])
def test_filters_split_on_both_separators(raw: object, expected: tuple[str, ...]) -> None:
    result = settings_from_mapping({"kernel_filter": raw, "acl_task_time": 2}, "cfg.json")
    assert result.problems == [] and result.settings.kernel_filter == expected


def test_domain_empty_means_all() -> None:
    for raw in ("", " ; "):
        settings = settings_from_mapping({"domain": raw}, "cfg.json").settings
        assert settings.domain is None and settings.domain_enabled("Anything")
    both = settings_from_mapping({"domain": "Request；KVCache"}, "c").settings.domain
    assert both == {"Request", "KVCache"}


def test_filters_without_acl_task_time_2_are_noted() -> None:
    result = settings_from_mapping({"api_filter": "matmul"}, "cfg.json")
    assert result.settings.api_filter == ("matmul",)
    assert result.problems == ['cfg.json: "api_filter" only applies when "acl_task_time" is 2 (it is 0); '
                               "it is ignored"]


def test_acl_level_defaults() -> None:
    settings = ProfilerSettings()
    assert (settings.acl_level, settings.acl_duration_s) == ("L0", None)
    parsed = settings_from_mapping({"acl_prof_task_time_level": "l0, 5"}, "c").settings
    assert parsed.acl_prof_task_time_level == "L0,5" and parsed.acl_duration_s == 5


def test_unreadable_config_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    directory = tmp_path / "cfg.json"
    directory.mkdir()
    result = load_settings(directory)
    assert result.settings == ProfilerSettings()
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{directory}: cannot read")


def test_uncreatable_config_names_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = blocker / "cfg.json"  # parent is a file: cannot be created
    result = load_settings(path)
    assert result.settings == ProfilerSettings() and not result.created
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"{path}: the config file does not exist and could not be created")
    assert "SERVICE_PROF_CONFIG_PATH" in result.problems[0]


def test_processes_racing_to_create_the_config_all_read_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "race" / "cfg.json"
    code = ("import sys; from service_profiler.runtime.settings import load_settings; r = load_settings(sys.argv[1]);"
            "print(int(r.created), len(r.problems))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    outputs = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sum(int(created) for created, _ in outputs) == 1  # exactly one process created it
    assert all(problems == "0" for _, problems in outputs)
    assert path.read_text(encoding="utf-8") == shipped_default_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["cfg.json"]


def _messages(settings: ProfilerSettings, backend: str) -> list[str]:
    return [option.message for option in unsupported_options(settings, backend)]


def test_unsupported_on_backend() -> None:
    assert _messages(ProfilerSettings(), "cpu") == []
    busy = ProfilerSettings(npu_memory_usage_freq=10, acl_task_time=2, api_filter=("matmul", "add"))
    cpu = _messages(busy, "cpu")
    assert cpu == [
        '"npu_memory_usage_freq" = 10 has no effect on cpu: there is no device memory to sample; it is '
        "ignored (set it to -1 to silence this)",
        '"acl_task_time" = 2 has no effect on cpu: it drives Ascend CANN operator profiling, available on '
        "NPU only; it is ignored (set it to 0 to silence this)",
        '"api_filter" = "matmul;add" has no effect on cpu: it drives Ascend CANN operator profiling, '
        'available on NPU only; it is ignored (set it to "" to silence this)',
    ]
    cuda = _messages(busy, "cuda")  # device memory is sampled on CUDA
    assert [p.split(" = ")[0] for p in cuda] == ['"acl_task_time"', '"api_filter"']
    # On NPU device memory is sampled, but service-profiler drives no CANN operator profiling either.
    npu = unsupported_options(busy, "npu")
    assert [(o.key, o.reason) for o in npu] == [
        ("acl_task_time", "service-profiler does not drive CANN operator profiling (use msprof or "
                          "torch_npu.profiler for operator timings)"),
        ("api_filter", npu[0].reason)]
    with pytest.raises(ValueError, match="backend must be one of"):
        unsupported_options(busy, "tpu")


@pytest.mark.parametrize("backend", ["cpu", "cuda", "npu"])
def test_profiler_level_and_every_acl_option_reported_where_they_have_no_effect(backend: str) -> None:
    settings = settings_from_mapping({"profiler_level": "debug", "acl_task_time": 2,
                                      "acl_prof_task_time_level": "L1,5", "api_filter": "matmul",
                                      "kernel_filter": "add"}, "cfg.json").settings
    options = unsupported_options(settings, backend)
    assert [o.key for o in options] == ["profiler_level", "acl_task_time", "acl_prof_task_time_level",
                                       "api_filter", "kernel_filter"]
    assert options[0].message.startswith(f'"profiler_level" = "DEBUG" has no effect on {backend}: '
                                         "service-profiler records at one level")
    assert '"acl_prof_task_time_level" = "L1,5"' in options[2].message


def test_unsupported_reason_does_not_depend_on_the_value() -> None:
    # The runtime reports each (key, reason) once per process, so another value must not look new.
    one, three = (unsupported_options(ProfilerSettings(acl_task_time=n), "cpu")[0] for n in (1, 3))
    assert (one.key, one.reason) == (three.key, three.reason) and one.message != three.message
