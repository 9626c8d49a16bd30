"""Wrappers that time a call, evaluate its attributes or hand it to a custom handler.

Everything costly is decided here, once, at patch time: sync / async / generator / async generator
wrapper, timer or handler, compiled attribute expressions. The call path checks `probe.active`, reads
the clock twice and appends one tuple to the recorder's buffer.

The host comes first: the wrapped function runs exactly once per call, its result is returned and its
exceptions propagate unchanged (and are noted on the span); a failing expression or handler is
counted and reported, never raised into the engine.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .expressions import MISSING, CompiledExpression, ExpressionEvalError
from .speedups import HandlerCall

_clock = time.perf_counter_ns
_get_ident = threading.get_ident
_CALLER_SEARCH_DEPTH = 24


class Probe:
    """The per-symbol state a wrapper reads on every call."""

    __slots__ = (
        "active",
        "attributes",
        "buffer",
        "caller_filter",
        "chan",
        "domain",
        "error_messages",
        "errors",
        "evaluators",
        "max_buffered",
        "name",
        "on_problem",
        "recorder_drop",
        "symbol",
    )

    def __init__(
        self,
        symbol: str,
        domain: str,
        name: str,
        chan: int,
        buffer: list[tuple[Any, ...]],
        max_buffered: int,
        recorder_drop: Callable[[], None],
        on_problem: Callable[[str], None],
        attributes: tuple[tuple[str, CompiledExpression], ...] = (),
        caller_filter: str | None = None,
    ) -> None:
        self.symbol = symbol
        self.domain = domain
        self.name = name
        self.chan = chan
        self.buffer = buffer
        self.max_buffered = max_buffered
        self.recorder_drop = recorder_drop
        self.on_problem = on_problem
        self.attributes = attributes
        self.evaluators = tuple((name, expression.evaluator) for name, expression in attributes)
        self.caller_filter = caller_filter
        self.active = False
        # Failures per expression / handler, and the message of the first one. Only the error path
        # touches these; the runtime writes the final counts into the raw file (`Runtime.write_error_counts`).
        self.errors: dict[str, int] = {}
        self.error_messages: dict[str, str] = {}

    def note_error(self, what: str, detail: str) -> None:
        count = self.errors.get(what, 0) + 1
        self.errors[what] = count
        if count == 1:  # one report per expression / handler, then only counted
            message = f"{self.symbol}: {what}: {detail}"
            self.error_messages[what] = message
            self.on_problem(message)

    def evaluate(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any = MISSING) -> dict[str, Any]:
        """Attribute values for one call; a failing expression is left out, counted and reported once."""
        values: dict[str, Any] = {}
        for attr_name, evaluator in self.evaluators:
            try:
                values[attr_name] = evaluator(args, kwargs, result)
            except Exception as exc:
                self.attribute_failed(attr_name, exc)
        return values

    def attribute_failed(self, attr_name: str, exc: Exception) -> None:
        """An attribute's evaluation failed: it is left out of this call's record, counted, reported once."""
        source = next(e.source for n, e in self.attributes if n == attr_name)
        self.note_error(f"attribute {attr_name!r}", str(ExpressionEvalError(source, exc)))

    def called_from_filter(self) -> bool:
        """Whether the wrapped function was called, directly or through at most
        `_CALLER_SEARCH_DEPTH` frames, from a function named `caller_filter` (its code's `co_name`).

        The direct caller is the first frame looked at: this method is called straight from a wrapper
        (frame 1), and the C switch in front of the wrapper adds no Python frame, so frame 2 is the
        wrapped function's caller (for a generator or async generator: the frame that starts the
        iteration). A stack without such a frame (the wrapper called straight from C, e.g. as the
        target of `_thread.start_new_thread`) has no caller that could match: the call is not
        recorded. Never raises into the host.
        """
        try:
            frame: Any = sys._getframe(2)
        except ValueError:  # "call stack is not deep enough"
            return False
        wanted = self.caller_filter
        for _ in range(_CALLER_SEARCH_DEPTH):
            if frame is None:
                return False
            if frame.f_code.co_name == wanted:
                return True
            frame = frame.f_back
        return False


def _record(probe: Probe, t0: int, t1: int, attrs: dict[str, Any] | None) -> None:
    buf = probe.buffer
    if len(buf) < probe.max_buffered:
        buf.append((probe.chan, t0, t1, _get_ident(), attrs))
    else:
        probe.recorder_drop()


def _error_attrs(probe: Probe, exc: BaseException) -> dict[str, Any] | None:
    if isinstance(exc, GeneratorExit):
        return None  # a generator closed early ended normally
    return {"error": type(exc).__name__}


def make_timer(fn: Callable[..., Any], probe: Probe) -> Callable[..., Any]:
    """A sync timer; specialised for the common cases so the call path does no extra work."""
    buf = probe.buffer
    clock = _clock
    get_ident = _get_ident

    if not probe.attributes and probe.caller_filter is None:

        @functools.wraps(fn)
        def timer(*args: Any, **kwargs: Any) -> Any:
            if not probe.active:
                return fn(*args, **kwargs)
            t0 = clock()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                _record(probe, t0, clock(), _error_attrs(probe, exc))
                raise
            t1 = clock()
            if len(buf) < probe.max_buffered:
                buf.append((probe.chan, t0, t1, get_ident(), None))
            else:
                probe.recorder_drop()
            return result

        return timer

    if probe.caller_filter is None:
        evaluators = probe.evaluators

        # The evaluation loop and the append are inlined: with two attributes this path's budget is
        # 1.5 µs, and each helper call would cost ~60 ns.
        @functools.wraps(fn)
        def timer_with_attributes(*args: Any, **kwargs: Any) -> Any:
            if not probe.active:
                return fn(*args, **kwargs)
            t0 = clock()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                _record(probe, t0, clock(), _error_attrs(probe, exc))
                raise
            t1 = clock()
            attrs: dict[str, Any] = {}
            for attr_name, evaluator in evaluators:
                try:
                    attrs[attr_name] = evaluator(args, kwargs, result)
                except Exception as exc:
                    probe.attribute_failed(attr_name, exc)
            if len(buf) < probe.max_buffered:
                buf.append((probe.chan, t0, t1, get_ident(), attrs))
            else:
                probe.recorder_drop()
            return result

        return timer_with_attributes

    @functools.wraps(fn)
    def timer_with_caller_filter(*args: Any, **kwargs: Any) -> Any:
        if not probe.active or not probe.called_from_filter():
            return fn(*args, **kwargs)
        t0 = clock()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _record(probe, t0, clock(), _error_attrs(probe, exc))
            raise
        t1 = clock()
        _record(probe, t0, t1, probe.evaluate(args, kwargs, result) if probe.attributes else None)
        return result

    return timer_with_caller_filter


def make_async_timer(fn: Callable[..., Any], probe: Probe) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def async_timer(*args: Any, **kwargs: Any) -> Any:
        if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
            return await fn(*args, **kwargs)
        t0 = _clock()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            _record(probe, t0, _clock(), _error_attrs(probe, exc))
            raise
        t1 = _clock()
        _record(probe, t0, t1, probe.evaluate(args, kwargs, result) if probe.attributes else None)
        return result

    return async_timer


def make_generator_timer(fn: Callable[..., Any], probe: Probe) -> Callable[..., Any]:
    """A span covers the whole iteration: from the first `next()` to exhaustion or close."""

    @functools.wraps(fn)
    def generator_timer(*args: Any, **kwargs: Any) -> Any:
        if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
            return (yield from fn(*args, **kwargs))
        t0 = _clock()
        try:
            result = yield from fn(*args, **kwargs)
        except BaseException as exc:
            _record(probe, t0, _clock(), _error_attrs(probe, exc))
            raise
        t1 = _clock()
        _record(probe, t0, t1, probe.evaluate(args, kwargs, result) if probe.attributes else None)
        return result

    return generator_timer


def make_async_generator_timer(fn: Callable[..., Any], probe: Probe) -> Callable[..., Any]:
    """Forwards asend/athrow/aclose to the wrapped async generator; one span for the iteration."""
    return _async_generator_forwarder(fn, fn, probe)


def _async_generator_forwarder(fn: Callable[..., Any], start: Callable[..., Any],
                               probe: Probe | None) -> Callable[..., Any]:
    """An async generator function that iterates what `start(*args, **kwargs)` returns, forwarding
    asend/athrow/aclose; with `probe`, one span covers the iteration."""

    @functools.wraps(fn)
    async def async_generator_wrapper(*args: Any, **kwargs: Any) -> Any:
        agen = start(*args, **kwargs)
        recording = probe is not None and probe.active and (
            probe.caller_filter is None or probe.called_from_filter())
        t0 = _clock()
        error: BaseException | None = None
        try:
            throw: BaseException | None = None
            to_send: Any = None
            while True:
                try:
                    if throw is None:
                        item = await agen.asend(to_send)
                    else:
                        # Deliver the exception into the wrapped generator, as `athrow` would have.
                        item = await agen.athrow(throw)
                except StopAsyncIteration:
                    return
                throw = None
                try:
                    to_send = yield item
                except GeneratorExit:
                    await agen.aclose()
                    raise
                except BaseException as thrown:
                    throw = thrown
        except BaseException as exc:
            error = exc
            raise
        finally:
            if recording and probe is not None:
                _record(probe, t0, _clock(), None if error is None else _error_attrs(probe, error))

    return async_generator_wrapper


class OriginalCall:
    """What a custom handler receives as `original_func`: runs the original at most once.

    A second call returns the first result (or raises the first exception) instead of running the
    engine's code twice; the wrapper reads `done`, `result` and `error` afterwards.
    """

    __slots__ = ("done", "error", "fn", "is_method", "result")

    def __init__(self, fn: Callable[..., Any], is_method: bool) -> None:
        self.fn = fn
        self.is_method = is_method
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Called as `original_func(this, *args, **kwargs)`; `this` stays in the tuple for a method, which
        # is then handed on as it is (no second tuple).
        if self.done:
            if self.error is not None:
                raise self.error
            return self.result
        self.done = True
        try:
            self.result = self.fn(*args, **kwargs) if self.is_method else self.fn(*args[1:], **kwargs)
        except BaseException as exc:
            self.error = exc
            raise
        return self.result


def make_handler_wrapper(
    fn: Callable[..., Any], probe: Probe, handler: Callable[..., Any], is_method: bool
) -> Callable[..., Any]:
    """Call `handler(original_func, this, *args, **kwargs)`, with the host-first guarantees.

    With the C speedups (and no caller filter) the wrapper is `_speedups.HandlerCall`, which does what
    `with_handler` below does without its Python frames."""
    if HandlerCall is not None and probe.caller_filter is None:
        what = f"handler {getattr(handler, '__name__', handler)!r}"

        def on_error(exc: BaseException | None) -> None:
            probe.note_error(what, repr(exc))

        wrapper: Callable[..., Any] = HandlerCall(fn, handler, probe, on_error, is_method=is_method)
        functools.update_wrapper(wrapper, fn)
        return wrapper

    # The body of `_call_with_handler`, inlined: this is the path of every vLLM handler, and a helper
    # call would cost each of them a Python frame.
    @functools.wraps(fn)
    def with_handler(*args: Any, **kwargs: Any) -> Any:
        if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
            return fn(*args, **kwargs)
        original = OriginalCall(fn, is_method)
        try:
            # A method's `this` is its first argument: passed on as it is, without re-slicing the tuple.
            if is_method:
                handler(original, *args, **kwargs)
            else:
                handler(original, None, *args, **kwargs)
        except BaseException as exc:
            if original.error is not None and exc is original.error:
                raise
            probe.note_error(f"handler {getattr(handler, '__name__', handler)!r}", repr(exc))
        if not original.done:
            return fn(*args, **kwargs)
        if original.error is not None:
            raise original.error
        return original.result

    return with_handler


def _call_with_handler(fn: Callable[..., Any], probe: Probe, handler: Callable[..., Any], is_method: bool,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    original = OriginalCall(fn, is_method)
    if is_method:
        this, rest = args[0], args[1:]
    else:
        this, rest = None, args
    try:
        handler(original, this, *rest, **kwargs)
    except BaseException as exc:
        # Whatever the handler raises (SystemExit and KeyboardInterrupt included) is the profiler's
        # problem, never the host's; only the original's own exception reaches the host.
        if original.error is not None and exc is original.error:
            raise  # the engine's own exception, unchanged
        probe.note_error(f"handler {getattr(handler, '__name__', handler)!r}", repr(exc))
    if not original.done:
        # The handler failed before (or forgot) calling the original: run it now, once.
        return fn(*args, **kwargs)
    if original.error is not None:
        raise original.error  # a handler that swallowed the engine's exception must not hide it
    return original.result


def make_sync_handler_wrapper_for_kind(
    fn: Callable[..., Any], probe: Probe, handler: Callable[..., Any], is_method: bool
) -> Callable[..., Any]:
    """A sync handler on an `async def`, generator or async generator target: the handler runs when
    the wrapper is called (it gets the coroutine / generator the original returns), and the wrapper is
    of the original's kind, so `inspect.iscoroutinefunction` & co. answer as they did."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def coroutine_with_handler(*args: Any, **kwargs: Any) -> Any:
            if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
                return await fn(*args, **kwargs)
            return await _call_with_handler(fn, probe, handler, is_method, args, kwargs)

        return coroutine_with_handler
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_with_handler(*args: Any, **kwargs: Any) -> Any:
            if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
                return (yield from fn(*args, **kwargs))
            return (yield from _call_with_handler(fn, probe, handler, is_method, args, kwargs))

        return generator_with_handler
    if inspect.isasyncgenfunction(fn):

        def start(*args: Any, **kwargs: Any) -> Any:
            if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
                return fn(*args, **kwargs)
            return _call_with_handler(fn, probe, handler, is_method, args, kwargs)

        return _async_generator_forwarder(fn, start, None)
    return make_handler_wrapper(fn, probe, handler, is_method)


