"""Rule-node scripts (JavaScript, and TBEL that is also valid JavaScript) in embedded V8 (mini-racer).

A script is ThingsBoard's function *body* with the arguments ``msg`` (parsed data), ``metadata`` (string map) and
``msgType``. It runs off the reactor thread, in a small bounded thread pool whose threads each own a V8 isolate, with
a time limit and a heap limit per call, so that a script that loops or allocates forever costs one call its
Failure and never stalls the reactor or a device actor.

Sandbox: an isolate has no I/O of any kind (no require, no network, no files); ``setTimeout``/``clearTimeout`` and
``Atomics.waitAsync``, which would let work outlive its call, are removed. After each call the isolate must be idle
within the time limit again: a script that left work queued (a promise job that loops) is stopped, its call fails
with ScriptTimeout, and the isolate is replaced. An isolate that hit a limit is always replaced. Known limit: the
scripts run on one thread share its isolate's global object, so one script can change built-ins that another one
sees (as in ThingsBoard's own JavaScript executor); the chains of one server are trusted alike.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from py_mini_racer import JSEvalException, JSOOMException, MiniRacer, mini_racer
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = [
    "Script",
    "ScriptError",
    "ScriptMemoryError",
    "ScriptRunner",
    "ScriptTimeout",
    "check_syntax",
    "compile_script",
]

#: The JavaScript that every isolate runs first: the one entry point (frozen, so scripts cannot replace it) and
#: the removal of the APIs that schedule work for later.
_PRELUDE = r"""
(function () {
  var stringify = JSON.stringify, Fn = Function, fns = Object.create(null);
  globalThis.setTimeout = undefined;
  globalThis.clearTimeout = undefined;
  if (typeof Atomics !== 'undefined') { Atomics.waitAsync = undefined; }
  Object.defineProperty(globalThis, '__nanoiot', {
    value: Object.freeze({
      define: function (id, body) { fns[id] = new Fn('msg', 'metadata', 'msgType', body); },
      run: function (id, args) {
        var r = fns[id](args[0], args[1], args[2]);
        return stringify(r === undefined ? {} : {r: r});
      }
    }),
    writable: false, configurable: false, enumerable: false
  });
})();
"""

#: Scripts defined in one isolate before it is replaced (chains reloaded many times leave old scripts behind).
_MAX_DEFINED = 2000
_SYNTAX_CHECK_TIMEOUT_S = 2.0
_SYNTAX_CHECK_MEMORY_BYTES = 64 * 2**20
_ERROR_LINE = re.compile(r"^(undefined|<anonymous>):(\d+): (.*)$")
#: ``new Function`` puts two lines ("function anonymous(msg,metadata,msgType", ") {") before the body.
_BODY_LINE_OFFSET = 2

_ids = itertools.count(1)
# V8 initialises its platform once per process: isolates are created one at a time.
_create_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


class ScriptError(Exception):
    """A script that does not compile, throws, or returns something that cannot leave V8."""

    def __init__(self, message: str, node_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node_name = node_name

    def __str__(self) -> str:
        return f"{self.message} (node {self.node_name!r})" if self.node_name else self.message


class ScriptTimeout(ScriptError):
    """The call (or work it left queued) ran past the time limit and was stopped."""


class ScriptMemoryError(ScriptError):
    """The call reached the isolate's heap limit and was stopped."""


@dataclass(frozen=True, slots=True)
class Script:
    """A function body that is known to compile; runs in any :class:`ScriptRunner`."""

    id: int
    body: str
    node_name: str


def _callback_loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop that carries mini-racer's completion callbacks, one for the process (a daemon thread,
    started with the first isolate). Shared and never closed, so that the callback of a call that was stopped
    still finds it when it arrives after its isolate was replaced (with a loop per isolate, it would not)."""
    global _loop
    if _loop is None:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="nanoiot-v8-callbacks", daemon=True).start()
        _loop = loop
    return _loop


class _Isolate:
    """A MiniRacer (one V8 isolate and context) on the shared callback loop."""

    def __init__(self) -> None:
        with _create_lock:
            self._owner: AbstractContextManager[MiniRacer] = mini_racer(_callback_loop())
            self.racer = self._owner.__enter__()

    def close(self) -> None:
        self._owner.__exit__(None, None, None)


def _js_message(error: BaseException) -> str:
    """V8's error, shortened to its first line, with the line number counted in the script body."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    match = _ERROR_LINE.match(first)
    if not match:
        return first
    source, line, message = match.groups()
    if source == "undefined":  # the script body, compiled by new Function
        return f"{message} (script line {max(1, int(line) - _BODY_LINE_OFFSET)})"
    return message


