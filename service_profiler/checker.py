"""`service-profiler check`: verify a symbols YAML against an engine's source, without importing it.

Importing vLLM takes seconds, pulls torch and may touch devices; a typo in a symbol should be found
before a server is started. So every symbol is found by reading source files with `ast`: those of the
installed package (located through its top-level package only, which imports nothing), of a source tree
(`--source DIR`), or of a wheel/sdist (`--source x.whl|x.tar.gz`, members read in place).

A method is found in its class body, in a nested class, or in a base class followed through the
module's imports (`from x import Base`, `import x as m` then `m.Base`, re-exports, `*` imports).
Version windows are checked against `--engine-version`, the wheel/sdist metadata, or the installed
distribution. Custom handlers are imported (they are ours, not the engine's) and must be callable.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import os
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from service_profiler.runtime import envvars
from service_profiler.runtime.symbols import (
    TIMER,
    SymbolSpec,
    installed_version,
    load_symbols,
    parse_symbol,
    resolve_symbols_path,
    version_gate,
)

OK, MISSING, GATED, HANDLER_ERROR = "ok", "missing", "gated", "handler_error"
NOT_WRAPPABLE = "not_wrappable"
"""A class: the runtime refuses to wrap one (a function in its place breaks isinstance/subclassing)."""
_MAX_DEPTH = 12  # import/inheritance hops; also breaks import cycles


@dataclass
class CheckEntry:
    symbol: str
    status: str
    """ok, missing, gated (outside its version window: skipped by design), handler_error or
    not_wrappable."""
    detail: str
    source: str


@dataclass
class CheckReport:
    yaml_path: str
    tree: str
    entries: list[CheckEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Problems of the YAML itself (skipped entries, syntax errors)."""

    @property
    def ok(self) -> bool:
        """No YAML problem, nothing missing, every handler importable. Gated entries are fine: a YAML
        legitimately carries entries for other engine versions."""
        return not self.problems and all(entry.status in (OK, GATED) for entry in self.entries)

    def format(self) -> str:
        width = min(max([len(e.symbol) for e in self.entries] + [6]), 72)
        lines = [f"Checking {self.yaml_path} against {self.tree}", "",
                 f"{'STATUS':<14} {'SYMBOL':<{width}}  DETAIL"]
        lines += [f"{e.status:<14} {e.symbol:<{width}}  {e.detail}" for e in self.entries]
        if self.problems:
            lines += ["", "Problems in the YAML:"] + [f"  {problem}" for problem in self.problems]
        counts = {status: sum(e.status == status for e in self.entries)
                  for status in (OK, MISSING, GATED, HANDLER_ERROR, NOT_WRAPPABLE)}
        if not counts[NOT_WRAPPABLE]:
            del counts[NOT_WRAPPABLE]
        lines += ["", ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items())
                  + f", {len(self.problems)} YAML problem(s): " + ("OK" if self.ok else "FAILED")]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- source trees


