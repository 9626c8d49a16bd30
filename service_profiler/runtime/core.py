"""The profiler inside one engine process: settings, symbols, probes, recorder, `enable` watcher.

`Runtime.start()` reads the JSON config and the symbols YAML, opens the recorder, installs the
post-import hook (patching modules already imported at once) and starts a control thread that
re-reads the config when it changes, so flipping `enable` 0→1→0 starts and stops collection in every
process within about a second, and that enforces `timelimit`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, record
from . import envvars, patching, probes
from .expressions import CompiledExpression, ExpressionError, compile_expression
from .recorder import COUNTER, EVENT, SPAN, Recorder, install_sigterm_flush
from .settings import ProfilerSettings, SettingsResult, load_settings, unsupported_options
from .speedups import Emitter, make_switch
from .symbols import SymbolSpec, installed_version, load_symbols, resolve_symbols_path, version_gate
from .threads import start_daemon

log = logging.getLogger("service_profiler")
_POLL_INTERVAL_S = 0.25
# Evaluation / handler failure counts are re-written into the raw file at most this often while the
# process runs (and always at exit and SIGTERM), so a failing expression adds a line per interval, not
# per call.
_ERROR_COUNT_INTERVAL_S = 30.0


@dataclass
class PatchState:
    spec: SymbolSpec
    target: patching.ResolvedTarget | None = None
    installed: Any = None
    wrapper: Callable[..., Any] | None = None
    probe: probes.Probe | None = None
    set_switch: Callable[[bool], None] | None = None  # the C fast path's flag, when there is one
    # A custom handler records through `record.*`, which applies the `domain` filter per record; its
    # probe stays on whenever collection is on, so handlers that join records across domains (batch
    # ids, request states) keep their state even when only some domains are written.
    records_itself: bool = False


@dataclass
class PatchReport:
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.applied)} patched, {len(self.pending)} awaiting import, "
                f"{len(self.skipped)} skipped, {len(self.failed)} failed")


def detect_backend() -> str:
    """"npu", "cpu" or "cuda", from what is installed (never imports torch or initialises a device)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        return "npu"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "cpu"
    return "cpu" if "+cpu" in torch_version else "cuda"


