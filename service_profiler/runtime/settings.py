"""The JSON config named by `SERVICE_PROF_CONFIG_PATH`: fields, defaults, validation.

The keys are those of msserviceprofiler's documented config (`enable`, `prof_dir`, `profiler_level`,
`host_system_usage_freq`, `npu_memory_usage_freq`, `acl_task_time`, `acl_prof_task_time_level`,
`api_filter`, `kernel_filter`, `timelimit`, `domain`) plus three of our own (`console_every_n_steps`,
`flush_interval_s`, `max_buffered_records`). The shipped defaults live in `runtime/default_config.json`,
which is also what a missing config file is created from.

Loading never raises for anything a user can write: an unreadable or invalid file gives the defaults
(collection off) and a problem; a bad value gives that key's default and a problem naming the file, key,
value and accepted range. Users flip `enable` with `sed` while the server runs, so the runtime calls
`load_settings` again and again: it is cheap and has no side effects beyond creating a missing file.

Runs inside engine processes: imports only the standard library.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from service_profiler.runtime import envvars
from service_profiler.runtime.shipped import DEFAULT_CONFIG_PATH

BACKENDS = ("cpu", "cuda", "npu")


def _default_prof_dir() -> str:
    return _expand_path("$HOME/.ms_service_profiler")[0]


@dataclass(frozen=True)
class ProfilerSettings:
    """A validated config. Field defaults equal `runtime/default_config.json` (a test holds them equal)."""

    enable: bool = False
    prof_dir: str = field(default_factory=_default_prof_dir)
    """Absolute: `~` and `$VARS` expanded; a relative path is resolved against the current directory of
    the process reading the config, as msserviceprofiler does (all processes of one `vllm serve` share it)."""
    profiler_level: str = "INFO"
    host_system_usage_freq: int = -1
    """Host CPU/memory sampling rate in Hz, 1..50; -1 is off."""
    npu_memory_usage_freq: int = -1
    """Device memory sampling rate in Hz, 1..50; -1 is off. The name is msserviceprofiler's; on CUDA it
    samples GPU memory, on CPU it has nothing to sample (see `unsupported_options`)."""
    acl_task_time: int = 0
    acl_prof_task_time_level: str = ""
    api_filter: tuple[str, ...] = ()
    kernel_filter: tuple[str, ...] = ()
    timelimit: int = 0
    """Seconds of collection after it is switched on, 0..7200; 0 is unlimited."""
    domain: frozenset[str] | None = None
    """Domains to keep; None keeps all."""
    console_every_n_steps: int = 0
    """EngineCore prints a one-line live summary every N steps; 0 is off."""
    flush_interval_s: float = 0.1
    """How often the writer thread writes what was recorded. Short on purpose: a record held longer
    outlives the engine's young garbage collections, and every record kept alive that way makes them
    more frequent and longer (benchmarks/README.md, "Garbage collection in the engine")."""
    max_buffered_records: int = 1_000_000

    @property
    def acl_level(self) -> str:
        """"L0" or "L1": the level part of `acl_prof_task_time_level` (L0 when unset, as documented)."""
        return self.acl_prof_task_time_level.split(",")[0] or "L0"

    @property
    def acl_duration_s(self) -> int | None:
        """The seconds part of `acl_prof_task_time_level`, or None (until the program ends)."""
        _, _, secs = self.acl_prof_task_time_level.partition(",")
        return int(secs) if secs else None

    def domain_enabled(self, name: str) -> bool:
        return self.domain is None or name in self.domain


@dataclass
class SettingsResult:
    settings: ProfilerSettings
    problems: list[str] = field(default_factory=list)
    created: bool = False
    """True when this call created the missing config file from the shipped defaults."""
    failed: bool = False
    """The file as a whole could not be read or parsed (`settings` are the defaults): a reload keeps
    the settings it had instead."""


class _HugeInt:
    """An integer literal too long to be any setting (and past Python's int() limit): kept as its
    text so the key it belongs to gets the usual message instead of the whole file failing."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_MAX_INT_DIGITS = 30


def _parse_int(text: str) -> object:
    return _HugeInt(text) if len(text) > _MAX_INT_DIGITS else int(text)


class _Invalid(ValueError):
    """A value a key does not accept; the message says what is wrong with it ("is out of range")."""


def _expand_path(raw: str) -> tuple[str, list[str]]:
    """Expand `~` and `$VAR`/`${VAR}`; return the absolute path and the names of unset variables."""
    unset: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name == "HOME":
            # `$HOME` is the documented default; honour it even where HOME is unset (system services).
            return os.environ.get("HOME") or str(Path.home())
        value = os.environ.get(name)
        if value is None:
            unset.append(name)
            return match.group(0)
        return value

    expanded = re.sub(r"\$(?:(\w+)|\{(\w+)\})", substitute, raw)
    return os.path.abspath(os.path.expanduser(expanded)), unset


def _as_int(value: object) -> int:
    # bool is an int subclass; `"timelimit": true` is a mistake, not 1.
    if isinstance(value, bool):
        raise _Invalid("is not an integer")
    if isinstance(value, _HugeInt):
        raise _Invalid("is out of range")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise _Invalid("is not an integer")
    return value


def _int_range(lo: int, hi: int, also: tuple[int, ...] = ()) -> Callable[[object], object]:
    def convert(value: object) -> object:
        number = _as_int(value)
        if not (lo <= number <= hi or number in also):
            raise _Invalid("is out of range")
        return number

    return convert


def _float_range(lo: float, hi: float) -> Callable[[object], object]:
    def convert(value: object) -> object:
        if isinstance(value, _HugeInt):
            raise _Invalid("is out of range")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid("is not a number")
        if not lo <= value <= hi:
            raise _Invalid("is out of range")
        return float(value)

    return convert


def _enable(value: object) -> object:
    # The documented values are 0/1; JSON booleans and the strings people type into sed are accepted too.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise _Invalid("is not a switch")


def _text(value: object) -> object:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("is not a non-empty string")
    return value.strip().upper()


_TASK_TIME_LEVEL = re.compile(r"(L[01])(?:,(\d{1,3}))?")


def _task_time_level(value: object) -> object:
    if not isinstance(value, str):
        raise _Invalid("is not a string")
    text = value.replace(" ", "")
    if not text:
        return ""
    match = _TASK_TIME_LEVEL.fullmatch(text.upper())
    if match is None or (match.group(2) is not None and not 1 <= int(match.group(2)) <= 999):
        raise _Invalid("is not a valid level")
    return match.group(0)


def _split_list(value: object) -> list[str]:
    """A ";"-separated string (full-width "；" too, as typed on Chinese keyboards) or a JSON list."""
    if isinstance(value, str):
        parts = value.replace("；", ";").split(";")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        parts = value
    else:
        raise _Invalid("is not a string")
    return [part.strip() for part in parts if part.strip()]


def _substrings(value: object) -> object:
    return tuple(_split_list(value))


def _domains(value: object) -> object:
    names = _split_list(value)
    return frozenset(names) if names else None


# key -> (converter, what the key accepts, as said to the user)
_RULES: dict[str, tuple[Callable[[object], object], str]] = {
    "enable": (_enable, "0 or 1 (true/false also accepted)"),
    "prof_dir": (lambda v: v, "a directory path"),  # expanded in settings_from_mapping (needs problems)
    "profiler_level": (_text, 'a level name such as "INFO"'),
    "host_system_usage_freq": (_int_range(1, 50, (-1,)), "an integer 1..50 (Hz) or -1 (off)"),
    "npu_memory_usage_freq": (_int_range(1, 50, (-1,)), "an integer 1..50 (Hz) or -1 (off)"),
    "acl_task_time": (_int_range(0, 3), "an integer 0..3 (0 = off)"),
    "acl_prof_task_time_level": (_task_time_level, '"", "L0" or "L1", optionally ",SECONDS" (1..999)'),
    "api_filter": (_substrings, 'substrings separated by ";"'),
    "kernel_filter": (_substrings, 'substrings separated by ";"'),
    "timelimit": (_int_range(0, 7200), "an integer 0..7200 (seconds, 0 = unlimited)"),
    "domain": (_domains, 'domain names separated by ";" ("" = all)'),
    "console_every_n_steps": (_int_range(0, 1_000_000_000), "an integer >= 0 (0 = off)"),
    "flush_interval_s": (_float_range(0.1, 10.0), "a number of seconds 0.1..10"),
    "max_buffered_records": (_int_range(1_000, 100_000_000), "an integer 1000..100000000"),
}


@lru_cache(maxsize=1)
def shipped_default_text() -> str:
    """The text of `service_profiler/runtime/default_config.json`, written verbatim when the config file is missing."""
    return DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")


def _shipped_default_values() -> dict[str, object]:
    try:
        data = json.loads(shipped_default_text())
    except (OSError, ValueError):  # a broken install; the messages then just lack the default value
        return {}
    return data if isinstance(data, dict) else {}


def _show(value: object) -> str:
    if isinstance(value, _HugeInt):
        return f"{value.text[:12]}... (an integer of {len(value.text.lstrip('-'))} digits)"
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        shown = f"<{type(value).__name__} nested too deeply to show>"
    return shown if len(shown) <= 200 else shown[:200] + "..."


def settings_from_mapping(data: Mapping[str, object], source: str) -> SettingsResult:
    """Validate an already-parsed config; `source` prefixes every problem (normally the file name)."""
    problems: list[str] = []
    values: dict[str, object] = {}
    shipped = _shipped_default_values()
    for key, raw in data.items():
        rule = _RULES.get(key)
        if rule is None:
            continue
        convert, expected = rule
        try:
            value = convert(raw)
        except _Invalid as exc:
            fallback = _show(shipped[key]) if key in shipped else "the default"
            problems.append(
                f"{source}: {_show(key)} = {_show(raw)} {exc}; expected {expected}; using {fallback}")
            continue
        if key == "prof_dir":
            if not isinstance(raw, str) or not raw.strip():
                problems.append(f"{source}: {_show(key)} = {_show(raw)} is not a path; expected {expected}; "
                                f"using {_show(shipped.get(key, '$HOME/.ms_service_profiler'))}")
                continue
            if any(ord(ch) < 32 for ch in raw):
                problems.append(f"{source}: {_show(key)} = {_show(raw)} contains a NUL or control character, "
                                f"which no directory name can hold; write the path without it; using "
                                f"{_show(shipped.get(key, '$HOME/.ms_service_profiler'))}")
                continue
            value, unset = _expand_path(raw.strip())
            if unset:
                # A literal "$NAME" directory under the current directory is never what was meant.
                problems.append(f"{source}: {_show(key)} = {_show(raw)} uses unset environment variable(s) "
                                f"{', '.join(unset)}; set them or write the path out; using "
                                f"{_show(shipped.get(key, '$HOME/.ms_service_profiler'))}")
                continue
        values[key] = value

    unknown = [key for key in data if key not in _RULES]
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(_RULES), n=1)
            described.append(_show(key) + (f" (did you mean {_show(close[0])}?)" if close else ""))
        problems.append(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(described)} "
                        f"ignored (known keys: {', '.join(_RULES)})")

    settings = ProfilerSettings(**values)  # type: ignore[arg-type]  # each converter returns its field's type
    if settings.acl_task_time != 2:
        for key in ("api_filter", "kernel_filter"):
            if getattr(settings, key):
                problems.append(f"{source}: {_show(key)} only applies when \"acl_task_time\" is 2 "
                                f"(it is {settings.acl_task_time}); it is ignored")
    return SettingsResult(settings, problems)