class SourceTree:
    """Python source files by dotted module name. Subclasses say where top-level packages live."""

    label = ""
    installed = False
    """True for the installed packages: versions come from the installed distributions."""
    distribution: tuple[str, str] | None = None
    """(name, version) from the archive's metadata, for the packages it contains."""

    def roots(self, top: str) -> list[str]:
        """Paths of the top-level package directory (or `top.py`), best first."""
        raise NotImplementedError

    def read(self, path: str) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release open archives."""

    def module_source(self, module: str) -> tuple[str, str, bool] | None:
        """(display path, text, is_package) of `module`, or None."""
        top, *rest = module.split(".")
        for root in self.roots(top):
            if root.endswith(".py"):
                candidates = [] if rest else [(root, False)]
            else:
                base = "/".join([root, *rest])
                candidates = [(base + ".py", False), (base + "/__init__.py", True)]
            for path, is_package in candidates:
                text = self.read(path)
                if text is not None:
                    shown = "/".join([top, *rest]) + ("/__init__.py" if is_package else ".py")
                    return (shown if rest or is_package else f"{top}.py"), text, is_package
        return None


def _read_file(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class InstalledTree(SourceTree):
    label = "installed packages"
    installed = True

    def roots(self, top: str) -> list[str]:
        # find_spec of a *top-level* name only consults finders; it executes nothing. (For a dotted
        # name it would import the parents, which is exactly what this module avoids.)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return []
        if spec is None:
            return []
        if spec.submodule_search_locations:
            return [str(location) for location in spec.submodule_search_locations]
        return [spec.origin] if spec.origin and spec.origin.endswith(".py") else []

    def read(self, path: str) -> str | None:
        return _read_file(path)


class DirectoryTree(SourceTree):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.label = str(directory)

    def roots(self, top: str) -> list[str]:
        candidates = [self.directory / top, self.directory / "src" / top,
                      self.directory / f"{top}.py", self.directory / "src" / f"{top}.py"]
        if self.directory.name == top:  # pointed at the package itself
            candidates.insert(0, self.directory)
        return [str(path) for path in candidates if path.exists()]

    def read(self, path: str) -> str | None:
        return _read_file(path)


def _in_test_directory(path: str) -> bool:
    return any(part in ("test", "tests", "testing") for part in path.split("/")[:-1])


class ArchiveTree(SourceTree):
    """A wheel (zip) or an sdist (tar.*): member names are listed once, members read on demand."""

    def __init__(self, archive: Path) -> None:
        self.label = str(archive)
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(archive):
            self._zip = zipfile.ZipFile(archive)
            self.names = set(self._zip.namelist())
        else:
            # Kept open for on-demand reads until close(); raises tarfile.TarError for a non-archive.
            self._tar = tarfile.open(archive, "r:*")  # noqa: SIM115
            self.names = {member.name for member in self._tar.getmembers() if member.isfile()}
        self.distribution = self._metadata()

    def _metadata(self) -> tuple[str, str] | None:
        # Wheel: <name>.dist-info/METADATA; sdist: <name>-<version>/PKG-INFO.
        for name in sorted(self.names, key=lambda n: n.count("/")):
            if name.endswith(".dist-info/METADATA") or (name.endswith("/PKG-INFO") and name.count("/") == 1):
                fields = dict(line.split(": ", 1) for line in (self.read(name) or "").splitlines()
                              if ": " in line and not line.startswith(" "))
                if "Name" in fields and "Version" in fields:
                    return fields["Name"].strip(), fields["Version"].strip()
        return None

    def roots(self, top: str) -> list[str]:
        found = [name[: -len("/__init__.py")] for name in self.names
                 if name == f"{top}/__init__.py" or name.endswith(f"/{top}/__init__.py")]
        found += [name for name in self.names if name == f"{top}.py" or name.endswith(f"/{top}.py")]
        # Best first: the shallowest copy; among equally deep ones (an sdist's src/ and tests/ copies), the
        # one outside test directories, then the one with the most files. Never set order (hash-seeded).
        return sorted(found, key=lambda root: (root.count("/"), _in_test_directory(root),
                                               -self._files_under(root), root))

    def _files_under(self, root: str) -> int:
        if root.endswith(".py"):
            return 1
        prefix = root + "/"
        return sum(1 for name in self.names if name.startswith(prefix))

    def read(self, path: str) -> str | None:
        if path not in self.names:
            return None
        try:
            if self._zip is not None:
                data = self._zip.read(path)
            else:
                assert self._tar is not None
                handle = self._tar.extractfile(path)
                data = handle.read() if handle is not None else b""
            return data.decode("utf-8")
        except (OSError, KeyError, UnicodeDecodeError, tarfile.TarError, zipfile.BadZipFile):
            return None

    def close(self) -> None:
        for archive in (self._zip, self._tar):
            if archive is not None:
                archive.close()


def open_tree(source: Path | None) -> SourceTree:
    """The tree for `--source` (a directory, a .whl, a .tar.gz), or the installed packages."""
    if source is None:
        return InstalledTree()
    if source.is_dir():
        return DirectoryTree(source)
    return ArchiveTree(source)


# ----------------------------------------------------------------------------------------- resolver


@dataclass
class _Module:
    name: str
    package: str
    """The package relative imports start from."""
    path: str
    scope: dict[str, ast.AST]
    """Module-level bindings: def/class/assignment nodes, or import nodes for imported names."""
    stars: list[str]


@dataclass
class _Target:
    kind: str  # "class", "function", "value", "module"
    module: str
    qualname: tuple[str, ...]
    node: ast.AST | None
    path: str
    via: str = ""  # "inherited from m:C" / "re-exported from m"


def _bindings(body: list[ast.stmt]) -> list[tuple[str, ast.AST]]:
    """Names bound by statements, looking into if/try/with blocks (version switches live there) but not
    into functions. Definitions and imports come after plain assignments, so that in a dict they win
    over a `try: from x import A / except ImportError: A = object` fallback."""
    defs: list[tuple[str, ast.AST]] = []
    values: list[tuple[str, ast.AST]] = []
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs.append((stmt.name, stmt))
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            defs += [((alias.asname or alias.name).split(".")[0], stmt) for alias in stmt.names]
        elif isinstance(stmt, ast.Assign):
            values += [(t.id, stmt) for t in stmt.targets if isinstance(t, ast.Name)]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
            values.append((stmt.target.id, stmt))
        elif isinstance(stmt, ast.If | ast.Try | ast.With):
            for block in (stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", []),
                          *(handler.body for handler in getattr(stmt, "handlers", []))):
                for name, node in _bindings(block):
                    (values if isinstance(node, ast.Assign | ast.AnnAssign) else defs).append((name, node))
    return values + defs


class Resolver:
    def __init__(self, tree: SourceTree) -> None:
        self.tree = tree
        self._modules: dict[str, _Module | None] = {}
        self.syntax_errors: dict[str, str] = {}

    def module(self, name: str) -> _Module | None:
        if name not in self._modules:
            self._modules[name] = None  # also guards against import cycles while parsing
            found = self.tree.module_source(name)
            if found is not None:
                path, text, is_package = found
                try:
                    body = ast.parse(text, filename=path).body
                except (SyntaxError, ValueError) as exc:
                    line = getattr(exc, "lineno", None)
                    self.syntax_errors[name] = f"{path}{f':{line}' if line else ''}: {exc}"
                    return None
                package = name if is_package else name.rpartition(".")[0]
                stars = [self._absolute(package, stmt) for stmt in ast.walk(ast.Module(body, []))
                         if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names)]
                self._modules[name] = _Module(name, package, path, dict(_bindings(body)), stars)
        return self._modules[name]

    @staticmethod
    def _absolute(package: str, stmt: ast.ImportFrom) -> str:
        if not stmt.level:
            return stmt.module or ""
        base = package.split(".")
        base = base[: len(base) - (stmt.level - 1)] if stmt.level > 1 else base
        return ".".join([*base, stmt.module] if stmt.module else base)

    def lookup(self, module: str, name: str, depth: int = 0) -> _Target | None:
        """What `name` is at module level in `module`, following imports."""
        info = self.module(module)
        if info is None or depth > _MAX_DEPTH:
            return None
        node = info.scope.get(name)
        if node is None:
            for star in info.stars:
                target = self.lookup(star, name, depth + 1)
                if target is not None:
                    target.via = target.via or f"re-exported from {target.module}"
                    return target
            return None
        if isinstance(node, ast.ClassDef):
            return _Target("class", module, (name,), node, info.path)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return _Target("function", module, (name,), node, info.path)
        if isinstance(node, ast.Import):
            alias = next(a for a in node.names if (a.asname or a.name).split(".")[0] == name)
            target_module = alias.name if alias.asname else name
            return _Target("module", target_module, (), None, target_module)
        if isinstance(node, ast.ImportFrom):
            source = self._absolute(info.package, node)
            alias = next(a for a in node.names if (a.asname or a.name) == name)
            target = self.lookup(source, alias.name, depth + 1)
            if target is None and self.module(f"{source}.{alias.name}") is not None:
                return _Target("module", f"{source}.{alias.name}", (), None, f"{source}.{alias.name}")
            if target is not None and not target.via and target.module != module:
                target.via = f"re-exported from {target.module}"
            return target
        return _Target("value", module, (name,), node, info.path)

    def member(self, owner: _Target, name: str, depth: int = 0) -> tuple[_Target | None, list[str]]:
        """`name` on `owner` (a class or a module); for a class, its bases are searched too. Also returns
        the bases that could not be followed, for the message."""
        if owner.kind == "module":
            return self.lookup(owner.module, name, depth + 1), []
        if owner.kind != "class" or depth > _MAX_DEPTH:
            return None, []
        assert isinstance(owner.node, ast.ClassDef)
        for bound, node in reversed(_bindings(owner.node.body)):
            if bound == name and not isinstance(node, ast.Import | ast.ImportFrom):
                kind = {ast.ClassDef: "class", ast.FunctionDef: "function",
                        ast.AsyncFunctionDef: "function"}.get(type(node), "value")
                return _Target(kind, owner.module, (*owner.qualname, name), node, owner.path), []
        unresolved: list[str] = []
        for base_expr in owner.node.bases:
            base = self._expression(owner.module, base_expr, depth + 1)
            if base is None or base.kind != "class":
                text = ast.unparse(base_expr)
                if text not in ("object", "ABC", "Generic", "Protocol") and not text.startswith("Generic["):
                    unresolved.append(text)
                continue
            found, missed = self.member(base, name, depth + 1)
            unresolved += missed
            if found is not None:
                if not found.via:
                    found.via = f"inherited from {found.module}:{'.'.join(found.qualname[:-1])}"
                return found, unresolved
        return None, unresolved

    def _expression(self, module: str, expr: ast.expr, depth: int) -> _Target | None:
        """A base-class expression: `Base`, `pkg.mod.Base`, `Base[T]`."""
        if isinstance(expr, ast.Subscript):
            return self._expression(module, expr.value, depth)
        if isinstance(expr, ast.Name):
            return self.lookup(module, expr.id, depth)
        if isinstance(expr, ast.Attribute):
            owner = self._expression(module, expr.value, depth)
            if owner is None:
                return None
            if owner.kind == "module" and self.module(f"{owner.module}.{expr.attr}") is not None:
                found = self.lookup(owner.module, expr.attr, depth)
                return found or _Target("module", f"{owner.module}.{expr.attr}", (), None, "")
            return self.member(owner, expr.attr, depth)[0]
        return None

    def resolve(self, module: str, qualname: tuple[str, ...]) -> tuple[_Target | None, str]:
        """The definition of module:qualname, or None and why not."""
        info = self.module(module)
        if info is None:
            top = module.split(".")[0]
            if not self.tree.roots(top):
                return None, f"package {top} not found in {self.tree.label}"
            if module in self.syntax_errors:
                return None, f"module {module} cannot be parsed ({self.syntax_errors[module]})"
            return None, f"module {module} not found in {self.tree.label} (no .py source for it)"
        owner: _Target | None = None  # the class (or module) the missing part was looked up in
        target = self.lookup(module, qualname[0])
        reexported = target.via if target is not None else ""
        missing, unresolved = qualname[0], list[str]()
        for index, part in enumerate(qualname[1:], 1):
            if target is None:
                break
            if target.kind not in ("class", "module"):
                return None, f"{'.'.join(qualname[:index])} is not a class ({target.path}:{_lineno(target)})"
            owner, missing = target, part
            target, unresolved = self.member(target, part)
        if target is None:
            if owner is None:
                detail, names = f"{missing} is not defined in module {module}", list(info.scope)
            else:
                owner_name = ".".join(owner.qualname) or owner.module
                detail = f"{missing} is not defined in {owner_name} ({owner.path}:{_lineno(owner)})"
                detail += " or its bases" if _bases(owner) else ""
                names = _member_names(owner)
            close = difflib.get_close_matches(missing, names, n=1)
            detail += f"; did you mean {close[0]}?" if close else ""
            return None, detail + (f"; bases not followed: {', '.join(unresolved)}" if unresolved else "")
        if reexported and reexported not in target.via:
            target.via = "; ".join(filter(None, (reexported, target.via)))
        if target.kind == "module":
            return None, f"{':'.join([module, '.'.join(qualname)])} is a module, not a function"
        return target, ""


def _bases(target: _Target | None) -> bool:
    return target is not None and isinstance(target.node, ast.ClassDef) and bool(target.node.bases)


def _member_names(target: _Target) -> list[str]:
    return [name for name, _ in _bindings(target.node.body)] if isinstance(target.node, ast.ClassDef) else []


def _lineno(target: _Target) -> int:
    return getattr(target.node, "lineno", 0)


def _describe(target: _Target) -> str:
    text = f"{target.path}:{_lineno(target)}"
    node = target.node
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        decorators = {ast.unparse(d) for d in node.decorator_list}
        if "property" in decorators or "cached_property" in decorators:
            text += " (a property: its getter is what gets wrapped)"
    elif target.kind == "value":
        text += " (assigned, not a def: checked at patch time)"
    return text + (f" ({target.via})" if target.via else "")


# ---------------------------------------------------------------------------------------------- check


def _check_handler(handler: str) -> str | None:
    module_name, qualname = parse_symbol(handler)
    try:
        value: object = importlib.import_module(module_name)
        for part in qualname:
            value = getattr(value, part)
    except Exception as exc:  # any failure to import is the finding, whatever its type
        return f"handler {handler}: {type(exc).__name__}: {exc}"
    return None if callable(value) else f"handler {handler} is not callable"


def check_symbols(yaml_path: str | Path, source: Path | None = None,
                  engine_version: str | None = None) -> CheckReport:
    """Check every entry of the YAML at `yaml_path` against `source` (None: the installed packages)."""
    loaded = load_symbols(yaml_path)
    tree = open_tree(source)
    resolver = Resolver(tree)
    report = CheckReport(str(yaml_path), tree.label, problems=list(loaded.problems))
    engines: dict[str, None] = {}
    try:
        for spec in loaded.specs:
            report.entries.append(_check_one(spec, tree, resolver, engine_version, engines))
    finally:
        tree.close()
    if engines:
        report.tree += f" ({', '.join(engines)})"
    return report


def _check_one(spec: SymbolSpec, tree: SourceTree, resolver: Resolver, engine_version: str | None,
               engines: dict[str, None]) -> CheckEntry:
    top = spec.module.split(".")[0]
    dist: tuple[str | None, str] | None
    if engine_version is not None:
        dist = (None, engine_version)
    elif tree.distribution is not None and tree.roots(top):
        dist = tree.distribution
    elif tree.installed:
        dist = installed_version(spec.module)
    else:
        dist = None
    if dist is not None:
        engines[f"{dist[0]} {dist[1]}" if dist[0] else f"version {dist[1]} from --engine-version"] = None
    note = ""
    if spec.min_version or spec.max_version:
        if dist is None:
            note = " (version window not checked: engine version unknown; pass --engine-version)"
        else:
            reason = version_gate(spec, dist[1], engine=dist[0])
            if reason is not None:
                return CheckEntry(spec.symbol, GATED, reason, spec.source)
    target, why = resolver.resolve(spec.module, spec.qualname)
    handler_error = _check_handler(spec.handler) if spec.handler != TIMER else None
    if target is None:
        return CheckEntry(spec.symbol, MISSING, why + (f"; {handler_error}" if handler_error else ""),
                          spec.source)
    if handler_error is not None:
        return CheckEntry(spec.symbol, HANDLER_ERROR, handler_error, spec.source)
    if target.kind == "class":
        name = ".".join(spec.qualname)
        return CheckEntry(spec.symbol, NOT_WRAPPABLE, (
            f"{target.path}:{_lineno(target)}: {name} is a class, which the profiler does not wrap (a function "
            f"in its place breaks isinstance and subclassing); name {spec.module}:{name}.__init__ or one of "
            "its methods instead"), spec.source)
    return CheckEntry(spec.symbol, OK, _describe(target) + note, spec.source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("symbols", nargs="?", type=Path,
                        help=f"symbols YAML to check (default: the file the profiler would use: "
                             f"{envvars.PROFILING_SYMBOLS_PATH}, the user file, or the shipped default)")
    parser.add_argument("--source", type=Path, metavar="PATH",
                        help="engine source to check against: a source directory, a .whl or an sdist "
                             "(.tar.gz); default: the installed packages")
    parser.add_argument("--engine-version", metavar="VERSION",
                        help="engine version for min_version/max_version (default: from --source's "
                             "metadata or the installed distribution)")


def run(args: argparse.Namespace) -> int:
    yaml_path: Path | None = args.symbols
    if yaml_path is None:
        resolved = resolve_symbols_path(os.environ)
        for problem in resolved.problems:
            print(problem, file=sys.stderr)
        if resolved.path is None:
            return 1
        yaml_path = resolved.path
    if args.source is not None and not args.source.exists():
        print(f"--source {args.source}: no such file or directory", file=sys.stderr)
        return 1
    try:
        report = check_symbols(yaml_path, args.source, args.engine_version)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        print(f"--source {args.source}: cannot read it as a directory, wheel or sdist ({exc})",
              file=sys.stderr)
        return 1
    print(report.format())
    return 0 if report.ok else 1
