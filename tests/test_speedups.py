"""service_profiler.runtime._speedups.ProbeSwitch and service_profiler.runtime.speedups.make_switch.

The C extension is built in place for a development checkout (`python setup.py build_ext --inplace`)
and by the wheel build in CI. Outside CI the C-specific tests skip when it is missing; in CI
(CI=true) `test_extension_is_built` fails instead, so a broken build can never pass silently.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import inspect
import os
import sys
import threading
import traceback
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service_profiler.runtime import speedups
from service_profiler.runtime.speedups import HAVE_SPEEDUPS, make_switch

IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}
BUILD_HINT = "C extension not built: run `.venv/bin/python setup.py build_ext --inplace`"

needs_ext = pytest.mark.skipif(not HAVE_SPEEDUPS, reason=BUILD_HINT)
IMPLS = ["c", "python"]


def _switch_type() -> Any:
    assert speedups.ProbeSwitch is not None
    return speedups.ProbeSwitch


def test_extension_is_built() -> None:
    if not HAVE_SPEEDUPS and not IN_CI:
        pytest.skip(BUILD_HINT)
    assert HAVE_SPEEDUPS, "CI must build service_profiler.runtime._speedups (gcc is present there)"
    from service_profiler.runtime._speedups import ProbeSwitch

    assert ProbeSwitch is speedups.ProbeSwitch
    assert ProbeSwitch.__module__ == "service_profiler.runtime._speedups"


# ------------------------------------------------------------------------------------------------
# Helpers


def record(*args: Any, **kwargs: Any) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """The 'original': returns exactly what it was called with."""
    return ("original", args, kwargs)


def tagged(*args: Any, **kwargs: Any) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """A C-level test wrapper that does not forward, so the result says which route ran."""
    return ("wrapper", args, kwargs)


class Probe:
    def __init__(self) -> None:
        self.active = False


class Installed:
    """A probe installed the way the profiler does it: a Python wrapper that checks its own flag,
    behind make_switch()."""

    def __init__(self, fn: Callable[..., Any], impl: str) -> None:
        self.probe = Probe()
        self.seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        probe, seen = self.probe, self.seen

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not probe.active:
                return fn(*args, **kwargs)
            seen.append((args, kwargs))
            return fn(*args, **kwargs)

        self.wrapper = wrapper
        self.callable, self._set_active = make_switch(fn, wrapper, force_python=impl == "python")

    def activate(self, active: bool) -> None:
        self.probe.active = active
        self._set_active(active)


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "c" and not HAVE_SPEEDUPS:
        pytest.skip(BUILD_HINT)
    return str(request.param)


# ------------------------------------------------------------------------------------------------
# make_switch


def test_force_python_returns_the_wrapper_and_a_no_op_setter() -> None:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return record(*args, **kwargs)

    installed, set_active = make_switch(record, wrapper, force_python=True)
    assert installed is wrapper
    assert set_active(True) is None
    assert set_active(False) is None
    assert installed(1, k=2) == ("original", (1,), {"k": 2})


@needs_ext
def test_make_switch_returns_an_inactive_probe_switch_and_its_setter() -> None:
    installed, set_active = make_switch(record, tagged)
    switch: Any = installed
    assert type(installed) is _switch_type()
    assert switch.active is False
    assert switch.original is record
    assert switch.wrapper is tagged
    set_active(True)
    assert switch.active is True
    assert installed(1)[0] == "wrapper"
    set_active(False)
    assert switch.active is False
    assert installed(1)[0] == "original"


@needs_ext
def test_make_switch_initial_state_and_builtin_original() -> None:
    switch: Any = make_switch(record, tagged, active=True)[0]
    assert switch.active is True
    assert switch(1)[0] == "wrapper"
    builtin: Any = make_switch(len, tagged)[0]  # no __dict__ / __wrapped__ on the original: fine
    assert type(builtin) is _switch_type()
    assert builtin([1, 2]) == 2
    assert builtin.__name__ == "len"
    assert builtin.__wrapped__ is len


async def _coroutine_function() -> int:
    return 1


def _generator_function() -> Any:
    yield 1


async def _async_generator_function() -> Any:
    yield 1


@pytest.mark.parametrize("target", [_coroutine_function, _generator_function, _async_generator_function])
def test_async_and_generator_targets_keep_their_python_wrapper(target: Callable[..., Any]) -> None:
    # A C callable has no code flags: inspect.iscoroutinefunction & co. would stop recognising it.
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)

    installed, set_active = make_switch(target, sync_wrapper)
    assert installed is sync_wrapper
    assert set_active(True) is None
    if HAVE_SPEEDUPS:
        assert make_switch(record, sync_wrapper)[0] is not sync_wrapper  # the plain case does switch
    installed, _ = make_switch(record, target)  # a coroutine/generator *wrapper* too
    assert installed is target


def test_dispatch_through_make_switch(impl: str) -> None:
    inst = Installed(record, impl)
    f = inst.callable
    assert f(1, 2, k=3) == ("original", (1, 2), {"k": 3})
    assert inst.seen == []
    inst.activate(True)
    assert f(1, 2, k=3) == ("original", (1, 2), {"k": 3})
    assert inst.seen == [((1, 2), {"k": 3})]
    inst.activate(False)
    assert f(4) == ("original", (4,), {})
    assert len(inst.seen) == 1


def test_wraps_metadata_and_signature(impl: str) -> None:
    def target(self: object, batch: list[int], n: int = 1, *rest: int, flag: bool = False, **kw: Any) -> int:
        """Target docstring."""
        return n

    target.custom = "copied"  # type: ignore[attr-defined]
    f = Installed(target, impl).callable
    assert f.__name__ == "target"
    assert f.__qualname__ == target.__qualname__
    assert f.__doc__ == "Target docstring."
    assert f.__module__ == __name__
    assert f.__wrapped__ is target  # type: ignore[attr-defined]
    assert f.custom == "copied"  # type: ignore[attr-defined]
    assert inspect.signature(f) == inspect.signature(target)

    class Owner:
        method = f

    bound_sig = inspect.signature(Owner().method)
    assert bound_sig == inspect.signature(functools.partial(target, None))
    assert list(bound_sig.parameters) == ["batch", "n", "rest", "flag", "kw"]


# ------------------------------------------------------------------------------------------------
# Dispatch (C)


@needs_ext
def test_inactive_goes_to_original_active_goes_to_wrapper() -> None:
    s = _switch_type()(record, tagged)
    assert s() == ("original", (), {})
    assert s(1, 2, 3) == ("original", (1, 2, 3), {})
    assert s(1, a=2, b=3) == ("original", (1,), {"a": 2, "b": 3})
    assert s(a=1) == ("original", (), {"a": 1})
    s.active = True
    assert s() == ("wrapper", (), {})
    assert s(1, 2, 3) == ("wrapper", (1, 2, 3), {})
    assert s(1, a=2, b=3) == ("wrapper", (1,), {"a": 2, "b": 3})
    s.active = False
    assert s(9)[0] == "original"


@needs_ext
def test_every_call_form_is_forwarded_unchanged() -> None:
    s = _switch_type()(record, tagged)
    many = tuple(range(20))
    kwargs = {f"k{i}": i for i in range(12)}
    for route in ("original", "wrapper"):
        s.active = route == "wrapper"
        assert s(*many) == (route, many, {})
        assert s(*many, **kwargs) == (route, many, kwargs)
        assert s(**kwargs) == (route, (), kwargs)
        assert type(s).__call__(s, 1, x=2) == (route, (1,), {"x": 2})  # tp_call
        assert functools.partial(s, 1, x=1)(2, y=3) == (route, (1, 2), {"x": 1, "y": 3})
        assert list(map(s, [1, 2])) == [(route, (1,), {}), (route, (2,), {})]


@needs_ext
def test_constructor_keywords_and_initial_active() -> None:
    cls = _switch_type()
    s = cls(original=record, wrapper=tagged, active=True)
    assert s.active is True
    assert s(1)[0] == "wrapper"
    with pytest.raises(TypeError):
        cls(record, tagged, True)  # active is keyword-only
    with pytest.raises(TypeError):
        cls(record)
    with pytest.raises(TypeError, match="original must be callable"):
        cls(42, tagged)
    with pytest.raises(TypeError, match="wrapper must be callable"):
        cls(record, "nope")


@needs_ext
def test_active_accepts_any_object_by_truth() -> None:
    s = _switch_type()(record, tagged)
    for value, expected in [(1, True), (0, False), ([0], True), ([], False), ("x", True), (None, False)]:
        s.active = value
        assert s.active is expected

    class BadBool:
        def __bool__(self) -> bool:
            raise ZeroDivisionError("no truth")

    s.active = True
    with pytest.raises(ZeroDivisionError, match="no truth"):
        s.active = BadBool()
    assert s.active is True  # unchanged
    with pytest.raises(AttributeError):
        del s.active


@needs_ext
def test_original_and_wrapper_are_read_only() -> None:
    s = _switch_type()(record, tagged)
    assert s.original is record
    assert s.wrapper is tagged
    for name in ("original", "wrapper"):
        with pytest.raises(AttributeError):
            setattr(s, name, print)
        with pytest.raises(AttributeError):
            delattr(s, name)
    assert s.original is record
    assert s.wrapper is tagged


@needs_ext
def test_not_subclassable() -> None:
    # A subclass's __call__ would be bypassed by the inherited vectorcall slot, so it is forbidden.
    with pytest.raises(TypeError):
        type("Sub", (_switch_type(),), {})


@needs_ext
def test_inactive_call_adds_no_python_frame() -> None:
    def original() -> types.FrameType:
        return sys._getframe(1)

    s = _switch_type()(original, tagged)
    assert s() is sys._getframe(0)  # the caller of `original` is this test: nothing in between


@needs_ext
def test_no_reference_leaks_on_the_call_path() -> None:
    def discard(*args: Any, **kwargs: Any) -> None:
        return None

    def positional_only(x: object) -> None:
        return None

    arg, kwval = object(), object()
    s = _switch_type()(discard, discard)
    strict = _switch_type()(positional_only, positional_only)

    class Engine:
        step = s

    engine = Engine()

    def counts() -> tuple[int, ...]:
        return tuple(sys.getrefcount(o) for o in (arg, kwval, s, strict, engine))

    for active in (False, True):
        s.active = strict.active = active
        before = counts()
        for _ in range(1000):
            s(arg, k=kwval)
            s(arg)
            s(*(arg, arg), **{"k": kwval})
            engine.step(arg, k=kwval)
            Engine.step(arg)
            bound = engine.step
            bound(arg)
            with contextlib.suppress(TypeError):
                strict(arg, k=kwval)  # the error path
        del bound
        assert counts() == before


@needs_ext
def test_switches_nest() -> None:
    cls = _switch_type()
    inner = cls(record, tagged)
    outer = cls(inner, tagged)
    assert outer(1, k=2) == ("original", (1,), {"k": 2})
    inner.active = True
    assert outer(1, k=2) == ("wrapper", (1,), {"k": 2})
    outer.active = True
    inner.active = False
    assert outer(1)[0] == "wrapper"


# ------------------------------------------------------------------------------------------------
# Binding


@needs_ext
def test_instance_method_binding() -> None:
    cls = _switch_type()
    s = cls(record, tagged)

    class Engine:
        step = s

    engine = Engine()
    for route in ("original", "wrapper"):
        s.active = route == "wrapper"
        assert engine.step(1, n=2) == (route, (engine, 1), {"n": 2})  # LOAD_METHOD path
        cached = engine.step  # what vLLM keeps from init
        assert isinstance(cached, types.MethodType)
        assert cached.__self__ is engine
        assert cached.__func__ is s
        assert cached(3) == (route, (engine, 3), {})
        assert Engine.step is s
        assert Engine.step(engine, 4) == (route, (engine, 4), {})
        assert getattr(engine, "step")(5) == (route, (engine, 5), {})  # noqa: B009
        assert s.__get__(None, Engine) is s
        assert s.__get__(engine)(6) == (route, (engine, 6), {})
        assert s.__get__(engine, Engine)(7) == (route, (engine, 7), {})

    # A non-data descriptor, like a function: an instance attribute shadows it.
    engine.step = lambda *a: "shadowed"
    assert engine.step() == "shadowed"

    class SubEngine(Engine):
        def step(self, *args: Any, **kwargs: Any) -> Any:
            return super().step(*args, **kwargs)

    sub = SubEngine()
    s.active = False
    assert sub.step(8, k=9) == ("original", (sub, 8), {"k": 9})


@needs_ext
def test_classmethod_and_staticmethod() -> None:
    cls = _switch_type()
    cm = cls(record, tagged)
    sm = cls(record, tagged)

    class Engine:
        make: classmethod[Any, Any, Any] = classmethod(cm)
        helper = staticmethod(sm)

    class SubEngine(Engine):
        pass

    engine = Engine()
    for active in (False, True):
        route = "wrapper" if active else "original"
        cm.active = sm.active = active
        assert Engine.make(1, k=2) == (route, (Engine, 1), {"k": 2})
        assert engine.make(1) == (route, (Engine, 1), {})
        assert SubEngine.make(1) == (route, (SubEngine, 1), {})
        assert Engine.helper(1, k=2) == (route, (1,), {"k": 2})
        assert engine.helper(1) == (route, (1,), {})


@needs_ext
def test_original_may_itself_be_a_bound_method() -> None:
    # A bound method calling a switch calling a bound method: both prepend `self` on the
    # PY_VECTORCALL_ARGUMENTS_OFFSET path, so the vector must be passed down exactly.
    class Backend:
        def run(self, *args: Any, **kwargs: Any) -> Any:
            return ("original", (self, *args), kwargs)

    backend = Backend()
    s = _switch_type()(backend.run, tagged)

    class Engine:
        step = s

    engine = Engine()
    assert engine.step(1, k=2) == ("original", (backend, engine, 1), {"k": 2})
    cached = engine.step
    assert cached(1) == ("original", (backend, engine, 1), {})
    s.active = True
    assert cached(1, k=2) == ("wrapper", (engine, 1), {"k": 2})


# ------------------------------------------------------------------------------------------------
# Exceptions


class Boom(Exception):
    pass


def _raiser(exc: BaseException) -> Callable[..., Any]:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return boom


@needs_ext
@pytest.mark.parametrize("active", [False, True])
def test_exceptions_propagate_unchanged(active: bool) -> None:
    exc = Boom("bad")
    s = _switch_type()(_raiser(exc), _raiser(exc), active=active)

    class Engine:
        step = s

    for call in (lambda: s(1, k=2), lambda: Engine().step(1), lambda: s(*range(10), **{"a": 1})):
        with pytest.raises(Boom) as info:
            call()
        assert info.value is exc
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert frames[-1] == "boom"  # the raising frame is intact and last
        assert "<lambda>" in frames


@needs_ext
def test_base_exceptions_propagate_and_leave_no_state() -> None:
    class Abort(BaseException):  # not an Exception, like KeyboardInterrupt / GeneratorExit
        pass

    s = _switch_type()(_raiser(Abort()), tagged)
    with pytest.raises(Abort):
        s()
    s.active = True
    assert s(1) == ("wrapper", (1,), {})


# ------------------------------------------------------------------------------------------------
# repr, weakref, gc


@needs_ext
def test_repr() -> None:
    s = _switch_type()(record, tagged)
    assert repr(s) == f"<ProbeSwitch active=False for {record!r}>"
    s.active = True
    assert repr(s) == f"<ProbeSwitch active=True for {record!r}>"


@needs_ext
def test_repr_of_a_switch_whose_original_reprs_the_switch() -> None:
    holder: list[Any] = []

    class Loop:
        def __call__(self) -> None:
            return None

        def __repr__(self) -> str:
            return f"Loop({holder[0]!r})"

    s = _switch_type()(Loop(), tagged)
    holder.append(s)
    assert repr(s) == "<ProbeSwitch active=False for Loop(<ProbeSwitch ...>)>"


@needs_ext
def test_weakref() -> None:
    s = _switch_type()(record, tagged)
    fired: list[object] = []
    ref = weakref.ref(s, fired.append)
    assert ref() is s
    assert weakref.getweakrefcount(s) == 1
    proxy = weakref.proxy(s)
    assert proxy(1) == ("original", (1,), {})

    class Engine:
        step = s

    engine = Engine()
    method_ref = weakref.WeakMethod(engine.step)
    assert method_ref()(2) == ("original", (engine, 2), {})  # type: ignore[misc]

    registry: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
    registry[s] = 1
    del Engine, engine, method_ref, proxy, s
    gc.collect()
    assert ref() is None
    assert fired == [ref]
    assert len(registry) == 0


@needs_ext
def test_gc_support() -> None:
    s = _switch_type()(record, tagged)
    assert gc.is_tracked(s)
    s.extra = 1
    referents = gc.get_referents(s)
    assert record in referents
    assert tagged in referents
    assert s.__dict__ in referents


def _switch_in_a_cycle(through: str) -> weakref.ref[Any]:
    """Build a reference cycle through a ProbeSwitch; return a weak reference to the switch. The
    cycle outlives this frame."""
    cls = _switch_type()
    box: dict[str, Any] = {}

    def via_box(*args: Any) -> Any:
        return box  # a closure that (through `box`) reaches the switch

    if through == "dict":
        s = cls(record, tagged)
        s.myself = s
    elif through == "wrapper":
        s = cls(record, via_box)
        box["s"] = s
    elif through == "original":
        s = cls(via_box, tagged)
        box["s"] = s
    else:
        # The real layout: Cls.method = switch; switch.original is the old function whose closure
        # reaches the class.
        class Engine:
            pass

        def step(self: Any) -> Any:
            return Engine

        s = cls(step, tagged)
        functools.update_wrapper(s, step)
        Engine.step = s  # type: ignore[attr-defined]
        assert Engine().step() is Engine  # type: ignore[attr-defined]
    return weakref.ref(s)


@needs_ext
@pytest.mark.parametrize("through", ["dict", "wrapper", "original", "class"])
def test_reference_cycles_are_collected(through: str) -> None:
    gc.collect()
    gc.disable()
    try:
        ref = _switch_in_a_cycle(through)
        assert ref() is not None  # only a cycle keeps it alive now
        gc.collect()
        assert ref() is None
    finally:
        gc.enable()


@needs_ext
def test_dealloc_without_cycles_is_immediate() -> None:
    s = _switch_type()(record, tagged)
    s.attr = [1, 2, 3]
    fired: list[object] = []
    ref = weakref.ref(s, fired.append)
    del s
    assert ref() is None  # plain refcounting, no gc.collect needed
    assert fired == [ref]  # dealloc cleared the weak references and ran the callback


@needs_ext
def test_dict_is_settable() -> None:
    s = _switch_type()(record, tagged)
    s.__dict__ = {"a": 1}
    assert s.a == 1
    assert vars(s) == {"a": 1}
    with pytest.raises(TypeError):
        s.__dict__ = 5
    s.__dict__.clear()
    assert not hasattr(s, "a")


# ------------------------------------------------------------------------------------------------
# Threads


def _work(x: int, k: int = 0) -> int:
    return x * 3 + k


@pytest.mark.parametrize("impl_name", IMPLS)
def test_threads_toggling_while_others_call(impl_name: str) -> None:
    if impl_name == "c" and not HAVE_SPEEDUPS:
        pytest.skip(BUILD_HINT)
    inst = Installed(_work, impl_name)
    f = inst.callable

    class Engine:
        pass

    Engine.step = staticmethod(f)  # type: ignore[attr-defined]
    engine = Engine()
    stop = threading.Event()
    errors: list[BaseException] = []
    calls = [0] * 6
    toggles = [0] * 2

    def caller(slot: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                if f(i) != i * 3:
                    raise AssertionError(f"f({i}) wrong")
                if f(i, k=slot) != i * 3 + slot:
                    raise AssertionError(f"f({i}, k={slot}) wrong")
                if engine.step(i, k=1) != i * 3 + 1:  # type: ignore[attr-defined]
                    raise AssertionError("engine.step wrong")
                calls[slot] += 3
        except BaseException as exc:
            errors.append(exc)

    def toggler(slot: int) -> None:
        try:
            flag = False
            while not stop.is_set():
                flag = not flag
                inst.activate(flag)
                toggles[slot] += 1
        except BaseException as exc:
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(calls))]
    threads += [threading.Thread(target=toggler, args=(i,)) for i in range(len(toggles))]
    try:
        for t in threads:
            t.start()
        stop.wait(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(old_interval)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert all(n > 0 for n in calls)
    assert all(n > 0 for n in toggles)
    # Both routes were taken while the flag was flipping.
    assert len(inst.seen) > 0
    assert len(inst.seen) < sum(calls)


# ------------------------------------------------------------------------------------------ encode_rec_line


def _stdlib_line(records: list[Any]) -> str:
    from service_profiler.runtime.recorder import _encode

    return _encode({"t": "rec", "r": records})


class _Str(str):
    pass


class _Int(int):
    pass


def _random_value(rng: Any, depth: int) -> Any:
    kind = rng.randrange(11 if depth < 4 else 7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == 2:
        return rng.randint(-1000, 1000)
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e300, 5e-324, 0.1, 1 / 3, -2.5e-7, 123456789.0, 1e16,
                           float("nan"), float("inf"), float("-inf"), rng.random() * 10 ** rng.randint(-20, 20)])
    if kind in (4, 5, 6):
        alphabet = "ab \"\\/\b\f\n\r\t\x00\x01\x1f\x7f é€😀\u2028"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind in (7, 8):
        items = [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
        return items if kind == 7 else tuple(items)
    return {f"k{i}\n\"": _random_value(rng, depth + 1) for i in range(rng.randrange(5))}


@needs_ext
def test_encode_rec_line_writes_what_the_stdlib_encoder_writes() -> None:
    import random

    from service_profiler.runtime._speedups import encode_rec_line

    rng = random.Random(7)
    for _ in range(2000):
        records = [(rng.randrange(50), rng.randrange(2**62), rng.randrange(2**62), rng.randrange(2**40),
                    _random_value(rng, 0)) for _ in range(rng.randrange(1, 6))]
        assert encode_rec_line(records) == _stdlib_line(records), records
    assert encode_rec_line([]) == _stdlib_line([]) == '{"t":"rec","r":[]}'
    nested: Any = "x"
    for _ in range(28):  # as deep as it goes: the line's list, the record, its attributes, 28 lists, a str
        nested = [nested]
    assert encode_rec_line([(1, 2, {"a": nested})]) == _stdlib_line([(1, 2, {"a": nested})])


@needs_ext
@pytest.mark.parametrize("make", [
    lambda: 2**63, lambda: -(2**63) - 1, lambda: _Str("s"), lambda: _Int(3), lambda: {1: "int key"},
    lambda: {None: 1}, lambda: {"set": {1, 2}}, lambda: b"bytes", object, lambda: "\ud800",
    lambda: {"lone surrogate \udfff": 1}, lambda: collections.OrderedDict(a=1),
])
def test_encode_rec_line_leaves_other_values_to_the_stdlib_encoder(make: Callable[[], Any]) -> None:
    """What it does not write as the stdlib would (or at all), it leaves to the stdlib: None."""
    from service_profiler.runtime._speedups import encode_rec_line

    value = make()
    assert encode_rec_line([(1, 2, 3, {"v": value})]) is None
    assert encode_rec_line([(1, 2, 3, {"ok": 1}), (1, 2, 3, [value])]) is None


@needs_ext
def test_encode_rec_line_gives_up_past_its_depth_and_on_cycles() -> None:
    from service_profiler.runtime._speedups import encode_rec_line

    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    assert encode_rec_line([(1, 2, {"deep": deep})]) is None
    assert encode_rec_line([(1, 2, {"cyclic": cyclic})]) is None
    with pytest.raises(TypeError, match="must be a list"):
        encode_rec_line((1, 2))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ HandlerCall


class _Probe:
    """What a handler wrapper reads of a probe: `active`, `caller_filter`, `note_error`."""

    def __init__(self) -> None:
        self.active = True
        self.caller_filter = None
        self.errors: list[tuple[str, str]] = []

    def note_error(self, what: str, detail: str) -> None:
        self.errors.append((what, detail))


def _handler_wrapper(impl: str, fn: Callable[..., Any], probe: Any, handler: Callable[..., Any],
                     is_method: bool) -> Callable[..., Any]:
    from service_profiler.runtime import probes

    if impl == "c":
        if not HAVE_SPEEDUPS:
            pytest.skip(BUILD_HINT)
        wrapper = probes.make_handler_wrapper(fn, probe, handler, is_method)
        assert type(wrapper).__name__ == "HandlerCall"
        return wrapper
    saved = probes.HandlerCall
    probes.HandlerCall = None
    try:
        wrapper = probes.make_handler_wrapper(fn, probe, handler, is_method)
    finally:
        probes.HandlerCall = saved
    assert inspect.isfunction(wrapper)
    return wrapper


@pytest.mark.parametrize("impl", IMPLS)
def test_handler_wrapper_calls_the_handler_only_while_active(impl: str) -> None:
    seen: list[Any] = []

    def original(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return ("original", args, kwargs)

    def handler(original_func: Any, this: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((this, args, kwargs))
        result = original_func(this, *args, **kwargs)
        assert original_func(this, *args, **kwargs) is result  # a second call: the first one's result
        return "ignored"

    probe = _Probe()
    wrapper = _handler_wrapper(impl, original, probe, handler, False)
    many = tuple(range(12))  # more arguments than the C wrapper's small vector
    assert wrapper(*many, a=1, b=2) == ("original", many, {"a": 1, "b": 2})
    assert seen == [(None, many, {"a": 1, "b": 2})] and probe.errors == []
    probe.active = False
    assert wrapper(1) == ("original", (1,), {}) and len(seen) == 1
    assert wrapper.__name__ == "original" and wrapper.__wrapped__ is original  # type: ignore[attr-defined]


@pytest.mark.parametrize("impl", IMPLS)
def test_handler_wrapper_binds_as_a_method(impl: str) -> None:
    class Engine:
        def step(self, n: int, *, scale: int = 1) -> tuple[Any, int]:
            return self, n * scale

    def handler(original_func: Any, this: Any, *args: Any, **kwargs: Any) -> Any:
        assert isinstance(this, Engine)
        return original_func(this, *args, **kwargs)

    original = Engine.step
    Engine.step = _handler_wrapper(impl, original, _Probe(), handler, True)  # type: ignore[method-assign]
    engine = Engine()
    assert engine.step(3, scale=2) == (engine, 6)
    assert Engine.step(engine, 4) == (engine, 4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("raised", [ValueError("h"), SystemExit(2), KeyboardInterrupt(), GeneratorExit()])
@pytest.mark.parametrize("when", ["before", "after"])
def test_whatever_the_handler_raises_stays_with_the_profiler(impl: str, raised: BaseException, when: str) -> None:
    calls: list[int] = []

    def original(x: int) -> int:
        calls.append(x)
        return x + 1

    def handler(original_func: Any, this: Any, x: int) -> None:
        if when == "after":
            original_func(this, x)
        raise raised

    probe = _Probe()
    assert _handler_wrapper(impl, original, probe, handler, False)(5) == 6 and calls == [5]
    assert probe.errors == [("handler 'handler'", repr(raised))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("swallow", [False, True])
def test_the_originals_own_exception_reaches_the_host_unchanged(impl: str, swallow: bool) -> None:
    own = KeyboardInterrupt("the engine's own")

    def original() -> None:
        raise own

    def handler(original_func: Any, this: Any) -> None:
        try:
            original_func(this)
        except BaseException:
            if not swallow:
                raise

    probe = _Probe()
    wrapper = _handler_wrapper(impl, original, probe, handler, False)
    with pytest.raises(KeyboardInterrupt) as caught:
        wrapper()
    assert caught.value is own and probe.errors == []
    assert "original" in "".join(traceback.format_tb(caught.value.__traceback__))


@needs_ext
def test_handler_call_leaks_nothing_and_its_cycles_are_collected() -> None:
    class Token:
        fail = False

    def original(token: Token) -> Token:
        if token.fail:
            raise ValueError("engine")
        return token

    def handler(original_func: Any, this: Any, token: Token) -> None:
        try:
            original_func(this, token)
        except ValueError:
            pass

    wrapper = _handler_wrapper("c", original, _Probe(), handler, False)
    token, failing = Token(), Token()
    failing.fail = True
    before = sys.getrefcount(token), sys.getrefcount(failing)
    for _ in range(10_000):
        assert wrapper(token) is token
        with pytest.raises(ValueError):
            wrapper(failing)
    gc.collect()
    assert (sys.getrefcount(token), sys.getrefcount(failing)) == before
    # an exception kept alive by a cycle through the handler's frame is freed by the collector
    ref = weakref.ref(failing)
    del failing
    gc.collect()
    assert ref() is None


# -------------------------------------------------------------------------------------------- Emitter


@contextlib.contextmanager
def _runtime_sink(impl: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A runtime with a recorder that is never started (no writer thread takes the records), installed as
    the record sink: through the C Emitter (`impl` "c") or through the Python functions."""
    from service_profiler import record
    from service_profiler.runtime import core
    from service_profiler.runtime.recorder import Recorder

    if impl == "c" and not HAVE_SPEEDUPS:
        pytest.skip(BUILD_HINT)
    if impl == "python":
        monkeypatch.setattr(core, "Emitter", None)
    runtime = core.Runtime(None, {})
    runtime.recorder = Recorder(tmp_path, max_buffered=1_000)
    runtime.enabled = True
    previous = record.set_sink(runtime)
    try:
        through_c = runtime._emitter is not None and getattr(record.span, "__self__", None) is runtime._emitter
        assert through_c == (impl == "c")
        yield runtime
    finally:
        record.set_sink(previous)


