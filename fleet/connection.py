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
import itertools
import json
import logging
import random
import time
from typing import Any, Callable, Dict, Optional, Tuple

from agent.protocol import LineReader, decode_message, encode_message

from .errors import CommandTimeout, DeviceUnreachable, ProtocolError
from .inventory import Device

log = logging.getLogger(__name__)

# Limits
MAX_REPLY_BYTES = 64 * 1024 * 1024
# Timeouts (seconds)
DEFAULT_HEARTBEAT = 15.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

MessageCallback = Callable[[str, Dict[str, Any]], None]


def encode_body(message: Dict[str, Any]) -> bytes:
    """A request as bytes, without ``id`` and ``token`` (each connection adds its own)."""
    return encode_message({k: v for k, v in message.items() if k not in ("id", "token")})


class _DeviceLogger(logging.LoggerAdapter):
    def process(self, msg, kwargs):  # type: ignore[override]
        return f"[{self.extra['device']}] {msg}", kwargs


class _Protocol(asyncio.Protocol):
    def __init__(self, connection: "DeviceConnection") -> None:
        self._connection = connection
        self._reader = LineReader(MAX_REPLY_BYTES)

    def data_received(self, data: bytes) -> None:
        for line in self._reader.feed(data):
            self._connection._on_line(line)
        if self._reader.overflowed:
            self._connection._drop("reply larger than the controller's limit")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._connection._on_lost(exc)


class DeviceConnection:
    _ids = itertools.count(1)

    def __init__(
        self,
        device: Device,
        *,
        connect_timeout: float,
        request_timeout: float,
        keepalive: bool = False,
        heartbeat: float = DEFAULT_HEARTBEAT,
        on_message: Optional[MessageCallback] = None,
    ) -> None:
        self.device = device
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self.heartbeat = heartbeat
        self.on_message = on_message
        self.log = _DeviceLogger(log, {"device": device.id})
        self._transport: Optional[asyncio.Transport] = None
        self._pending: Dict[Any, Tuple[asyncio.Future, asyncio.TimerHandle]] = {}
        self._token_field = f',"token":{json.dumps(device.token)}' if device.token is not None else None
        self._connecting: Optional[asyncio.Future] = None
        self._closed = False
        self._background: Optional[asyncio.Task] = None
        self._lost: Optional[asyncio.Event] = None  # set when the connection drops, wakes the keep-alive loop
        self.connected_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self.last_reply_at: Optional[float] = None
        self.reconnects = 0

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
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.device.host, self.device.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            self.last_error = f"no connection within {self.connect_timeout:g} s"
            raise DeviceUnreachable(self.device.id, f"{self.device.address}: {self.last_error}") from None
        except ConnectionRefusedError:
            self.last_error = "connection refused (is pi-agent running there, on this port?)"
            raise DeviceUnreachable(self.device.id, f"{self.device.address}: {self.last_error}") from None
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            raise DeviceUnreachable(self.device.id, f"{self.device.address}: {self.last_error}") from None
        self._transport = transport  # type: ignore[assignment]
        self._lost = asyncio.Event()
        self.connected_at = time.time()
        self.last_error = None
        if self.keepalive and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self._keep_alive())

    async def request(self, message: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send one request and return the agent's reply (which may say ``success: false``).

        Raises ``DeviceUnreachable`` or ``CommandTimeout``; never ``RemoteError``:
        a refusal is a reply, and the caller decides what it means.
        """
        if self._closed:
            raise DeviceUnreachable(self.device.id, "connection closed")
        await self.connect()
        return await self.start_request(encode_body(message), str(message.get("command")), timeout)

    def start_request(self, body: bytes, command: str, timeout: Optional[float] = None) -> "asyncio.Future[Dict[str, Any]]":
        """Send a request encoded by ``encode_body`` now; the future gets the reply or a ``DeviceError``.

        The connection must be open. This is the fan-out fast path: the body is
        encoded once for the whole fleet, and only this device's ``id`` and
        token are spliced in front of it.
        """
        if not self.connected:
            raise DeviceUnreachable(self.device.id, self.last_error or "not connected")
        loop = asyncio.get_running_loop()
        request_id = f"f{next(self._ids)}"
        head = f'{{"id":"{request_id}"' + (self._token_field or "")
        data = head.encode() + (b"," + body[1:] if len(body) > 3 else b"}\n")
        future: asyncio.Future = loop.create_future()
        limit = self.request_timeout if timeout is None else timeout
        expiry = loop.call_later(limit, self._expire, request_id, command, limit)
        self._pending[request_id] = (future, expiry)
        assert self._transport is not None
        self._transport.write(data)
        return future

    def _expire(self, request_id: str, command: str, limit: float) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(CommandTimeout(self.device.id, f"no reply to {command!r} within {limit:g} s"))

    def _on_line(self, line: bytes) -> None:
        try:
            reply = decode_message(line)
        except ValueError:
            self._drop("the device sent something that is not a JSON object")
            return
        self.last_reply_at = time.monotonic()
        entry = self._pending.pop(reply.get("id"), None)
        if entry is not None:
            future, expiry = entry
            expiry.cancel()
            if not future.done():
                future.set_result(reply)
        elif self.on_message is not None:
            self.on_message(self.device.id, reply)

    def _drop(self, reason: str) -> None:
        self.last_error = reason
        self._fail_pending(ProtocolError(self.device.id, reason))
        if self._transport is not None:
            self._transport.abort()

    def _on_lost(self, exc: Optional[Exception]) -> None:
        self._transport = None
        if self._lost is not None:
            self._lost.set()
        if not self._closed:
            self.last_error = f"connection lost: {exc}" if exc else "connection closed by the device"
        self._fail_pending(DeviceUnreachable(self.device.id, self.last_error or "connection closed"))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future, expiry in pending.values():
            expiry.cancel()
            if not future.done():
                future.set_exception(error)

    async def _keep_alive(self) -> None:
        """Heartbeat while connected; reconnect with backoff and jitter after a drop."""
        attempt = 0
        while not self._closed:
            if self.connected:
                attempt = 0
                assert self._lost is not None
                try:
                    await asyncio.wait_for(self._lost.wait(), self.heartbeat)
                    continue  # dropped: go straight to reconnecting
                except asyncio.TimeoutError:
                    pass
                idle = time.monotonic() - (self.last_reply_at or 0)
                if self.connected and idle >= self.heartbeat:
                    try:
                        await self.request({"command": "ping"}, timeout=min(self.heartbeat, 10.0))
                    except (DeviceUnreachable, CommandTimeout, ProtocolError) as exc:
                        self.log.warning("heartbeat failed: %s", exc.message)
                        if self._transport is not None:
                            self._transport.abort()
                continue
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** attempt) * random.uniform(0.5, 1.5)
            attempt += 1
            await asyncio.sleep(delay)
            try:
                await self.connect()
                self.reconnects += 1
                self.log.info("reconnected after %d attempt(s)", attempt)
            except DeviceUnreachable as exc:
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
        if self._transport is not None:
            self._transport.close()
            self._transport = None