def make_async_handler_wrapper(
    fn: Callable[..., Any], probe: Probe, handler: Callable[..., Any], is_method: bool
) -> Callable[..., Any]:
    """For async targets with an async handler: `await handler(original_func, this, ...)`."""

    @functools.wraps(fn)
    async def with_async_handler(*args: Any, **kwargs: Any) -> Any:
        if not probe.active or (probe.caller_filter is not None and not probe.called_from_filter()):
            return await fn(*args, **kwargs)
        state: dict[str, Any] = {}

        async def original(this: Any, *a: Any, **k: Any) -> Any:
            if "done" in state:
                if "error" in state:
                    raise state["error"]
                return state["result"]
            state["done"] = True
            try:
                state["result"] = await (fn(this, *a, **k) if is_method else fn(*a, **k))
            except BaseException as exc:
                state["error"] = exc
                raise
            return state["result"]

        this, rest = (args[0], args[1:]) if is_method else (None, args)
        try:
            await handler(original, this, *rest, **kwargs)
        except BaseException as exc:
            if exc is state.get("error") or (isinstance(exc, asyncio.CancelledError) and _being_cancelled()):
                raise  # the engine's own exception, or its task being cancelled
            probe.note_error(f"handler {getattr(handler, '__name__', handler)!r}", repr(exc))
        if "done" not in state:
            return await fn(*args, **kwargs)
        if "error" in state:
            raise state["error"]
        return state["result"]

    return with_async_handler


def _being_cancelled() -> bool:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    return task is not None and task.cancelling() > 0
