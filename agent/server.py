"""The TCP layer: moves bytes between sockets, the protocol and the dispatcher.

Built on ``asyncio.BufferedProtocol`` rather than streams: a request that
can be answered at once (``ping``, errors) is written from ``buffer_updated``
without creating a task, and every read lands in one reused buffer (see
``LineReader.get_buffer`` for why that matters). That is what keeps the agent
close to the speed of the simplest possible JSON-lines server.

Per connection, requests may be pipelined: slow ones run as tasks while later
ones are read, and replies are written strictly in request order. Two kinds of
backpressure keep memory bounded: after ``max_pipelined`` unanswered requests
the connection stops reading, and while the client does not read its replies
(the transport's write buffer is full) the connection stops reading too.

A task that is running when its client disconnects is *not* cancelled: it may
be a deploy halfway through its steps, and those must finish or not start.

Who may stay connected under pressure (eviction at the connection limit, the
slow-line and idle deadlines, the memory budget for unfinished lines) is
decided by ``admission``; this module applies its verdicts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Optional, Set, Tuple, Union

if TYPE_CHECKING:
    import ssl  # only for the annotation: the agent imports ssl only when TLS is on

    from .tls_transport import TLSListener

from .admission import (HANDSHAKE_REFUSALS, NOT_CONTROLLER_REFUSALS, WRONG_TOKEN_REFUSALS, ConnectionState, Deadlines,
                        FailedLogins, expired, over_budget, pick_victim)
from .dispatch import Dispatcher
from .errors import WRONG_TOKEN, AgentError, Busy, InternalError, ShuttingDown, Timeout, TooLarge, Unauthorized
from .protocol import LineReader, error_line, parse_request, request_id_of

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0  # seconds between checks of the connection deadlines


class _InFlight:
    """A request still running, with what is needed to refuse it if the agent stops first."""

    __slots__ = ("task", "request_id", "has_id")

    def __init__(self, task: "asyncio.Task[bytes]", request_id: Any, has_id: bool) -> None:
        self.task = task
        self.request_id = request_id
        self.has_id = has_id


_Pending = Union[bytes, _InFlight]


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: "AgentServer") -> None:
        self._server = server
        self._dispatcher = server.dispatcher
        self._reader = LineReader(server.max_line_bytes)
        self._pending: Deque[_Pending] = deque()
        self._transport: Optional[asyncio.Transport] = None
        self._closed = False
        self._close_when_flushed = False
        self._draining = False
        self._paused_pipeline = False
        self._paused_writing = False
        now = server.now()
        self.state = ConnectionState(opened=now, last_read=now)
        self.peer: Any = None
        self.flushed: Optional[asyncio.Future] = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer = transport.get_extra_info("peername")
        server = self._server
        if server.tls_role_check is not None:
            refusal = server.tls_role_check(transport)
            if refusal is not None:  # counted with failed logins: summarised in the log, never a line each
                server.login_failed(self.peer, NOT_CONTROLLER_REFUSALS)
                log.debug("%s from %s", refusal, self.peer)
                self._closed = True
                transport.abort()
                return
        if len(server.connections) >= server.max_connections and not server.closing:
            server.make_room()
        if len(server.connections) >= server.max_connections or server.closing:
            reason = ShuttingDown("the agent is shutting down; reconnect in a moment") if server.closing else Busy(
                f"the agent already has {server.max_connections} connections open, each working for its client; "
                "retry in a moment")
            transport.write(error_line(reason))
            transport.close()
            self._closed = True
            server.refused_connections += 1
            return
        server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed or self._close_when_flushed:
            return
        state = self.state
        state.last_read = now = self._server.now()
        lines = self._reader.buffer_updated(nbytes)
        if lines or state.line_started is None:
            state.line_started = now  # a line ended here, so what is left began here (the deadline's start)
        for line in lines:
            if self._draining:
                has_id, request_id = request_id_of(line)
                refusal = ShuttingDown("the agent is shutting down; this request was not run")
                self._enqueue(error_line(refusal, request_id, has_id))
            else:
                self._handle_line(line)
        if self._reader.overflowed:
            self._enqueue(error_line(self._reader.too_large_error()))
            self._close_when_flushed = True
            self._flush()
        held = self._reader.pending_bytes
        if not held:
            state.line_started = None
        before, state.buffered = state.buffered, held
        self._server.hold(before, held)

    def eof_received(self) -> bool:
        # The client is done sending; answer what it asked, then close.
        self._close_when_flushed = True
        self._flush()
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._closed = True
        self._server.release(self)
        self._server.connections.discard(self)
        self._pending.clear()
        self._resolve_flushed()

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()

    # Requests and replies

    def _handle_line(self, line: bytes) -> None:
        try:
            request = parse_request(line)
        except AgentError as exc:
            has_id, request_id = request_id_of(line)
            self._enqueue(error_line(exc, request_id, has_id))
            return
        if not self._dispatcher.token_ok(request):
            self._server.login_failed(self.peer)
            self._enqueue(error_line(Unauthorized(WRONG_TOKEN), request.id, request.has_id))
            return
        self.state.authenticated = True
        self.state.last_active = self._server.now()
        outcome = self._dispatcher.handle(request, authorized=True)
        if isinstance(outcome, bytes):
            self._enqueue(outcome)
        else:
            task = asyncio.ensure_future(outcome)
            task.add_done_callback(self._task_done)
            self._enqueue(_InFlight(task, request.id, request.has_id))

    def _enqueue(self, item: _Pending) -> None:
        if not self._pending and isinstance(item, bytes) and self._transport is not None:
            self._transport.write(item)
            return
        self._pending.append(item)
        self._flush()

    def _task_done(self, _task: "asyncio.Task[bytes]") -> None:
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        while pending:
            head = pending[0]
            if isinstance(head, bytes):
                data = head
            elif head.task.done():
                data = self._task_result(head)
            else:
                break
            pending.popleft()
            if not self._closed and self._transport is not None:
                self._transport.write(data)
        self._update_reading()
        if not pending:
            if self._close_when_flushed and not self._closed and self._transport is not None:
                self._transport.close()
            self._resolve_flushed()

    @staticmethod
    def _task_result(item: _InFlight) -> bytes:
        task = item.task
        if task.cancelled():
            return error_line(ShuttingDown("the agent is shutting down; this request was cancelled"),
                              item.request_id, item.has_id)
        exc = task.exception()
        if exc is not None:  # the dispatcher never raises; if it does, it is our bug
            log.error("request task failed", exc_info=exc)
            return error_line(InternalError(f"internal error: {type(exc).__name__}: {exc}"),
                              item.request_id, item.has_id)
        return task.result()

    def _update_reading(self) -> None:
        if self._closed or self._transport is None:
            return
        self._paused_pipeline = len(self._pending) >= self._server.max_pipelined
        if self._paused_pipeline or self._paused_writing:
            self._transport.pause_reading()
        elif self._transport.is_reading() is False:
            self._transport.resume_reading()

    # Admission

    def snapshot(self) -> ConnectionState:
        """The state ``admission`` judges, brought up to date."""
        self.state.in_flight = len(self._pending)
        return self.state

    def close_with(self, error: AgentError) -> None:
        """Say why, and close now: the connection is evicted, over a deadline, or over the memory budget."""
        if self._closed or self._transport is None:
            return
        self._closed = True
        self._server.connections.discard(self)
        self._server.release(self)
        self._reader.discard()
        self._transport.write(error_line(error))
        self._transport.close()

    # Shutdown

    def start_draining(self) -> "asyncio.Future[None]":
        """Stop running new requests; resolve once every accepted one is answered."""
        self._draining = True
        self.flushed = asyncio.get_running_loop().create_future()
        if not self._pending or self._closed:
            self._resolve_flushed()
        return self.flushed

    def _resolve_flushed(self) -> None:
        if self.flushed is not None and not self.flushed.done():
            self.flushed.set_result(None)

    def refuse_unfinished(self) -> None:
        """At shutdown, after the grace period: answer what is done, refuse what is not, in order."""
        if self._transport is None or self._closed:
            return
        refusal = ShuttingDown("the agent is shutting down and this request did not finish in time; "
                               "it may or may not have taken effect")
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, bytes):
                self._transport.write(item)
            elif item.task.done():
                self._transport.write(self._task_result(item))
            else:
                self._transport.write(error_line(refusal, item.request_id, item.has_id))
        self._transport.close()


class AgentServer:
    """Accepts connections and hands each one a ``_Connection``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_connections: int,
        max_line_bytes: int,
        max_pipelined: int,
        deadlines: Deadlines = Deadlines(),
        max_buffered_bytes: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_connections = max_connections
        self.max_line_bytes = max_line_bytes
        self.max_pipelined = max_pipelined
        self.deadlines = deadlines
        self.max_buffered_bytes = max_buffered_bytes
        self.connections: Set[_Connection] = set()
        self.refused_connections = 0
        self.evicted_connections = 0
        self.buffered = 0  # bytes of unfinished lines, all connections
        self.closing = False
        self.failed_logins = FailedLogins()
        self.now = time.monotonic
        self._server: Optional[asyncio.AbstractServer] = None
        self._tls_listener: "Optional[TLSListener]" = None
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._closed_since_sweep: Counter = Counter()
        self.tls_role_check: Optional[Callable[[asyncio.Transport], Optional[str]]] = None  # set with TLS on

    # Admission (see ``admission``)

    def make_room(self) -> None:
        """At the limit: evict a stranger or the longest idle connection, so that a newcomer gets in."""
        victim = pick_victim((conn, conn.snapshot()) for conn in self.connections)
        if victim is not None:
            self.evicted_connections += 1
            self._closed_since_sweep["evicted to make room for new ones"] += 1
            victim.close_with(Busy(f"the agent is at its limit of {self.max_connections} connections and "
                                   "this one was idle or not authenticated: it was closed to let another in"))

    def hold(self, before: int, after: int) -> None:
        """A connection's unfinished line went from ``before`` to ``after`` bytes; enforce the budget."""
        self.buffered += after - before
        if self.buffered <= self.max_buffered_bytes:
            return
        for conn in over_budget(((c, c.snapshot()) for c in self.connections), self.max_buffered_bytes):
            self._closed_since_sweep[f"closed: unfinished requests held more than {self.max_buffered_bytes} "
                                     "bytes in all"] += 1
            conn.close_with(TooLarge(
                f"the agent holds more than {self.max_buffered_bytes} bytes of unfinished requests across its "
                "connections, and this one held the most: it was closed; send the request again"))

    def release(self, conn: "_Connection") -> None:
        """A connection is going: what it held no longer counts."""
        self.buffered -= conn.state.buffered
        conn.state.buffered = 0

    def login_failed(self, peer: Any, kind: str = WRONG_TOKEN_REFUSALS) -> None:
        line = self.failed_logins.record(peer[0] if isinstance(peer, tuple) else str(peer), self.now(), kind)
        if line is not None:
            log.warning("%s", line)

    def _sweep(self) -> None:
        """Once a second: close connections past a deadline, and say in one line each what was closed and why.

        One line per kind and second, not one per connection: under attack,
        the agent's log must not become the attack.
        """
        now = self.now()
        for conn in list(self.connections):
            why = expired(conn.snapshot(), self.deadlines, now)
            if why is not None:
                self._closed_since_sweep[f"closed: {why}"] += 1
                conn.close_with(Timeout(f"connection closed: {why}"))
        for why, count in self._closed_since_sweep.items():
            log.warning("%d connection(s) %s", count, why)
        self._closed_since_sweep.clear()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    async def start(self, host: str, port: int, tls: Optional["ssl.SSLContext"] = None) -> Tuple[str, int]:
        """Listen on ``host:port``; with ``tls``, every connection is TLS (see ``agent/tls_transport.py``)."""
        loop = asyncio.get_running_loop()
        # The backlog is generous: the system the seed documents used listen(5)
        # and left most of 1,000 simultaneous connections unanswered.
        if tls is None:
            self._server = await loop.create_server(
                lambda: _Connection(self), host, port, backlog=1024, reuse_address=True)
            sockets = list(self._server.sockets)
        else:
            from .tls_transport import TLSListener, listening_sockets

            self._tls_listener = TLSListener(
                await listening_sockets(host, port, backlog=1024), tls, lambda: _Connection(self),
                handshake_timeout=self.deadlines.unauthenticated_idle, max_handshakes=self.max_connections,
                on_failure=lambda peer: self.login_failed(peer, HANDSHAKE_REFUSALS))
            sockets = list(self._tls_listener.sockets)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        sockname = sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self, grace: float) -> None:
        """Stop accepting, answer (or refuse) what was already received, then close everything."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        draining = {conn: conn.start_draining() for conn in list(self.connections)}
        if draining:
            _, not_done = await asyncio.wait(list(draining.values()), timeout=grace)
            if not_done:
                log.warning("%d connection(s) still had requests running after %.1f s; closing them",
                            len(not_done), grace)
        for conn in draining:
            conn.refuse_unfinished()
        if self._server is not None:
            await self._server.wait_closed()
