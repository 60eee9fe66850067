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
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Deque, Optional, Set, Tuple, Union

from .dispatch import Dispatcher
from .errors import AgentError, Busy, InternalError, ShuttingDown
from .protocol import LineReader, error_line, parse_request, request_id_of

log = logging.getLogger(__name__)


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
        self._idle_handle: Optional[asyncio.TimerHandle] = None
        self.peer: Any = None
        self.flushed: Optional[asyncio.Future] = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer = transport.get_extra_info("peername")
        server = self._server
        if len(server.connections) >= server.max_connections or server.closing:
            reason = (
                ShuttingDown("the agent is shutting down; reconnect in a moment")
                if server.closing
                else Busy(
                    f"the agent already has {server.max_connections} connections open; "
                    "close idle ones or retry later"
                )
            )
            transport.write(error_line(reason))
            transport.close()
            self._closed = True
            server.refused_connections += 1
            return
        server.connections.add(self)
        self._arm_idle_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed or self._close_when_flushed:
            return
        self._arm_idle_timer()
        for line in self._reader.buffer_updated(nbytes):
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

    def eof_received(self) -> bool:
        # The client is done sending; answer what it asked, then close.
        self._close_when_flushed = True
        self._flush()
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._closed = True
        self._cancel_idle_timer()
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
        outcome = self._dispatcher.handle(request)
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

    # Idle timeout (off by default)

    def _arm_idle_timer(self) -> None:
        timeout = self._server.idle_timeout
        if timeout is None:
            return
        self._cancel_idle_timer()
        self._idle_handle = asyncio.get_running_loop().call_later(timeout, self._idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _idle(self) -> None:
        if self._pending:  # still working for this client: not idle
            self._arm_idle_timer()
            return
        log.info("closing idle connection from %s", self.peer)
        if self._transport is not None:
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
        idle_timeout: Optional[float],
    ) -> None:
        self.dispatcher = dispatcher
        self.max_connections = max_connections
        self.max_line_bytes = max_line_bytes
        self.max_pipelined = max_pipelined
        self.idle_timeout = idle_timeout
        self.connections: Set[_Connection] = set()
        self.refused_connections = 0
        self.closing = False
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: str, port: int) -> Tuple[str, int]:
        loop = asyncio.get_running_loop()
        # The backlog is generous: the system the seed documents used listen(5)
        # and left most of 1,000 simultaneous connections unanswered.
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=1024, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self, grace: float) -> None:
        """Stop accepting, answer (or refuse) what was already received, then close everything."""
        self.closing = True
        if self._server is not None:
            self._server.close()
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
