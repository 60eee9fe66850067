"""The agent's TLS listener: each connection is an ``ssl.SSLSocket`` driven by the event loop, not asyncio's TLS layer.

asyncio runs TLS through a memory BIO in Python: every record is copied
between buffers, every message takes two SSL reads (the second to learn there
is no more), and each write is encrypted, queued, then sent. On a Pi that doubled
the agent's CPU per request. Here OpenSSL reads from and writes to the socket
itself, in C: a request costs one ``recv_into`` and its reply one ``send``,
close to plain TCP. What asyncio's TLS layer did for the agent and is kept:
a handshake deadline, flow control on writes, and ``get_extra_info`` with
``peercert`` and ``sslcontext`` (the role check in ``agent/tls.py`` reads them).

Only for the server side of a protocol that is an ``asyncio.BufferedProtocol``
(``agent/server.py``'s ``_Connection``). Renegotiation is off in the context
(``agent/tls.py``), so a read never needs to write nor a write to read, except
TLS 1.3's key update, which OpenSSL answers within the read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

log = logging.getLogger(__name__)

ACCEPTS_PER_WAKE = 64  # connections taken off the backlog per wake-up, so that a flood cannot starve the rest
HIGH_WATER = 64 * 1024  # bytes of unsent replies before the protocol is told to pause (asyncio's default)
LOW_WATER = 16 * 1024

ProtocolFactory = Callable[[], asyncio.BufferedProtocol]


class TLSListener:
    """Listening sockets whose connections become ``TLSTransport``s once their handshake completes."""

    def __init__(self, sockets: List[socket.socket], context: ssl.SSLContext, factory: ProtocolFactory,
                 handshake_timeout: float, max_handshakes: int, on_failure: Callable[[Any], None]) -> None:
        self.sockets = sockets
        self._context = context
        self._factory = factory
        self._timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        self._handshakes: Dict["_Handshake", None] = {}  # oldest first
        self._loop = asyncio.get_running_loop()
        self.on_failure = on_failure  # a handshake failed or ran out of time: called with the client's address
        self.dropped_handshakes = 0  # the oldest, dropped to make room while too many were under way
        for listening in sockets:
            listening.setblocking(False)
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the backlog keeps them until there is room
                log.warning("cannot accept a connection: %s", exc)
                return
            if len(self._handshakes) >= self._max_handshakes:
                # Drop the oldest, not the newcomer: someone holding many silent connections open must keep
                # opening more to stay in, while a controller's handshake takes milliseconds.
                self.dropped_handshakes += 1
                next(iter(self._handshakes)).give_up()
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                wrapped = self._context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                log.debug("cannot start TLS with a client: %s", exc)
                conn.close()
                continue
            _Handshake(self, wrapped, address).step()

    def close(self) -> None:
        """Stop accepting, and drop the handshakes under way."""
        for listening in self.sockets:
            self._loop.remove_reader(listening.fileno())
            listening.close()
        for handshake in list(self._handshakes):
            handshake.give_up()


async def listening_sockets(host: str, port: int, backlog: int) -> List[socket.socket]:
    """Sockets listening on ``host:port``, one per address it resolves to, as ``loop.create_server`` makes them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: List[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            listening = socket.socket(family, kind, proto)
            sockets.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listening.bind(address)
            listening.listen(backlog)
    except OSError:
        for listening in sockets:
            listening.close()
        raise
    return sockets


class _Handshake:
    """One connection's TLS handshake, stepped each time its socket is ready, with a deadline."""

    def __init__(self, listener: TLSListener, sock: ssl.SSLSocket, peer: Any) -> None:
        self._listener = listener
        self._sock = sock
        self._peer = peer
        self._fd = sock.fileno()
        self._loop = listener._loop
        self._timer = self._loop.call_later(listener._timeout, self._too_slow)
        listener._handshakes[self] = None

    def step(self) -> None:
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._loop.add_reader(self._fd, self.step)
            return
        except ssl.SSLWantWriteError:
            self._loop.add_writer(self._fd, self.step)
            return
        except (ssl.SSLError, OSError) as exc:  # OpenSSL has sent the client its alert, saying why
            log.debug("TLS handshake with %s failed: %s", self._peer, exc)
            self._listener.on_failure(self._peer)
            self.give_up()
            return
        self._end()
        protocol = self._listener._factory()
        TLSTransport(self._loop, self._sock, protocol)

    def _too_slow(self) -> None:
        self._listener.on_failure(self._peer)
        self.give_up()

    def give_up(self) -> None:
        """Failed, too slow, or the agent is stopping: close without a word."""
        self._end()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()

    def _end(self) -> None:
        self._timer.cancel()
        self._listener._handshakes.pop(self, None)


class TLSTransport(asyncio.Transport):
    """An established TLS connection feeding a ``BufferedProtocol``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.BufferedProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._reading = True  # the protocol wants to read (asyncio's meaning of is_reading), even after EOF
        self._eof = False
        self._closing = False
        self._lost = False
        self._stuck: Optional[bytes] = None  # what OpenSSL began to send: a retry must pass the same bytes
        self._queue: Deque[bytes] = deque()
        self._queued = 0
        self._paused_protocol = False
        self._extra = {"peername": sock.getpeername(), "sockname": sock.getsockname(), "socket": sock,
                       "sslcontext": sock.context, "ssl_object": sock, "peercert": sock.getpeercert()}
        protocol.connection_made(self)
        if not self._closing:
            loop.add_reader(self._fd, self._on_readable)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    # Reading

    def _on_readable(self) -> None:
        sock, protocol = self._sock, self._protocol
        while True:
            buffer = protocol.get_buffer(-1)
            try:
                count = sock.recv_into(buffer)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                return  # the rest of a record is still on its way
            except ssl.SSLZeroReturnError:  # the client said goodbye properly
                count = 0
            except (ssl.SSLError, OSError) as exc:
                self._lose(exc)
                return
            if not count:
                self._on_eof()
                return
            protocol.buffer_updated(count)
            # OpenSSL reads a whole record from the socket: what it decrypted and we have not taken yet
            # is in its buffer, where the event loop cannot see it.
            if self._closing or not self._reading or not sock.pending():
                return

    def _on_eof(self) -> None:
        self._loop.remove_reader(self._fd)
        self._eof = True
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        if self._eof:
            return
        self._loop.add_reader(self._fd, self._on_readable)
        if self._sock.pending():
            self._loop.call_soon(self._on_readable)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # Writing

    def write(self, data: Any) -> None:
        if self._lost or not data:
            return
        if self._stuck is None and not self._queue:
            try:
                self._sock.send(data)
                return
            except ssl.SSLWantWriteError:
                self._stuck = bytes(data)
                self._loop.add_writer(self._fd, self._on_writable)
            except (ssl.SSLError, OSError) as exc:
                self._lose(exc)
                return
        else:
            self._queue.append(bytes(data))
            self._queued += len(data)
        self._check_high_water()

    def _on_writable(self) -> None:
        while self._stuck is not None or self._queue:
            if self._stuck is None:
                self._stuck = b"".join(self._queue)
                self._queue.clear()
                self._queued = 0
            try:
                self._sock.send(self._stuck)
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as exc:
                self._lose(exc)
                return
            self._stuck = None
        self._loop.remove_writer(self._fd)
        if self._paused_protocol:
            self._paused_protocol = False
            self._protocol.resume_writing()
        if self._closing:
            self._finish(None, goodbye=True)

    def get_write_buffer_size(self) -> int:
        return (len(self._stuck) if self._stuck is not None else 0) + self._queued

    def _check_high_water(self) -> None:
        if not self._paused_protocol and self.get_write_buffer_size() > HIGH_WATER:
            self._paused_protocol = True
            self._protocol.pause_writing()
        elif self._paused_protocol and self.get_write_buffer_size() <= LOW_WATER:
            self._paused_protocol = False
            self._protocol.resume_writing()

    # Closing

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, then TLS's goodbye, then close."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if self._stuck is None and not self._queue:
            self._finish(None, goodbye=True)

    def abort(self) -> None:
        self._closing = True
        self._finish(None, goodbye=False)

    def _lose(self, exc: Exception) -> None:
        log.debug("TLS connection lost: %s", exc)
        self._closing = True
        self._finish(exc, goodbye=False)

    def _finish(self, exc: Optional[Exception], goodbye: bool) -> None:
        if self._lost:
            return
        self._lost = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        if goodbye:
            try:
                self._sock.unwrap()  # sends close_notify; raises while the client's own is yet to come
            except (ssl.SSLError, OSError, ValueError):
                pass
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)
