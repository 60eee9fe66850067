"""One device behind an MQTT broker, with the interface of ``DeviceConnection``.

``connect``, ``request``, ``send_with_callback``, ``watch`` and ``status`` work
as for a device over TCP, so ``Fleet`` and everything built on it (send_all,
rollouts, status, converge) work the same whatever the transport, and a fleet
may mix both. What it sends and hears goes through its broker's shared
``BrokerSession`` (``broker.py``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Dict, Optional

from agent import contract
from agent.protocol import address_request, decode_message, token_field

from .broker import BrokerSession
from .deadlines import Deadlines
from .errors import ConnectionLost, DeviceUnreachable
from .inventory import Device
from .pending import PendingReplies, ReplyCallback, Requester

log = logging.getLogger(__name__)


class BrokerConnection(Requester):
    """One device behind a broker, with the interface of ``DeviceConnection``."""

    def __init__(self, device: Device, session: BrokerSession, *, request_timeout: float, deadlines: Deadlines,
                 on_message: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> None:
        self.device = device
        self.session = session
        self.request_timeout = request_timeout
        self.on_message = on_message
        self.on_connected: Optional[Callable[[str], None]] = None
        self._replies = PendingReplies(device.id, deadlines)
        self._addressing = token_field(device.token) + b',"reply_to":' + json.dumps(
            contract.reply_topic(device.id, session.name)).encode()
        self._requests = contract.device_topic(device.id, contract.REQUEST_TOPIC)
        self._closed = False
        self.connected_at: Optional[float] = None
        self.reconnects = 0
        session.devices[device.id] = self

    @property
    def connected(self) -> bool:
        return self.session.online(self.device.id)

    async def connect(self) -> None:
        try:
            await self.session.connect()
        except DeviceUnreachable as exc:
            raise DeviceUnreachable(self.device.id, exc.message) from None
        if not self.connected:
            raise DeviceUnreachable(self.device.id, self._offline_reason())

    def _offline_reason(self) -> str:
        status = self.session.statuses.get(self.device.id)
        if not self.session.connected:
            return self.session.last_error or f"not connected to the broker {self.device.address}"
        if status is None:
            return (f"never seen at the broker {self.device.address} (is its pi-agent running with --broker and "
                    f"--device-id {self.device.id}?)")
        return f"offline at the broker {self.device.address} (its last will)"

    def watch(self, on_connected: Callable[[str], None], retry_every: float) -> None:
        """Call ``on_connected(device_id)`` each time the device comes online at the broker; keep the broker
        connection up meanwhile."""
        self.on_connected = on_connected
        self.session.keep(retry_every)

    def send_with_callback(self, body: bytes, command: str, callback: ReplyCallback,
                           timeout: Optional[float] = None) -> None:
        if not self.connected:
            raise DeviceUnreachable(self.device.id, self._offline_reason())
        limit = self.request_timeout if timeout is None else timeout
        request_id = self._replies.expect(callback, command, limit)
        try:
            self.session.send_request(self._requests, address_request(body, request_id, self._addressing)[:-1], limit)
        except DeviceUnreachable as exc:
            self._replies.cancel(request_id)
            raise DeviceUnreachable(self.device.id, exc.message) from None

    def on_reply(self, payload: bytes) -> None:
        try:
            reply = decode_message(payload)
        except ValueError:
            log.warning("%s: a reply that is not a JSON object: %.40r", self.device.id, payload)
            return
        if not self._replies.settle(reply) and self.on_message is not None:
            self.on_message(self.device.id, reply)

    def on_online(self, online: bool, reason: str = "") -> None:
        if online:
            self.reconnects += self.connected_at is not None  # the first time is no reconnection
            self.connected_at = time.time()
            if self.on_connected is not None:
                self.on_connected(self.device.id)
            return
        if self._replies:
            self._replies.fail_all(ConnectionLost(self.device.id, f"{reason or 'went offline at the broker'} before "
                                                  "it answered (it may or may not have run the request)"))

    def status(self) -> Dict[str, Any]:
        return {"device": self.device.id, "address": self.device.address, "connected": self.connected,
                "connected_at": self.connected_at,
                "last_error": None if self.connected else self._offline_reason(), "reconnects": self.reconnects}

    async def close(self) -> None:
        self._closed = True
        self.session.devices.pop(self.device.id, None)
