"""Optional C speedups: make an installed-but-inactive probe cost a C-level forward, not a Python call;
run a custom handler's wrapper (``HandlerCall``, see `probes.make_handler_wrapper`); record through the
runtime's recorder in one call (``Emitter``, see `record.set_sink`); encode the writer thread's record
lines (``encode_rec_line``, see `rawwriter.encode_records`).

A probe wrapper has to stay installed while collection is off, because vLLM caches bound methods at
start-up and would keep calling the wrapper anyway. The pure-Python wrapper
``def w(*args, **kwargs): if not probe.active: return fn(*args, **kwargs)`` costs one extra Python
frame plus packing ``*args``/``**kwargs`` on every call. ``ProbeSwitch`` (service_profiler/runtime/_speedups.c)
is installed in the wrapper's place instead: a C callable that forwards each call, arguments
untouched, via vectorcall to ``wrapper`` while its ``active`` flag is set and to ``original``
otherwise. It binds like a function when stored on a class, so ``Cls.method = switch`` works as an
instance method, and ``classmethod(switch)`` / ``staticmethod(switch)`` work too.

Use::

    installed, set_active = make_switch(original, wrapper)
    setattr(owner, name, installed)  # (re-wrap in classmethod/staticmethod where the original was)
    ...
    probe.active = True
    set_active(True)                 # keep the switch in step with the probe's own flag

Coroutine, generator and async-generator functions always keep their Python wrapper: a C callable
would make ``inspect.iscoroutinefunction`` & co. answer differently (see ``make_switch``).

Contract for ``wrapper``: it MUST keep checking the probe's own flag (``if not probe.active: return
fn(*args, **kwargs)``) in every case. Without the extension (no compiler at install time,
``force_python=True``, or an async/generator target) ``make_switch`` returns ``wrapper`` itself and a
no-op setter, so that check is the only switch there is. With the extension the check is still
needed: a thread that read the switch's flag just before it was cleared reaches the wrapper after
collection has stopped.

The extension is built by ``setup.py`` (``optional=True``: installs without it when no compiler is
present); in a development checkout run ``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

try:
    from service_profiler.runtime._speedups import Emitter, HandlerCall, ProbeSwitch, encode_rec_line
except ImportError:  # no compiler at install time, or a source checkout that was never built
    Emitter = HandlerCall = ProbeSwitch = encode_rec_line = None

HAVE_SPEEDUPS: bool = ProbeSwitch is not None

__all__ = ["HAVE_SPEEDUPS", "Emitter", "HandlerCall", "ProbeSwitch", "encode_rec_line", "make_switch"]


def _no_op_setter(active: bool) -> None:
    """The pure-Python wrapper checks the probe's own flag; there is nothing else to switch."""


def _kind_is_introspected(fn: Callable[..., Any]) -> bool:
    """Coroutine, generator and async-generator functions are told apart by code flags
    (inspect.iscoroutinefunction & co., which asyncio, FastAPI/Starlette and vLLM consult). A C
    callable has no code object, so installing a ProbeSwitch would change the answer; those kinds
    keep their Python wrapper (an `async def` / generator wrapper answers like the original)."""
    return (
        inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
    )


def make_switch(
    original: Callable[..., Any],
    wrapper: Callable[..., Any],
    *,
    active: bool = False,
    force_python: bool = False,
) -> tuple[Callable[..., Any], Callable[[bool], None]]:
    """Return ``(installed, set_active)``: the callable to install in place of ``original`` and a
    function that turns the fast path off (``False``: calls go straight to ``original``) or on
    (``True``: calls go through ``wrapper``).

    ``original`` must be the plain callable (a function, not a ``classmethod``/``staticmethod``
    object: unwrap those first and re-wrap the result). ``wrapper`` must keep checking the probe's own
    flag (see the module docstring). ``active`` is the switch's initial state (pass the probe's
    current flag); call ``set_active`` whenever the probe's flag changes.

    With the C extension ``installed`` is a ``ProbeSwitch`` carrying ``functools.update_wrapper``
    metadata copied from ``original`` (``__name__``, ``__qualname__``, ``__doc__``, ``__module__``,
    ``__wrapped__``, ``__dict__``), so ``inspect.signature(installed)`` is the original's. Without it,
    with ``force_python=True``, or when ``original`` or ``wrapper`` is a coroutine, generator or
    async-generator function (see ``_kind_is_introspected``), ``installed`` is ``wrapper`` itself and
    ``set_active`` does nothing.
    """
    if (
        force_python
        or ProbeSwitch is None
        or _kind_is_introspected(original)
        or _kind_is_introspected(wrapper)
    ):
        return wrapper, _no_op_setter
    switch = ProbeSwitch(original, wrapper, active=active)
    functools.update_wrapper(switch, original)

    def set_active(active: bool) -> None:
        switch.active = active

    return switch, set_active
