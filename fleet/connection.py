"""One controller-side connection to one agent.

Sends requests with an ``id`` and matches replies by that ``id``; every
request has a time limit; the connection stays open between requests. With
``keepalive`` it pings the agent when idle and reconnects after a drop, with
exponential backoff and jitter so a fleet that lost its network does not
reconnect in lockstep. Lines that match no pending request (a late reply, an
event the agent pushes) go to ``on_message``.

Framing uses the agent's own sans-IO protocol module, so both ends agree on
line limits and encoding by construction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from typing import Any, Callable, Dict, Optional

from agent.protocol import LineReader, address_request, decode_message, token_field

from .deadlines import Deadlines
from .errors import (CommandTimeout, ConnectionLost, DeviceError, DeviceUnreachable, ProtocolError, TLSRefused,
                     WrongDevice)
from .inventory import Device
from .pending import PendingReplies, ReplyCallback, Requester
from .tls import client_context, explain, identity_problem, refusal

log = logging.getLogger(__name__)

# Limits
MAX_REPLY_BYTES = 64 * 1024 * 1024
READ_SIZE = 16 * 1024  # per connection, for the life of the connection: 16 MiB for 1,000 devices
# Timeouts (seconds)
DEFAULT_HEARTBEAT = 15.0
FIRST_HEARTBEAT = 2.0  # seconds after connecting, when nothing has been answered yet
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
RETRY_TICK = 0.05  # reconnect attempts are made on a grid of this period (see on_the_tick)
TLS_CLOSE_GRACE = 1.0  # seconds a closing TLS connection may take to say goodbye

MessageCallback = Callable[[str, Dict[str, Any]], None]
ConnectedCallback = Callable[[str], None]


def on_the_tick(delay: float) -> float:
    """``delay``, stretched (by less than ``RETRY_TICK``) to end on the next tick of a shared grid.

    Hundreds of offline devices, each retried on its own jittered timer, wake
    the event loop hundreds of times a second, and each wake-up costs a system
    call: that, not the connection attempts, was most of the CPU an idle
    ``converge --watch`` spent. On the grid, the attempts due in one tick are
    made in one wake-up; the jitter that keeps them from all coming at once
    stays, in steps of the tick.
    """
    now = time.monotonic()
    return math.ceil((now + delay) / RETRY_TICK) * RETRY_TICK - now


def _excerpt(line: bytes, limit: int = 40) -> str:
    """The start of a line a person can read in an error message: ``'HTTP/1.1 400 Bad Request'``."""
    text = repr(line[:limit].decode("utf-8", "replace").rstrip("\r\n"))
    return text + ("..." if len(line) > limit else "")


class _DeviceLogger(logging.LoggerAdapter):
    def process(self, msg, kwargs):  # type: ignore[override]
        return f"[{self.extra['device']}] {msg}", kwargs


class _Protocol(asyncio.BufferedProtocol):
    """Reads replies into one reused buffer (see ``LineReader.get_buffer``)."""

    def __init__(self, connection: "DeviceConnection") -> None:
        self._connection = connection
        self._reader = LineReader(MAX_REPLY_BYTES, READ_SIZE)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        for line in self._reader.buffer_updated(nbytes):
            self._connection._on_line(line)
        if self._reader.overflowed:
            self._connection._drop("reply larger than the controller's limit")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._connection._on_lost(exc)


class DeviceConnection(Requester):
    def __init__(
        self,
        device: Device,
        *,
        connect_timeout: float,
        request_timeout: float,
        keepalive: bool = False,
        heartbeat: float = DEFAULT_HEARTBEAT,
        on_message: Optional[MessageCallback] = None,
        deadlines: Optional[Deadlines] = None,
    ) -> None:
        self.device = device
        self._owns_deadlines = deadlines is None
        self.deadlines = Deadlines() if deadlines is None else deadlines
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self.heartbeat = heartbeat
        self.on_message = on_message
        self.log = _DeviceLogger(log, {"device": device.id})
        self._token_field = token_field(device.token)
        self._transport: Optional[asyncio.Transport] = None
        self._replies = PendingReplies(device.id, self.deadlines)
        self._connecting: Optional[asyncio.Future] = None
        self._closed = False
        self._background: Optional[asyncio.Task] = None
        self._lost: Optional[asyncio.Event] = None  # set when the connection drops, wakes the keep-alive loop
        self.connected_at: Optional[float] = None
        self._opened = 0.0  # time.monotonic() of the current connection
        self.last_error: Optional[str] = None
        self._tls_refused = False  # the agent closed the last TLS connection before answering: it refused us
        self.last_reply_at: Optional[float] = None
        self.reconnects = 0
        self.backoff_max = BACKOFF_MAX
        self.on_connected: Optional[ConnectedCallback] = None  # called with the device id after each connect

    def watch(self, on_connected: ConnectedCallback, retry_every: float) -> None:
        """Stay connected from now on: try again every ``retry_every`` seconds at most while the device is
        away, and call ``on_connected(device_id)`` each time a connection opens."""
        self.on_connected, self.backoff_max, self.keepalive = on_connected, retry_every, True
        if not self._closed and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self._keep_alive())

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        """Connect if not connected; concurrent callers share one attempt. Raises ``DeviceUnreachable``."""
        if self.connected:
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        tls = client_context(self.device.tls) if self.device.tls is not None else None
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.device.host, self.device.port, ssl=tls),
                self.connect_timeout,
            )
        except ssl.SSLError as exc:
            self.last_error = explain(exc)
            raise TLSRefused(self.device.id, f"{self.device.address}: {self.last_error}") from None
        except ConnectionResetError:
            if self.device.tls is None:
                raise DeviceUnreachable(self.device.id, f"{self.device.address}: connection reset") from None
            self.last_error = refusal(self.device.tls)  # TLS 1.2: the agent refused us within the handshake
            raise TLSRefused(self.device.id, f"{self.device.address}: {self.last_error}") from None
        except asyncio.TimeoutError:
            self.last_error = f"no connection within {self.connect_timeout:g} s (is the device up and on the network?)"
            raise DeviceUnreachable(self.device.id, f"{self.device.address}: {self.last_error}") from None
        except ConnectionRefusedError:
            self.last_error = "connection refused (is pi-agent running there, on this port?)"
            raise DeviceUnreachable(self.device.id, f"{self.device.address}: {self.last_error}") from None
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            raise DeviceUnreachable(self.device.id, f"{self.device.address}: {self.last_error}") from None
        if transport.is_closing():  # closed as soon as it opened: over TLS, the agent refused our certificate
            transport.abort()
            self.last_error = refusal(self.device.tls) if self.device.tls is not None else "closed as soon as it opened"
            self._tls_refused = self.device.tls is not None
            error = TLSRefused if self._tls_refused else DeviceUnreachable
            raise error(self.device.id, f"{self.device.address}: {self.last_error}")
        problem = identity_problem(transport, self.device.id) if tls is not None else None
        if problem is not None:
            transport.abort()
            self.last_error = problem
            raise WrongDevice(self.device.id, f"{self.device.address}: {problem}")
        self._transport = transport  # type: ignore[assignment]
        self._tls_refused = False
        self._lost = asyncio.Event()
        self.connected_at = time.time()
        self._opened = time.monotonic()
        self.last_error = None
        if self.keepalive and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self._keep_alive())
        if self.on_connected is not None:
            self.on_connected(self.device.id)

    def send_with_callback(self, body: bytes, command: str, callback: ReplyCallback,
                           timeout: Optional[float] = None) -> None:
        """The fan-out fast path: ``callback(reply, None)`` or ``callback(None, error)`` exactly once.

        No future and no task: the reply is handed over from ``buffer_updated``,
        and the time limit is kept by the shared ``Deadlines``.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            if transport is not None and self.device.tls is not None and self._refused_us():
                self.last_error, self._tls_refused = refusal(self.device.tls), True
            if self._tls_refused:
                raise TLSRefused(self.device.id, f"{self.device.address}: {self.last_error}")
            raise DeviceUnreachable(self.device.id, self.last_error or "not connected yet: call connect() first")
        request_id = self._replies.expect(callback, command, self.request_timeout if timeout is None else timeout)
        transport.write(address_request(body, request_id, self._token_field))

    def _on_line(self, line: bytes) -> None:
        try:
            reply = decode_message(line)
        except ValueError:
            self._drop(f"the device answered {_excerpt(line)}, which is not a JSON object "
                       "(is something other than pi-agent listening on this port?)")
            return
        self.last_reply_at = time.monotonic()
        if not self._replies.settle(reply) and self.on_message is not None:
            self.on_message(self.device.id, reply)

    def _drop(self, reason: str) -> None:
        self.last_error = reason
        self._replies.fail_all(ProtocolError(self.device.id, reason))
        if self._transport is not None:
            self._transport.abort()

    def _on_lost(self, exc: Optional[Exception]) -> None:
        self._transport = None
        if self._lost is not None:
            self._lost.set()
        if self.device.tls is not None and self._refused_us() and not self._closed:
            self.last_error, self._tls_refused = refusal(self.device.tls), True
            self._replies.fail_all(TLSRefused(self.device.id, f"{self.device.address}: {self.last_error}"))
            return
        if not self._closed:
            self.last_error = f"connection lost: {exc}" if exc else "connection closed by the device"
            if self.device.tls is None and (self.last_reply_at or 0) < self._opened:
                self.last_error += (" without a word (an agent that speaks TLS closes plain connections: then give "
                                    "this device \"tls\": true in devices.json)")
        if self._replies:
            self._replies.fail_all(ConnectionLost(
                self.device.id, f"{self.last_error or 'connection closed'} before it answered (it may or may not "
                "have run the request)"))

    def _refused_us(self) -> bool:
        """A TLS connection closed before a single reply: the agent refused our certificate. (With TLS 1.3
        it checks the client's certificate after the handshake has completed on our side, and closes.)"""
        return self.device.tls is not None and (self.last_reply_at or 0) < self._opened

    async def _keep_alive(self) -> None:
        """Heartbeat while connected; reconnect with backoff and jitter after a drop."""
        attempt = 0
        while not self._closed:
            if self.connected:
                attempt = 0
                assert self._lost is not None
                # A connection nothing has answered on yet says who it is soon: the agent closes one that
                # sends no authenticated request for 10 s (its defence against strangers holding slots).
                fresh = (self.last_reply_at or 0) < self._opened
                try:
                    await asyncio.wait_for(self._lost.wait(), min(self.heartbeat, FIRST_HEARTBEAT) if fresh
                                           else self.heartbeat)
                    continue  # dropped: go straight to reconnecting
                except asyncio.TimeoutError:
                    pass
                idle = time.monotonic() - (self.last_reply_at or 0)
                fresh = (self.last_reply_at or 0) < self._opened  # still nothing answered since it opened?
                if self.connected and (idle >= self.heartbeat or fresh):
                    try:
                        await self.request({"command": "ping"}, timeout=min(self.heartbeat, 10.0))
                    except (DeviceUnreachable, CommandTimeout, ProtocolError) as exc:
                        self.log.warning("heartbeat failed: %s", exc.message)
                        if self._transport is not None:
                            self._transport.abort()
                continue
            delay = min(self.backoff_max, BACKOFF_FIRST * 2 ** attempt) * random.uniform(0.5, 1.5)
            attempt += 1
            await asyncio.sleep(on_the_tick(delay))
            if self.connected:  # someone else connected it meanwhile (a request, Fleet.connect)
                continue
            try:
                await self.connect()
                self.reconnects += 1
                self.log.info("reconnected after %d attempt(s)", attempt)
            except DeviceError as exc:  # unreachable still, or a TLS refusal: tried again, and said in status
                self.log.debug("reconnect failed: %s", exc.message)

    def status(self) -> Dict[str, Any]:
        return {
            "device": self.device.id,
            "address": self.device.address,
            "connected": self.connected,
            "connected_at": self.connected_at,
            "last_error": self.last_error,
            "reconnects": self.reconnects,
        }

    async def close(self) -> None:
        self._closed = True
        if self._background is not None:
            self._background.cancel()
            try:
                await self._background
            except (asyncio.CancelledError, Exception):
                pass
        transport, lost = self._transport, self._lost
        if transport is not None:
            transport.close()
            if self.device.tls is not None and lost is not None:
                # TLS says goodbye (close_notify) before the socket goes: wait for it, briefly, so nothing is
                # left half-closed when the event loop ends.
                try:
                    await asyncio.wait_for(lost.wait(), TLS_CLOSE_GRACE)
                except asyncio.TimeoutError:
                    transport.abort()
            self._transport = None
        if self._owns_deadlines:
            self.deadlines.close()