class _SyntaxChecker:
    """One isolate, used under a lock, that only compiles (never runs) function bodies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._isolate: _Isolate | None = None

    def check(self, body: str) -> str | None:
        code = f"new Function('msg', 'metadata', 'msgType', {json.dumps(body)}); 0"
        with self._lock:
            if self._isolate is None:
                self._isolate = _Isolate()
                self._isolate.racer.set_hard_memory_limit(_SYNTAX_CHECK_MEMORY_BYTES)
            racer = self._isolate.racer
            try:
                racer.eval(code, timeout_sec=_SYNTAX_CHECK_TIMEOUT_S)
            except JSEvalException as e:
                message = _js_message(e)
                if isinstance(e, TimeoutError) or racer.was_hard_memory_limit_reached():
                    self._replace()
                return message
            return None

    def _replace(self) -> None:
        isolate, self._isolate = self._isolate, None
        if isolate is not None:
            isolate.close()


_checker = _SyntaxChecker()


def check_syntax(body: str) -> str | None:
    """None if ``body`` compiles as a JavaScript function body, else V8's SyntaxError. Compiles only: runs
    nothing, needs no thread pool (a short blocking call on the calling thread, fine when a chain is loaded)."""
    return _checker.check(body)


def compile_script(body: str, node_name: str) -> Script:
    """A :class:`Script` for ``body``; raises ScriptError naming the node if it is blank or does not compile."""
    if not isinstance(body, str) or not body.strip():
        raise ScriptError("script is empty", node_name)
    error = check_syntax(body)
    if error is not None:
        raise ScriptError(error, node_name)
    return Script(next(_ids), body, node_name)


class _Sandbox:
    """One V8 isolate with the scripts defined in it; used by one thread at a time."""

    def __init__(self, max_memory_bytes: int) -> None:
        self.isolate = _Isolate()
        self.racer = self.isolate.racer
        self.racer.set_hard_memory_limit(max_memory_bytes)
        self.racer.eval(_PRELUDE)
        self.defined: set[int] = set()
        self.broken = False

    def run(self, script: Script, args: list[Any], timeout_s: float) -> Any:
        try:
            if script.id not in self.defined:
                self.racer.eval(f"__nanoiot.define({script.id}, {json.dumps(script.body)})", timeout_sec=timeout_s)
                self.defined.add(script.id)
            out = self.racer.eval(f"__nanoiot.run({script.id}, {json.dumps(args, ensure_ascii=True)})",
                                  timeout_sec=timeout_s)
            # Idle again within the limit, or the call left work queued (a promise job) that is still running.
            self.racer.eval("0", timeout_sec=timeout_s)
        except TimeoutError:
            self.broken = True
            raise ScriptTimeout(f"script ran longer than {timeout_s * 1000:.0f} ms and was stopped",
                                script.node_name) from None
        except JSOOMException:
            self.broken = True
            raise ScriptMemoryError("script reached the memory limit and was stopped", script.node_name) from None
        except JSEvalException as e:
            if self.racer.was_hard_memory_limit_reached():
                self.broken = True
                raise ScriptMemoryError("script reached the memory limit and was stopped",
                                        script.node_name) from None
            raise ScriptError(_js_message(e), script.node_name) from None
        except Exception as e:  # a conversion error or anything else mini-racer raises: this call fails
            raise ScriptError(f"script failed: {type(e).__name__}: {e}", script.node_name) from None
        if not isinstance(out, str):
            raise ScriptError("script result cannot be converted to JSON", script.node_name)
        return json.loads(out).get("r")

    def close(self) -> None:
        self.isolate.close()


def _arguments(msg: Any, metadata: Mapping[str, str], msg_type: str) -> list[Any]:
    return [msg, dict(metadata), msg_type]


class ScriptRunner(Service):
    """Runs scripts off the reactor thread: ``threads`` workers, each with its own isolate, and at most
    ``max_pending`` calls queued or running (beyond that a call fails at once rather than wait)."""

    def __init__(self, reactor: Any, *, timeout_ms: int = 100, max_memory_bytes: int = 32 * 2**20,
                 threads: int = 2, max_pending: int = 1000) -> None:
        self.reactor = reactor
        self.timeout_ms = timeout_ms
        self.max_memory_bytes = max_memory_bytes
        self.max_pending = max_pending
        self.pending = 0
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="nanoiot-scripts")
        self._local = threading.local()
        self._sandboxes: list[_Sandbox] = []
        self._sandboxes_lock = threading.Lock()
        self._stopped = False

    # --- service -----------------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._start_pool()

    def stopService(self) -> None:
        super().stopService()
        self.stop()

    def _start_pool(self) -> None:
        if not self._pool.started and not self._stopped:
            self._pool.start()  # minthreads=0: threads start with the first call, not here

    # --- scripts -----------------------------------------------------------------------------------------------

    def compile(self, body: str, node_name: str) -> Script:
        """See :func:`compile_script` (a syntax check only; nothing runs)."""
        return compile_script(body, node_name)

    def run(self, script: Script, msg: Any, metadata: Mapping[str, str], msg_type: str) -> Deferred[Any]:
        """Fires on the reactor thread with the script's result (JSON values; ``undefined`` is None), or fails
        with ScriptTimeout, ScriptMemoryError or ScriptError."""
        if self._stopped:
            return fail(ScriptError("script runner is stopped", script.node_name))
        if self.pending >= self.max_pending:
            return fail(ScriptError(f"too many scripts waiting to run (limit {self.max_pending})", script.node_name))
        self._start_pool()
        self.pending += 1
        d = deferToThreadPool(self.reactor, self._pool, self._run_in_thread, script,
                              _arguments(msg, metadata, msg_type))
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self.pending -= 1
        return result

    def _run_in_thread(self, script: Script, args: list[Any]) -> Any:
        sandbox: _Sandbox | None = getattr(self._local, "sandbox", None)
        if sandbox is None or sandbox.broken or len(sandbox.defined) >= _MAX_DEFINED:
            if sandbox is not None:
                self._retire(sandbox)
            sandbox = _Sandbox(self.max_memory_bytes)
            self._local.sandbox = sandbox
            with self._sandboxes_lock:
                self._sandboxes.append(sandbox)
        try:
            return sandbox.run(script, args, self.timeout_ms / 1000)
        finally:
            if sandbox.broken:
                self._retire(sandbox)
                self._local.sandbox = None

    def _retire(self, sandbox: _Sandbox) -> None:
        with self._sandboxes_lock:
            if sandbox in self._sandboxes:
                self._sandboxes.remove(sandbox)
        sandbox.close()

    def stop(self) -> None:
        """Wait for the workers (each call ends within its time limit) and free the isolates."""
        self._stopped = True
        if self._pool.started:
            self._pool.stop()
        with self._sandboxes_lock:
            sandboxes, self._sandboxes = self._sandboxes, []
        for sandbox in sandboxes:
            sandbox.close()


class InlineScriptRunner:
    """Runs scripts on the calling thread, with the same sandbox and limits: for tests and tools only (it blocks
    for as long as the script runs, so never use it on the reactor thread of a server)."""

    def __init__(self, *, timeout_ms: int = 100, max_memory_bytes: int = 32 * 2**20) -> None:
        self.timeout_ms = timeout_ms
        self.max_memory_bytes = max_memory_bytes
        self._sandbox: _Sandbox | None = None

    def compile(self, body: str, node_name: str) -> Script:
        return compile_script(body, node_name)

    def run(self, script: Script, msg: Any, metadata: Mapping[str, str], msg_type: str) -> Deferred[Any]:
        from twisted.internet.defer import succeed

        if self._sandbox is None or self._sandbox.broken:
            if self._sandbox is not None:
                self._sandbox.close()
            self._sandbox = _Sandbox(self.max_memory_bytes)
        try:
            return succeed(self._sandbox.run(script, _arguments(msg, metadata, msg_type), self.timeout_ms / 1000))
        except ScriptError:
            return fail()

    def stop(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
