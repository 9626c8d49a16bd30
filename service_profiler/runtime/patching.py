"""Lazy patching: a post-import hook wraps each target when its module is imported.

Importing the profiler, or a parent package of a target, never imports the target: the hook only
watches the exact module names of the symbols. Modules already imported are patched at once. Targets
are reached through their class (`Outer.Inner.method`) and replaced by name on that class, keeping the
raw descriptor (function, classmethod, staticmethod) so binding stays right and unpatching restores
exactly what was there. Patch and unpatch are idempotent.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_MISSING = object()


class PatchError(Exception):
    """A symbol that cannot be patched; the message says why."""


class AlreadyPatched(PatchError):
    """The target is a wrapper of ours, e.g. a method inherited from a class patched by another entry."""


@dataclass
class ResolvedTarget:
    owner: Any  # the class or module that will hold the wrapper
    attr: str
    raw: Any  # what `owner.__dict__` (or an ancestor's) holds: function, classmethod, staticmethod
    inherited: bool  # the raw object lives on a base class, not on `owner`
    function: Callable[..., Any]  # the plain function inside `raw`
    is_method: bool  # the wrapper receives self/cls as args[0]
    kind: str  # "function", "method", "classmethod", "staticmethod", "callable" (does not bind)


def resolve(module: types.ModuleType, qualname: Sequence[str],
            is_ours: Callable[[Any], bool] = lambda raw: False) -> ResolvedTarget:
    """Find `qualname` (e.g. ("Outer", "Inner", "method")) inside an imported module."""
    owner: Any = module
    for part in qualname[:-1]:
        try:
            owner = inspect.getattr_static(owner, part)
        except AttributeError:
            raise PatchError(f"{module.__name__} has no attribute path {'.'.join(qualname)!r} "
                             f"(stopped at {part!r})") from None
        if not isinstance(owner, type):
            raise PatchError(f"{'.'.join(qualname)}: {part!r} is a {type(owner).__name__}, not a class")
    attr = qualname[-1]
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attr in klass.__dict__:
                raw = klass.__dict__[attr]
                inherited = klass is not owner
                break
        else:
            raise PatchError(f"class {owner.__qualname__} has no attribute {attr!r}")
    else:
        raw = owner.__dict__.get(attr, _MISSING)
        if raw is _MISSING:
            raise PatchError(f"module {module.__name__} has no attribute {attr!r}")
        inherited = False
    inner = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    if is_ours(inner):
        raise AlreadyPatched(f"{'.'.join(qualname)} is already wrapped (inherited from a class patched by "
                             "another entry, which records it)")
    return _classify(owner, attr, raw, inherited)


def _classify(owner: Any, attr: str, raw: Any, inherited: bool) -> ResolvedTarget:
    in_class = isinstance(owner, type)
    where = f"{owner.__qualname__ if in_class else owner.__name__}.{attr}"
    if isinstance(raw, type):
        # A function in a class's place would break isinstance(), subclassing and every caller that
        # expects a class (vLLM's get_scheduler_cls, for one).
        raise PatchError(f"{where} is a class, which cannot be wrapped; name its constructor "
                         f"({where}.__init__) or one of its methods instead")
    if isinstance(raw, classmethod):
        return ResolvedTarget(owner, attr, raw, inherited, raw.__func__, True, "classmethod")
    if isinstance(raw, staticmethod):
        return ResolvedTarget(owner, attr, raw, inherited, raw.__func__, False, "staticmethod")
    if isinstance(raw, types.FunctionType):
        kind = "method" if in_class else "function"
        return ResolvedTarget(owner, attr, raw, inherited, raw, in_class, kind)
    if callable(raw) and not hasattr(type(raw), "__get__") and not in_class and _introspected_kind(raw):
        # e.g. a module-level partial of an `async def`: inspect.iscoroutinefunction sees through a
        # partial but not through a staticmethod object, so this one is installed as the bare wrapper.
        return ResolvedTarget(owner, attr, raw, inherited, raw, False, "function")
    if callable(raw) and not hasattr(type(raw), "__get__"):
        # A functools.partial, a builtin function, a callable object: none of them binds to an
        # instance, so the wrapper is installed as a staticmethod (callable, never bound) and
        # `obj.attr(...)`, `module.attr(...)` or a copy put on another class pass the same arguments.
        return ResolvedTarget(owner, attr, raw, inherited, raw, False, "callable")
    if callable(raw):
        raise PatchError(f"{where} is a {type(raw).__name__}, which binds in its own way; name the "
                         "function it calls instead")
    raise PatchError(f"{where} is a {type(raw).__name__}, not callable; only functions, methods, "
                     "classmethods, staticmethods and other callables can be wrapped")


def _introspected_kind(raw: Any) -> bool:
    return inspect.iscoroutinefunction(raw) or inspect.isgeneratorfunction(raw) or inspect.isasyncgenfunction(raw)


def install(target: ResolvedTarget, wrapper: Callable[..., Any]) -> Any:
    """Put `wrapper` in place of the target; returns what was installed (for `uninstall`)."""
    if target.kind == "classmethod":
        installed: Any = classmethod(wrapper)
    elif target.kind in ("staticmethod", "callable"):
        installed = staticmethod(wrapper)
    else:
        installed = wrapper
    setattr(target.owner, target.attr, installed)
    return installed


def uninstall(target: ResolvedTarget, installed: Any) -> bool:
    """Restore the original, unless somebody else replaced our wrapper meanwhile."""
    current = target.owner.__dict__.get(target.attr, _MISSING)
    if current is not installed:
        return False
    if target.inherited:
        delattr(target.owner, target.attr)
    else:
        setattr(target.owner, target.attr, target.raw)
    return True


class PostImportHook(importlib.abc.MetaPathFinder):
    """Calls `on_import(module)` right after a watched module finishes executing.

    It never imports anything itself. The callback runs inside its own try/except: an exception
    escaping an import hook would break the engine's import.
    """

    def __init__(self, on_import: Callable[[types.ModuleType], None]) -> None:
        self._on_import = on_import
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()

    def watch(self, module_name: str) -> None:
        with self._lock:
            self._watched.add(module_name)

    def unwatch(self, module_name: str) -> None:
        with self._lock:
            self._watched.discard(module_name)

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._watched or getattr(self._local, "busy", False):
            return None
        # Ask the rest of sys.meta_path for the real spec; guard against finding ourselves again.
        self._local.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _NotifyingLoader(spec.loader, self._notify)
        return spec

    def _notify(self, module: types.ModuleType) -> None:
        try:
            self._on_import(module)
        except Exception as exc:  # never break the engine's import
            print(f"service-profiler: patching {module.__name__} failed: {exc!r}", file=sys.stderr)


class _NotifyingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, notify: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._notify = notify

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        result: types.ModuleType | None = self._loader.create_module(spec)
        return result

    def exec_module(self, module: types.ModuleType) -> None:
        # Give the real loader back to the module so its __loader__/__spec__ look untouched.
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        self._loader.exec_module(module)
        self._notify(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