def _reject_duplicates(source: str, problems: list[str]) -> Callable[[list[tuple[str, object]]], dict]:
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                problems.append(f"{source}: key {_show(key)} appears more than once; the last value "
                                f"({_show(value)}) is used")
            seen[key] = value
        return seen

    return hook


def _write_if_absent(path: Path, text: str) -> bool:
    """Create `path` with `text` unless it exists; True if this call created it.

    Several engine processes start at once and may all find the file missing: writing a private
    temporary file and hard-linking it into place means readers never see a half-written config and a
    file created (or already edited) by someone else is never overwritten.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links
        try:
            with open(path, "x", encoding="utf-8") as handle:
                handle.write(text)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def load_settings(path: str | Path) -> SettingsResult:
    """Read and validate the config at `path`, creating it from the shipped defaults when missing."""
    source = str(path)
    path = Path(os.path.expanduser(str(path)))
    created = False
    for _attempt in range(2):
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM left by Windows editors
            break
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a parent is a file
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                created = _write_if_absent(path, shipped_default_text())
            except OSError as exc:
                return SettingsResult(ProfilerSettings(), [
                    f"{source}: the config file does not exist and could not be created ({exc}); using the "
                    f"defaults (collection off); create the file or point "
                    f"{envvars.SERVICE_PROF_CONFIG_PATH} at a writable path"])
        except (OSError, UnicodeDecodeError) as exc:
            return SettingsResult(ProfilerSettings(), [
                f"{source}: cannot read the config file ({exc}); collection stays off until it can be read"],
                failed=True)
    else:  # created, then deleted again before we could read it: treat as the defaults
        return SettingsResult(ProfilerSettings(), [], created=created)

    problems: list[str] = []
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates(source, problems), parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        return SettingsResult(ProfilerSettings(), [
            f"{source} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); using the defaults "
            f"(collection off) until the file is fixed"], failed=True)
    except RecursionError:
        return SettingsResult(ProfilerSettings(), [
            f"{source}: values nested too deeply to read (the config is one flat object of keys and values); "
            f"using the defaults (collection off) until the file is fixed"], failed=True)
    except (ValueError, TypeError) as exc:  # whatever else the parser trips on: never a traceback
        return SettingsResult(ProfilerSettings(), [
            f"{source}: cannot read the config ({type(exc).__name__}: {exc}); using the defaults (collection "
            f"off) until the file is fixed"], failed=True)
    if not isinstance(data, dict):
        return SettingsResult(ProfilerSettings(), [
            f"{source}: the config must be a JSON object ({{\"enable\": 1, ...}}), not "
            f"{type(data).__name__}; using the defaults (collection off)"], failed=True)
    result = settings_from_mapping(data, source)
    result.problems[:0] = problems
    result.created = created
    return result


_CANN_ONLY = "it drives Ascend CANN operator profiling, available on NPU only"
_CANN_NOT_DRIVEN = ("service-profiler does not drive CANN operator profiling (use msprof or torch_npu.profiler for "
                    "operator timings)")
_UNSUPPORTED: dict[str, dict[str, str]] = {
    # key -> {backend: why it has no effect there}. msserviceprofiler hands these to its closed Ascend
    # library; we implement none of the ACL operator profiling, so on NPU they are reported too.
    "profiler_level": dict.fromkeys(BACKENDS, "service-profiler records at one level: what is recorded is set "
                                              "by the symbols YAML and \"domain\""),
    "npu_memory_usage_freq": {"cpu": "there is no device memory to sample"},
    **{key: {"cpu": _CANN_ONLY, "cuda": _CANN_ONLY, "npu": _CANN_NOT_DRIVEN}
       for key in ("acl_task_time", "acl_prof_task_time_level", "api_filter", "kernel_filter")},
}


@dataclass(frozen=True)
class UnsupportedOption:
    """An option set away from its default that has no effect on a backend."""

    key: str
    reason: str
    """Why, independent of the value: a process reports each (key, reason) once, whatever the value."""
    message: str


def unsupported_options(settings: ProfilerSettings, backend: str) -> list[UnsupportedOption]:
    """The options set away from their default that have no effect on `backend` ("cpu", "cuda",
    "npu"). Informational: the option is ignored and collection goes on."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    defaults = ProfilerSettings()
    found = []
    for key, reasons in _UNSUPPORTED.items():
        why = reasons.get(backend)
        value = getattr(settings, key)
        if why is None or value == getattr(defaults, key):
            continue
        shown = ";".join(value) if isinstance(value, tuple) else value
        found.append(UnsupportedOption(key, why, (
            f"{_show(key)} = {_show(shown)} has no effect on {backend}: {why}; it is ignored "
            f"(set it to {_show(_shipped_default_values().get(key))} to silence this)")))
    return found

