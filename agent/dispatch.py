"""From a parsed request to the bytes of its reply.

The dispatcher checks the token, then routes the request to a built-in command
or to a handler from the registry, and turns every outcome (a result, an
exception, a timeout, a return value that is not JSON) into one reply line.
Nothing a handler does can raise past it.

Why handlers and built-ins are kept apart:

- Plain (sync) handlers run in a bounded thread pool that only handlers use.
  A thread that passes its time limit cannot be killed in Python; it is
  counted as *stuck* until it returns, and once every thread is stuck, new
  handler calls are refused with ``busy`` instead of queueing forever.
- Built-ins never touch that pool. ``ping`` and the other quick built-ins are
  answered synchronously, on the spot; the deploy commands use their own
  workers. So no handler, however stuck, can delay ``ping`` or a rollback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Union

from .errors import (
    AgentError,
    BadRequest,
    Busy,
    HandlerFailed,
    InternalError,
    Timeout,
    Unauthorized,
    UnknownCommand,
    WRONG_TOKEN,
)
from .protocol import Request, encode_message, error_line, finish_reply
from .registry import Handler, Registry

log = logging.getLogger(__name__)

Reply = Dict[str, Any]
QuickBuiltin = Callable[[Request], Reply]
SlowBuiltin = Callable[[Request], Awaitable[Reply]]
ResultListener = Callable[[str, str, Optional[str]], None]


@dataclass
class CommandStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    total_seconds: float = 0.0
    last_error: Optional[str] = None
    last_error_at: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "mean_seconds": round(self.total_seconds / self.calls, 6) if self.calls else None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


@dataclass(frozen=True)
class _Builtin:
    func: Callable[[Request], Any]
    quick: bool


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        *,
        token: Optional[str],
        handler_timeout: float,
        handler_threads: int,
        on_stuck: Optional[Callable[[], None]] = None,
    ) -> None:
        self.registry = registry
        self._on_stuck = on_stuck  # told each time a call passes its limit and keeps its thread
        self._token = token.encode("utf-8") if token else None
        self.handler_timeout = handler_timeout
        self.handler_threads = handler_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=handler_threads, thread_name_prefix="handler"
        )
        self._builtins: Dict[str, _Builtin] = {}
        self.stats: Dict[str, CommandStats] = {}
        self.stuck_calls = 0  # handler threads still running past their time limit
        self.stuck_total = 0
        self._listeners: List[ResultListener] = []

    # Setup

    def add_quick_builtin(self, name: str, func: QuickBuiltin) -> None:
        """A built-in answered synchronously on the event loop: it must never block."""
        self._builtins[name] = _Builtin(func, quick=True)

    def add_builtin(self, name: str, func: SlowBuiltin) -> None:
        """A built-in coroutine; it may await its own workers but never the handler pool."""
        self._builtins[name] = _Builtin(func, quick=False)

    @property
    def builtin_names(self) -> List[str]:
        return sorted(self._builtins)

    def add_result_listener(self, listener: ResultListener) -> None:
        """``listener(module_name, command, error)`` after every handler call; ``error`` is None on success.

        A handler that returns ``success: false`` has not failed: only raising,
        timing out or returning something that is not a JSON object counts.
        """
        self._listeners.append(listener)

    def close(self) -> None:
        # Threads that are stuck cannot be joined; do not wait for them.
        self._pool.shutdown(wait=False, cancel_futures=True)

    # Dispatch

    def handle(self, request: Request, *, authorized: bool = False) -> Union[bytes, Awaitable[bytes]]:
        """Reply bytes now (quick paths and errors), or an awaitable for them.

        ``authorized``: the caller has checked the token with ``token_ok``.
        """
        try:
            if not authorized:
                self._authorize(request)
            builtin = self._builtins.get(request.command)
            if builtin is not None:
                if builtin.quick:
                    return self._encode(builtin.func(request), request)
                return self._run_builtin(builtin, request)
            handler = self.registry.table.get(request.command)
            if handler is None:
                raise UnknownCommand(self._unknown_message(request.command))
            # Checked before the call is counted: a client's bad argument is not the module's failure.
            timeout = self._timeout_for(request)
            return self._run_handler(handler, request, timeout)
        except AgentError as exc:
            return error_line(exc, request.id, request.has_id)
        except Exception as exc:  # a bug in a quick built-in: report it, keep serving
            log.exception("built-in %s failed", request.command)
            return self._internal_error(exc, request)

    def token_ok(self, request: Request) -> bool:
        """True when the agent has no token, or the request carries it (compared in constant time)."""
        if self._token is None:
            return True
        given = request.args.get("token")
        # surrogatepass: a lone surrogate ("\ud800") is a wrong token, not an internal error
        return isinstance(given, str) and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self._token)

    def _authorize(self, request: Request) -> None:
        if not self.token_ok(request):
            raise Unauthorized(WRONG_TOKEN)

    def _unknown_message(self, command: str) -> str:
        known = self.registry.all_commands()
        import difflib  # here, not at the top: the agent's start time is mostly imports

        close = difflib.get_close_matches(command, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown command {command!r}{hint} (list_commands shows all {len(known)} commands)"

    async def _run_builtin(self, builtin: _Builtin, request: Request) -> bytes:
        try:
            reply = await builtin.func(request)
        except AgentError as exc:
            return error_line(exc, request.id, request.has_id)
        except Exception as exc:
            log.exception("built-in %s failed", request.command)
            return self._internal_error(exc, request)
        return self._encode(reply, request)

    async def _run_handler(self, handler: Handler, request: Request, timeout: float) -> bytes:
        stats = self.stats.setdefault(handler.command, CommandStats())
        stats.calls += 1
        started = time.perf_counter()
        error: Optional[AgentError] = None
        try:
            args = dict(request.args)
            args.pop("token", None)  # handlers never see the secret
            if handler.is_async:
                result = await asyncio.wait_for(_guarded(handler.func, args), timeout)
            else:
                result = await self._in_thread(handler, args, timeout)
            if not isinstance(result, dict):
                raise HandlerFailed(
                    f"handler for {handler.command!r} returned {type(result).__name__}, "
                    "expected a dict (a JSON object)"
                )
            return self._encode(dict(result), request, strict=True, command=handler.command)
        except asyncio.TimeoutError:
            stats.timeouts += 1
            error = Timeout(
                f"handler for {handler.command!r} did not finish within {timeout:g} s "
                "(the agent's limit is set with --handler-timeout; a request's 'timeout' can only lower it)"
            )
        except AgentError as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a handler must not stop the agent
            error = HandlerFailed(f"handler for {handler.command!r} raised {type(exc).__name__}: {exc}")
            log.warning("handler %s raised", handler.command, exc_info=exc)
        finally:
            stats.total_seconds += time.perf_counter() - started
            self._notify(handler, error)
        assert error is not None
        stats.errors += 1
        stats.last_error = error.message
        stats.last_error_at = time.time()
        if not isinstance(error, Busy):
            log.warning("command %s failed: %s", handler.command, error.message)
        return error_line(error, request.id, request.has_id)

    async def _in_thread(self, handler: Handler, args: Dict[str, Any], timeout: float) -> Any:
        if self.stuck_calls >= self.handler_threads:
            raise Busy(
                f"all {self.handler_threads} handler threads are stuck in calls that passed their "
                "time limit; built-in commands still work, handler commands will again once those return "
                "(a restart frees them at once)"
            )
        loop = asyncio.get_running_loop()
        future = self._pool.submit(handler.func, args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), timeout)
        except asyncio.TimeoutError:
            if not future.cancelled() and not future.done():
                self.stuck_calls += 1
                self.stuck_total += 1
                future.add_done_callback(lambda _f: _call_soon(loop, self._unstick))
                if self._on_stuck is not None:
                    self._on_stuck()
            raise

    def _unstick(self) -> None:
        self.stuck_calls -= 1

    def _notify(self, handler: Handler, error: Optional[AgentError]) -> None:
        message = None if error is None or isinstance(error, Busy) else error.message
        for listener in self._listeners:
            try:
                listener(handler.module_name, handler.command, message)
            except Exception:
                log.exception("result listener failed")

    def _timeout_for(self, request: Request) -> float:
        value = request.args.get("timeout")
        if value is None:
            return self.handler_timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise BadRequest(f"'timeout' must be a positive number of seconds, got {value!r}")
        return min(float(value), self.handler_timeout)

    def _encode(
        self, reply: Reply, request: Request, *, strict: bool = False, command: str = ""
    ) -> bytes:
        try:
            return encode_message(finish_reply(reply, request.id, request.has_id))
        except (TypeError, ValueError) as exc:
            if not strict:
                raise
            raise HandlerFailed(
                f"handler for {command!r} returned a value that is not JSON-serialisable: {exc}"
            ) from None

    def _internal_error(self, exc: BaseException, request: Request) -> bytes:
        error = InternalError(f"internal error in {request.command!r}: {type(exc).__name__}: {exc} "
                              "(a bug in the agent: its log has the traceback; please report it)")
        return error_line(error, request.id, request.has_id)


async def _guarded(func: Callable[[Dict[str, Any]], Awaitable[Any]], args: Dict[str, Any]) -> Any:
    """Await an async handler, turning ``SystemExit``/``KeyboardInterrupt`` into ordinary errors.

    asyncio re-raises those two out of the event loop when a task raises them,
    which would stop the agent; caught here, inside the task, they cannot.
    """
    try:
        return await func(args)
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        raise HandlerFailed(f"handler raised {type(exc).__name__}: {exc}") from None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the loop is closed: the agent is shutting down
