"""The requests one device has not answered yet, whatever carries them (a TCP connection, a broker).

Each request gets a fleet-wide unique integer ``id``, a callback, and a time
limit kept by the fleet's shared ``Deadlines``; a reply settles the request
with that ``id``, after its shape is checked against the contract.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from agent.protocol import encode_shared_request

from .deadlines import Deadlines
from .errors import CommandTimeout, DeviceError, DeviceUnreachable, ProtocolError
from .replies import reply_problem

if TYPE_CHECKING:
    from .inventory import Device

ReplyCallback = Callable[[Optional[Dict[str, Any]], Optional[DeviceError]], None]


class PendingReplies:
    _ids = itertools.count(1)

    def __init__(self, device_id: str, deadlines: Deadlines) -> None:
        self.device_id = device_id
        self.deadlines = deadlines
        self._pending: Dict[int, Tuple[ReplyCallback, str]] = {}  # request id -> (callback, its command)

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, callback: ReplyCallback, command: str, limit: float) -> int:
        """A new request's ``id``: ``callback(reply, None)`` or ``callback(None, error)`` will run exactly once."""
        request_id = next(self._ids)
        self.deadlines.add(limit, self, request_id, command)
        self._pending[request_id] = (callback, command)
        return request_id

    def cancel(self, request_id: int) -> None:
        """Forget a request that could not be sent after all (its caller is told by an exception instead)."""
        self._pending.pop(request_id, None)

    def _expire(self, request_id: int, command: str, limit: float) -> None:
        waiting = self._pending.pop(request_id, None)
        if waiting is not None:
            waiting[0](None, CommandTimeout(
                self.device_id,
                f"no reply to {command!r} within {limit:g} s (the device is busy or hung; "
                "a slow command needs a longer timeout)"))

    def settle(self, reply: Dict[str, Any]) -> bool:
        """Hand ``reply`` to the request it answers; False when it answers none of ours."""
        reply_id = reply.get("id")
        # Only an int can be ours: a string "1", a float 1.0 or true (== 1) must not match request 1.
        waiting = self._pending.pop(reply_id, None) if type(reply_id) is int else None
        if waiting is None:
            return False
        callback, command = waiting
        problem = reply_problem(command, reply)
        if problem is None:
            callback(reply, None)
        else:  # this reply is refused, not the connection: the device may answer the next one well
            callback(None, ProtocolError(self.device_id, f"its reply to {command!r} does not fit the protocol: "
                                                         f"{problem}"))
        return True

    def fail_all(self, error: DeviceError) -> None:
        pending, self._pending = self._pending, {}
        for callback, _command in pending.values():
            callback(None, error)


class Requester:
    """``request`` and friends for a way of reaching a device (``DeviceConnection``, ``BrokerConnection``), built
    on its ``connect()`` and ``send_with_callback()``."""

    device: "Device"
    _closed: bool

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    def send_with_callback(self, body: bytes, command: str, callback: ReplyCallback,
                           timeout: Optional[float] = None) -> None:
        raise NotImplementedError

    async def request(self, message: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send one request and return the agent's reply (which may say ``success: false``).

        Raises ``DeviceUnreachable``, ``CommandTimeout`` or ``ProtocolError``; a
        refusal is a reply, not an exception, and the caller decides what it means.
        """
        return await self.request_encoded(encode_shared_request(message), str(message.get("command")), timeout)

    async def request_encoded(self, body: bytes, command: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """``request`` for a body already encoded with ``encode_shared_request`` (one encoding, many devices)."""
        if self._closed:
            raise DeviceUnreachable(self.device.id, "this connection was closed with its Fleet; use a new Fleet")
        if not self.connected:
            await self.connect()
        return await self.start_request(body, command, timeout)

    def start_request(self, body: bytes, command: str, timeout: Optional[float] = None) -> "asyncio.Future[Dict[str, Any]]":
        """Send a request encoded by ``encode_shared_request`` now; the future gets the reply or a ``DeviceError``.

        The connection must be open. The body is encoded once for the whole
        fleet; only this device's ``id`` and token are spliced in front of it.
        """
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.send_with_callback(body, command, _settle(future), timeout)
        return future


def _settle(future: "asyncio.Future[Dict[str, Any]]") -> ReplyCallback:
    """A reply callback that completes ``future`` (unless its awaiter gave up on it)."""
    def callback(reply: Optional[Dict[str, Any]], error: Optional[DeviceError]) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert reply is not None  # the contract: a reply or an error, never neither
            future.set_result(reply)
    return callback