def new_run_dir(prof_dir: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    return Path(prof_dir) / f"{stamp}-{os.getpid()}"


class Runtime:
    """One per process. Implements `record.RecordSink` for handlers."""

    def __init__(self, config_path: str | None, env: Mapping[str, str],
                 settings: ProfilerSettings | None = None) -> None:
        # No config path: `settings` hold for the life of the process (a front door started without a
        # config file, see `frontdoors.options`); there is nothing to watch.
        self.config_path = Path(config_path) if config_path else None
        self._fixed_settings = settings or ProfilerSettings()
        self.env = env
        self.settings = ProfilerSettings()
        self._emitter: Any = None  # the recording API in C (speedups.Emitter), once the recorder exists
        self._enabled = False
        self._domains: frozenset[str] | None = None
        self.recorder: Recorder | None = None
        self.hook = patching.PostImportHook(self._on_module_imported)
        self.states: dict[str, PatchState] = {}
        self.report = PatchReport()
        self._by_module: dict[str, list[PatchState]] = {}
        self._our_wrappers: set[int] = set()
        self._config_stamp: tuple[int, int] | None = None
        self._deadline: float | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problems_seen: set[str] = set()
        self._problem_lock = threading.Lock()
        self._unsupported_seen: set[tuple[str, str]] = set()
        self.backend = "cpu"
        self._error_counts_written: dict[tuple[str, str], int] = {}
        self._error_counts_at = 0.0
        self._samplers: Any = None

    @property
    def enabled(self) -> bool:
        """Collection is on."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        if self._emitter is not None:
            self._emitter.enabled = value

    @property
    def domains(self) -> frozenset[str] | None:
        """The domains kept; None keeps all."""
        return self._domains

    @domains.setter
    def domains(self, value: frozenset[str] | None) -> None:
        self._domains = value
        if self._emitter is not None:
            self._emitter.domains = value

    # -- start-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        result = (load_settings(self.config_path) if self.config_path is not None
                  else SettingsResult(self._fixed_settings))
        self.settings = result.settings
        self._config_stamp = self._stamp()
        run_dir = self.env.get(envvars.SERVICE_PROF_RUN_DIR) or str(new_run_dir(self.settings.prof_dir))
        # Children (EngineCore, workers) inherit this, so one service writes one run directory.
        os.environ[envvars.SERVICE_PROF_RUN_DIR] = run_dir
        self.is_root = envvars.SERVICE_PROF_RUN_DIR not in self.env
        self.recorder = Recorder(
            Path(run_dir),
            flush_interval_s=self.settings.flush_interval_s,
            max_buffered=self.settings.max_buffered_records,
            profiler_version=__version__,
        )
        for problem in result.problems:
            self.problem(problem)
        self.backend = detect_backend()
        self._report_unsupported(self.settings)
        self._load_symbols()
        self.hook.install()
        if not self._patch_already_imported():
            # The start-up report, also when nothing is patched yet; each lazy patch writes an updated one.
            self._write_patch_report()
        record.set_sink(self)
        self.recorder.flush_hooks.append(self.write_error_counts)
        self.recorder.start()
        recorder = self.recorder
        install_sigterm_flush(lambda reason: recorder.flush(final=True, reason=reason))
        self._apply(self.settings, "startup")
        self._start_control_thread()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)
        log.info("service-profiler: pid %d: %s; run dir %s", os.getpid(), self.report.summary(), run_dir)

    def _load_symbols(self) -> None:
        resolved = resolve_symbols_path(self.env)
        for problem in resolved.problems:
            self.problem(problem)
        if resolved.path is None:
            return
        loaded = load_symbols(resolved.path)
        for problem in loaded.problems:
            self.problem(problem)
        engine: dict[str, str] | None = None
        for spec in loaded.specs:
            if spec.symbol in self.states:
                self.problem(f"{spec.source}: {spec.symbol} is listed twice; the first entry is used")
                continue
            top = spec.module.split(".")[0]
            found = installed_version(top)
            if found is not None and engine is None:
                engine = {"name": found[0], "version": found[1]}
            reason = version_gate(spec, found[1] if found else None, engine=found[0] if found else None)
            state = PatchState(spec)
            self.states[spec.symbol] = state
            if reason is not None:
                self.report.skipped.append({"symbol": spec.symbol, "reason": reason})
                continue
            self._by_module.setdefault(spec.module, []).append(state)
            self.report.pending.append(spec.symbol)
            self.hook.watch(spec.module)
        assert self.recorder is not None
        self.recorder.engine = engine

    def _patch_already_imported(self) -> int:
        """Patch the targets of modules imported before the profiler; returns how many modules (each
        writes an updated patch report)."""
        import sys

        imported = 0
        for module_name in list(self._by_module):
            module = sys.modules.get(module_name)
            if module is not None:
                self._on_module_imported(module)
                imported += 1
        return imported

    # -- patching ---------------------------------------------------------------------------------

    def _on_module_imported(self, module: types.ModuleType) -> None:
        with self._lock:
            for state in self._by_module.get(module.__name__, []):
                if state.installed is None:
                    self._patch(state, module)
            self._write_patch_report()

    def _patch(self, state: PatchState, module: types.ModuleType) -> None:
        spec = state.spec
        if spec.symbol in self.report.pending:
            self.report.pending.remove(spec.symbol)
        try:
            target = patching.resolve(module, spec.qualname, lambda raw: id(raw) in self._our_wrappers)
            probe = self._make_probe(spec, target)
            # The C switch forwards straight to the original while collection is off (~25 ns instead
            # of ~140 ns for a Python wrapper); async and generator targets keep the Python wrapper.
            wrapper, set_switch = make_switch(target.function, self._make_wrapper(spec, target, probe, state))
            state.installed = patching.install(target, wrapper)
        except patching.AlreadyPatched as exc:
            self.report.skipped.append({"symbol": spec.symbol, "reason": str(exc)})
            return
        except Exception as exc:
            self.report.failed.append({"symbol": spec.symbol, "reason": str(exc) or repr(exc)})
            self.problem(f"{spec.source}: cannot patch {spec.symbol}: {exc}")
            return
        state.target, state.probe, state.wrapper, state.set_switch = target, probe, wrapper, set_switch
        self._our_wrappers.add(id(wrapper))
        self._refresh(state)
        self.report.applied.append(spec.symbol)

    def _make_probe(self, spec: SymbolSpec, target: patching.ResolvedTarget) -> probes.Probe:
        assert self.recorder is not None
        try:
            signature: inspect.Signature | None = inspect.signature(target.function)
        except (TypeError, ValueError):
            signature = None
        compiled: list[tuple[str, CompiledExpression]] = []
        for attribute in spec.attributes:
            try:
                compiled.append((attribute.name, compile_expression(attribute.expr, signature)))
            except ExpressionError as exc:
                self.problem(f"{spec.source}: attribute {attribute.name!r} of {spec.symbol} disabled: {exc}")
        return probes.Probe(
            symbol=spec.symbol,
            domain=spec.domain,
            name=spec.name,
            chan=self.recorder.channel(SPAN, spec.domain, spec.name, spec.symbol),
            buffer=self.recorder.buffer,
            max_buffered=self.recorder.max_buffered,
            recorder_drop=self.recorder.count_dropped,
            on_problem=self.problem,
            attributes=tuple(compiled),
            caller_filter=spec.caller_filter,
        )

    def _make_wrapper(
        self, spec: SymbolSpec, target: patching.ResolvedTarget, probe: probes.Probe, state: PatchState
    ) -> Callable[..., Any]:
        fn = target.function
        handler = self._load_handler(spec) if spec.handler != "timer" else None
        if handler is not None and inspect.iscoroutinefunction(handler) and not inspect.iscoroutinefunction(fn):
            # It could only return an un-awaited coroutine: the original would never run inside it.
            self.problem(f"{spec.source}: handler {spec.handler} is an async function but {spec.symbol} is "
                         "not: write a plain (def) handler for it; using the timer instead")
            handler = None
        if handler is not None:
            state.records_itself = True
            if inspect.iscoroutinefunction(fn) and inspect.iscoroutinefunction(handler):
                return probes.make_async_handler_wrapper(fn, probe, handler, target.is_method)
            # Of the original's kind (coroutine, generator, ...): inspect answers as it did.
            return probes.make_sync_handler_wrapper_for_kind(fn, probe, handler, target.is_method)
        if inspect.isasyncgenfunction(fn):
            return probes.make_async_generator_timer(fn, probe)
        if inspect.iscoroutinefunction(fn):
            return probes.make_async_timer(fn, probe)
        if inspect.isgeneratorfunction(fn):
            return probes.make_generator_timer(fn, probe)
        return probes.make_timer(fn, probe)

    def _load_handler(self, spec: SymbolSpec) -> Callable[..., Any] | None:
        module_name, _, func_name = spec.handler.partition(":")
        try:
            handler = getattr(importlib.import_module(module_name), func_name)
            if not callable(handler):
                raise TypeError(f"{spec.handler} is not callable")
            return handler
        except Exception as exc:
            # Documented behaviour: a handler that cannot be imported falls back to the timer.
            self.problem(f"{spec.source}: handler {spec.handler} for {spec.symbol} cannot be loaded "
                         f"({exc!r}); using the timer instead")
            return None

    def unpatch_all(self) -> int:
        """Restore every original; returns how many were restored. Idempotent."""
        restored = 0
        with self._lock:
            for state in self.states.values():
                if state.target is not None and state.installed is not None:
                    if patching.uninstall(state.target, state.installed):
                        restored += 1
                    state.installed = None
        return restored

    def repatch(self) -> int:
        """Put back every wrapper `unpatch_all` removed; returns how many. Idempotent."""
        installed = 0
        with self._lock:
            for state in self.states.values():
                if state.target is not None and state.wrapper is not None and state.installed is None:
                    state.installed = patching.install(state.target, state.wrapper)
                    installed += 1
        return installed

    def _write_patch_report(self) -> None:
        """Queue the current report; readers keep the last one of a process.

        A report with something applied, skipped or failed creates the process's raw file by itself.
        One that only awaits imports goes into the file as soon as the process writes anything else
        (a record, a warning, a later report), but does not create it alone: every helper process an
        engine starts (resource trackers, compile workers) inherits the variables and would otherwise
        leave a file that only says "nothing imported".
        """
        if self.recorder is not None:
            report = self.report
            self.recorder.control({"t": "patch", "applied": list(report.applied), "pending": list(report.pending),
                                   "skipped": list(report.skipped), "failed": list(report.failed)},
                                  substantive=bool(report.applied or report.skipped or report.failed))

    # -- enable / domains / timelimit ---------------------------------------------------------------

    def _refresh(self, state: PatchState) -> None:
        probe = state.probe
        if probe is None:
            return
        active = self.enabled and (state.records_itself or self.domains is None or probe.domain in self.domains)
        probe.active = active
        if state.set_switch is not None:
            state.set_switch(active)

    def _writable_run_dir(self) -> bool:
        """Whether this process can write its raw file; when it cannot, collection stays off and the
        problem says why (records collected there would all be lost)."""
        recorder = self.recorder
        if recorder is None:
            return True
        run_dir = recorder.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(run_dir, os.W_OK | os.X_OK)
            reason = "it is not writable by this user"
        except (OSError, ValueError) as exc:
            writable, reason = False, f"{type(exc).__name__}: {exc}"
        if not writable:
            self.problem(f"{self.config_path}: \"prof_dir\" = {json.dumps(self.settings.prof_dir)}: cannot "
                         f"write the run directory {run_dir} ({reason}); collection stays off; set "
                         "\"prof_dir\" to a directory this service's user can write")
        return writable

    def _apply(self, settings: ProfilerSettings, reason: str) -> None:
        with self._lock:
            was_enabled = self.enabled
            self.settings = settings
            self.domains = settings.domain
            self.enabled = settings.enable and (was_enabled or self._writable_run_dir())
            if self.enabled and (not was_enabled or reason == "startup"):
                self._deadline = time.monotonic() + settings.timelimit if settings.timelimit > 0 else None
            elif not self.enabled:
                self._deadline = None
            for state in self.states.values():
                self._refresh(state)
            if self.enabled != was_enabled or reason == "startup":
                self._note_state(reason)
            self._update_samplers()

    def set_enabled(self, enabled: bool, reason: str) -> None:
        with self._lock:
            if enabled == self.enabled:
                return
            self.enabled = enabled
            for state in self.states.values():
                self._refresh(state)
            self._note_state(reason)
            self._update_samplers()

    def _note_state(self, reason: str) -> None:
        if self.recorder is not None:
            self.recorder.control({"t": "state", "enabled": self.enabled, "ts": time.perf_counter_ns(),
                                   "reason": reason}, substantive=False)
        log.debug("service-profiler: pid %d: collection %s (%s)", os.getpid(),
                  "on" if self.enabled else "off", reason)

    def _update_samplers(self) -> None:
        from .sampling import Samplers

        if self._samplers is None:
            self._samplers = Samplers(self.problem)
        self._samplers.update(self.settings if self.enabled else None, host=self.is_root)

    def _stamp(self) -> tuple[int, int] | None:
        if self.config_path is None:
            return None
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def poll(self) -> None:
        """One control-thread tick: reload a changed config, enforce the time limit."""
        stamp = self._stamp()
        if stamp != self._config_stamp and self.config_path is not None:
            self._config_stamp = stamp
            result = load_settings(self.config_path)
            for problem in result.problems:
                self.problem(problem)
            if result.failed:
                # Unreadable as a whole: what `enable` says is unknown. Keep the last good settings
                # (a failed reload never switches collection on, nor anything else).
                self.problem(f"{self.config_path}: keeping the settings read before (collection "
                             f"{'on' if self.enabled else 'off'}) until the file can be read")
                return
            self._report_unsupported(result.settings)
            self._apply(result.settings, "config")
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._deadline = None
            self.set_enabled(False, "timelimit")

    def _report_unsupported(self, settings: ProfilerSettings, inherited: bool = False) -> None:
        """Report each option that has no effect on this backend once per process: an option switched
        on by editing the config while the service runs is reported at that reload, and not again when
        the file is edited later (even with another value).

        `inherited`: a forked child re-states what its parent reported into its own file, without
        logging it again; the note alone is no reason for the recorder to write the file.
        """
        for option in unsupported_options(settings, self.backend):
            key = (option.key, option.reason)
            with self._problem_lock:
                if key in self._unsupported_seen:
                    continue
                self._unsupported_seen.add(key)
            self.problem(option.message, inherited=inherited)

    def _control_loop(self) -> None:
        while not self._stop.wait(_POLL_INTERVAL_S):
            try:
                self.poll()
            except Exception as exc:
                self.problem(f"config watcher: {exc!r}")

    def _start_control_thread(self) -> None:
        self._stop = threading.Event()
        self._thread = start_daemon(self._control_loop, "control")

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._samplers = None
        # The child writes its own file: its warnings and failure counts start from zero there.
        self._problem_lock = threading.Lock()
        self._problems_seen = set()
        self._unsupported_seen = set()
        self._error_counts_written = {}
        for state in self.states.values():
            if state.probe is not None:
                state.probe.errors.clear()
                state.probe.error_messages.clear()
        self._start_control_thread()
        self._report_unsupported(self.settings, inherited=True)
        self._update_samplers()

    def stop(self) -> None:
        self._stop.set()
        if self._samplers is not None:
            self._samplers.update(None, host=False)
        if self.recorder is not None:
            self.recorder.flush(final=True)

    def abort(self) -> None:
        """Undo a `start()` that failed half-way: no import hook, wrapper, sink or thread of ours is
        left in the host. Best effort; never raises."""
        steps: list[Callable[[], Any]] = [self._stop.set, self.hook.remove, self.unpatch_all]
        if self._samplers is not None:
            steps.append(lambda: self._samplers.update(None, host=False))
        if self.recorder is not None:
            steps.append(self.recorder.close)
        for step in steps:
            try:
                step()
            except Exception:
                pass
        previous = record.set_sink(None)
        if previous is not self:
            record.set_sink(previous)

    # -- problems ---------------------------------------------------------------------------------

    def problem(self, message: str, inherited: bool = False) -> None:
        """Report a problem once per process: the log and the raw file (`warn` line). `inherited`: the
        parent process already logged it; only note it in this process's file."""
        with self._problem_lock:  # engine threads, the control and writer threads all report
            if message in self._problems_seen:
                return
            self._problems_seen.add(message)
        if not inherited:
            log.warning("service-profiler: %s", message)
        if self.recorder is not None:
            self.recorder.control({"t": "warn", "msg": message, "count": 1}, substantive=not inherited)

    def write_error_counts(self, final: bool) -> None:
        """Recorder flush hook: re-write the `warn` line of each failing expression / handler whose
        count grew since it was last written, with the new total (readers show the last count).

        The call path only counts (`Probe.note_error`); this runs on the writer thread, at most every
        `_ERROR_COUNT_INTERVAL_S` and at every final flush (exit, SIGTERM)."""
        now = time.monotonic()
        if not final and now - self._error_counts_at < _ERROR_COUNT_INTERVAL_S:
            return
        self._error_counts_at = now
        recorder = self.recorder
        if recorder is None:
            return
        for state in list(self.states.values()):
            probe = state.probe
            if probe is None or not probe.errors:
                continue
            for what, count in list(probe.errors.items()):  # engine threads may add keys meanwhile
                key = (probe.symbol, what)
                message = probe.error_messages.get(what)
                if message is None or count <= self._error_counts_written.get(key, 1):
                    continue
                self._error_counts_written[key] = count
                recorder.control({"t": "warn", "msg": message, "count": count})

    # -- record.RecordSink ------------------------------------------------------------------------

    def domain_enabled(self, domain: str) -> bool:
        return self._enabled and (self._domains is None or domain in self._domains)

    def direct_functions(self) -> record.RecordFunctions | None:
        """`record.span`, `event`, `counter` and `enabled` in one C call each, through the same recorder
        buffer and channel table as `span` & co. below (`speedups.Emitter`); None without the extension
        or before the recorder exists."""
        emitter = self._emitter
        if emitter is None:
            recorder = self.recorder
            if Emitter is None or recorder is None:
                return None
            emitter = Emitter(recorder.buffer, recorder.channel_ids, recorder.channel, recorder.count_dropped,
                              record.now_ns, recorder.max_buffered)
            emitter.domains, emitter.enabled = self._domains, self._enabled
            self._emitter = emitter
        functions: record.RecordFunctions = (emitter.span, emitter.event, emitter.counter, emitter.enabled_for)
        return functions

    # span/event/counter: called by `record` on an engine thread for every record. The channel lookup and
    # the bounded append are written out in each (no helper calls): this is most of a record's cost.

    def span(self, domain: str, name: str, start_ns: int, end_ns: int, tid: int, attrs: Any) -> None:
        recorder = self.recorder
        assert recorder is not None
        chan = recorder.channel_ids.get((SPAN, domain, name))
        if chan is None:
            chan = recorder.channel(SPAN, domain, name)
        buffer = recorder.buffer
        if len(buffer) < recorder.max_buffered:
            buffer.append((chan, start_ns, end_ns, tid, attrs))
        else:
            recorder.count_dropped()

    def event(self, domain: str, name: str, ts_ns: int, tid: int, attrs: Any) -> None:
        recorder = self.recorder
        assert recorder is not None
        chan = recorder.channel_ids.get((EVENT, domain, name))
        if chan is None:
            chan = recorder.channel(EVENT, domain, name)
        buffer = recorder.buffer
        if len(buffer) < recorder.max_buffered:
            buffer.append((chan, ts_ns, tid, attrs))
        else:
            recorder.count_dropped()

    def counter(self, domain: str, name: str, ts_ns: int, values: Mapping[str, float]) -> None:
        recorder = self.recorder
        assert recorder is not None
        chan = recorder.channel_ids.get((COUNTER, domain, name))
        if chan is None:
            chan = recorder.channel(COUNTER, domain, name)
        buffer = recorder.buffer
        if len(buffer) < recorder.max_buffered:
            buffer.append((chan, ts_ns, dict(values)))
        else:
            recorder.count_dropped()

    def meta(self, key: str, value: object) -> None:
        if self.recorder is not None:
            self.recorder.control({"t": "meta", "key": key, "value": value})

    def flush_final(self, reason: str) -> None:
        """`record.process_ending`: flush now, ending with a `close` line (later records, if any, are
        still written by the writer thread and at exit)."""
        if self.recorder is not None:
            self.recorder.flush(final=True, reason=reason)