def _recorded(runtime: Any) -> list[tuple[Any, ...]]:
    """The buffer's records with each channel id replaced by its (kind, domain, name)."""
    names = {chan: key for key, chan in runtime.recorder.channel_ids.items()}
    return [(names[r[0]], *r[1:]) for r in runtime.recorder.buffer]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_recording_api_records_alike_in_c_and_in_python(impl: str, tmp_path: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import types

    from service_profiler import record

    with _runtime_sink(impl, tmp_path, monkeypatch) as runtime:
        attrs = {"a": [1, 2]}
        before = time_ns = record.now_ns()
        record.span("D", "s", 1, 2, attrs)
        record.span("D", "s", 3, 4)
        record.span(domain="D", name="k", start_ns=5, end_ns=6, attrs=None)
        record.event("D", "e", {"x": 1}, 7)
        record.event("D", "e", ts_ns=8)
        record.event("D", "now")
        values = {"v": 1.5}
        record.counter("D", "c", values, 9)
        values["v"] = 99.0  # recorded as it was
        record.counter("D", "c", types.MappingProxyType({"w": 2}), ts_ns=10)
        record.counter("D", "bad", 5)  # type: ignore[arg-type]  # not a mapping: nothing, and no exception
        assert record.enabled("D")
        runtime.domains = frozenset({"Keep"})
        record.span("D", "s", 11, 12)
        record.event("Keep", "e", None, 13)
        assert not record.enabled("D") and record.enabled("Keep")
        runtime.enabled = False
        record.event("Keep", "e", None, 14)
        record.counter("Keep", "c", {"v": 1})
        assert not record.enabled("Keep")
        with pytest.raises(TypeError):
            record.span("D", "s", 1)  # type: ignore[call-arg]  # a wrong call is the caller's bug, as in Python
        with pytest.raises(TypeError):
            record.event("D", "e", unknown=1)  # type: ignore[call-arg]
    tid = threading.get_ident()
    found = _recorded(runtime)
    now = found[5][1]
    assert isinstance(now, int) and before <= now <= record.now_ns() and time_ns == before
    assert found == [
        (("span", "D", "s"), 1, 2, tid, attrs),
        (("span", "D", "s"), 3, 4, tid, None),
        (("span", "D", "k"), 5, 6, tid, None),
        (("event", "D", "e"), 7, tid, {"x": 1}),
        (("event", "D", "e"), 8, tid, None),
        (("event", "D", "now"), now, tid, None),
        (("counter", "D", "c"), 9, {"v": 1.5}),
        (("counter", "D", "c"), 10, {"w": 2}),
        (("event", "Keep", "e"), 13, tid, None),
    ]
    assert found[0][4] is attrs  # the handler's own attributes: the writer encodes them later


@pytest.mark.parametrize("impl", IMPLS)
def test_the_recording_api_counts_what_a_full_buffer_drops(impl: str, tmp_path: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from service_profiler import record

    with _runtime_sink(impl, tmp_path, monkeypatch) as runtime:
        recorder = runtime.recorder
        recorder.buffer.extend([("filler",)] * (recorder.max_buffered - 1))
        record.span("D", "s", 1, 2)
        record.event("D", "e", None, 3)
        record.counter("D", "c", {"v": 1}, 4)
    assert len(recorder.buffer) == recorder.max_buffered
    assert next(recorder._dropped) == 2  # the event and the counter, counted; the next value is the count


@needs_ext
def test_the_c_recording_api_never_raises_on_a_domain_it_cannot_look_up_and_leaks_nothing(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from service_profiler import record

    attrs, values, ts = {"a": 1}, {"v": 1.0}, 10**18
    with _runtime_sink("c", tmp_path, monkeypatch) as runtime:
        runtime.domains = frozenset({"D"})
        record.span(["unhashable"], "s", 1, 2)  # type: ignore[arg-type]
        assert not record.enabled(["unhashable"])  # type: ignore[arg-type]
        before = sys.getrefcount(attrs), sys.getrefcount(values), sys.getrefcount(ts)
        for _ in range(5_000):
            record.span("D", "s", ts, ts, attrs)
            record.event("D", "e", attrs, ts)
            record.counter("D", "c", values, ts)
            record.counter("D", "bad", 5)  # type: ignore[arg-type]
            runtime.recorder.buffer.clear()
    gc.collect()
    assert (sys.getrefcount(attrs), sys.getrefcount(values), sys.getrefcount(ts)) == before
