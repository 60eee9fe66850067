"""The controller's connection to an MQTT broker, shared by every device behind it (``broker_connection.py``).

Requests go to ``pifleet/ID/req`` naming this controller's reply topic;
replies come back on it, matched by ``id``. Whether a device is online is the
broker's to say: the retained status its agent publishes when it connects,
and its last will when it goes.

When the session connects it subscribes to every device's status, then sends
itself a message through the broker and waits for it to come back: the broker
delivers in order, so by then every retained status has arrived, and a device
that is not online is known to be offline, not merely not heard of yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import socket
import ssl
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import contract

from .errors import DeviceUnreachable
from .inventory import BrokerRoute

if TYPE_CHECKING:
    from .broker_connection import BrokerConnection

log = logging.getLogger(__name__)

KEEPALIVE = 30  # seconds
# Requests on their way to the broker, unacknowledged: no limit here (Fleet.concurrency is the limit). paho's
# default, 20, throttled a send_all; and with any limit, paho scans its whole queue at every acknowledgement.
MAX_INFLIGHT = 0
# aiomqtt logs a warning per publish while more than this many wait for the broker's acknowledgement; leaving the
# desired releases of ten thousand devices in the broker makes ten thousand, on purpose.
PENDING_CALLS_NOTICE = 1_000_000
DROP_TIMEOUT = 2.0  # seconds a connection being let go of may take to say goodbye
ACK_TIMEOUT = 30.0  # seconds for the broker to acknowledge a retained message (a busy broker is slow, not gone)
RETRY_FIRST = 0.2  # seconds before trying a broker that refused a connection again (then doubling)


def controller_name() -> str:
    """This controller's name in reply topics: unique per process, and free of MQTT's '/', '+' and '#'."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def broker_context(route: BrokerRoute) -> Optional[ssl.SSLContext]:
    """TLS to the broker: its certificate must be the fleet CA's and name the host we dial; ours is the controller's."""
    if route.tls is None:
        return None
    context = ssl.create_default_context(cafile=str(route.tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(route.tls.cert), keyfile=str(route.tls.key))
    return context


class BrokerSession:
    """The controller's connection to one broker; ``devices`` are the ``BrokerConnection``s that use it."""

    def __init__(self, route: BrokerRoute, connect_timeout: float) -> None:
        self.route = route
        _secure, self.host, self.port = contract.broker_address(route.url)
        self.connect_timeout = connect_timeout
        self.name = controller_name()
        self.devices: Dict[str, "BrokerConnection"] = {}
        self.statuses: Dict[str, Dict[str, Any]] = {}  # device id -> its retained status
        self.last_error: Optional[str] = None
        self._client: Optional[aiomqtt.Client] = None
        self._connecting: Optional["asyncio.Future[None]"] = None
        self._reader: Optional["asyncio.Task[None]"] = None
        self._synced: Optional["asyncio.Future[None]"] = None
        self._sends: "set[asyncio.Future[None]]" = set()
        self.blobs: Dict[str, "asyncio.Future[None]"] = {}  # sha256 -> the publish of that file's code
        self._expiry: Dict[int, Properties] = {}  # MessageExpiryInterval properties, one per time limit
        self._keeper: Optional["asyncio.Task[None]"] = None
        self._lost = asyncio.Event()
        self._reports: Optional[Dict[str, Dict[str, Any]]] = None  # while last_reports() collects them

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        """Connect if not connected; concurrent callers share one attempt. Raises ``DeviceUnreachable``
        (naming no device: the caller says which one it was for)."""
        if self._client is not None:
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        """Connect, retrying for up to ``connect_timeout``: a broker that restarts is back within a second or two,
        and the devices behind it should not all count as unreachable meanwhile."""
        deadline = time.monotonic() + self.connect_timeout
        delay = RETRY_FIRST
        while True:
            try:
                await self._open_once()
                return
            except DeviceUnreachable:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2

    async def _open_once(self) -> None:
        client = aiomqtt.Client(self.host, self.port, identifier=f"pifleet-controller-{self.name}",
                                tls_context=broker_context(self.route), keepalive=KEEPALIVE,
                                timeout=self.connect_timeout, protocol=aiomqtt.ProtocolVersion.V5,
                                max_inflight_messages=MAX_INFLIGHT)
        client.pending_calls_threshold = PENDING_CALLS_NOTICE
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
            self.last_error = f"cannot reach the broker {self.route.url}: {exc}"
            raise DeviceUnreachable("", self.last_error) from None
        # Replies are handed over by paho itself, on the event loop's thread where aiomqtt drives it: aiomqtt's
        # message iterator spends a queue, a task and a wait on each message, twice the cost of the rest of a
        # reply's way in a send_all to thousands of devices. The iterator stays for everything else.
        client._client.message_callback_add(contract.reply_topic("+", self.name), self._on_reply_message)
        self._reader = asyncio.ensure_future(self._read(client))
        sync = f"{contract.TOPIC_ROOT}/_sync/{self.name}"
        try:
            # Replies at QoS 0 from the broker to us (a device sends them at QoS 1, which covers its own flaky
            # link): on this hop a lost reply means a lost connection, which fails the request anyway, and each
            # QoS 1 delivery would cost an acknowledgement both ways.
            await client.subscribe([(contract.reply_topic("+", self.name), 0),
                                    (contract.device_topic("+", contract.STATUS_TOPIC), 1), (sync, 1)])
            await self._sync(client)  # every device's retained status is in
        except (aiomqtt.MqttError, asyncio.TimeoutError) as exc:  # connected, then nothing: a broker going down
            await self._drop(client)
            self.last_error = f"the broker {self.route.url} took the connection but did not answer: {exc or 'timeout'}"
            raise DeviceUnreachable("", self.last_error) from None
        self._client = client
        self.last_error = None
        log.info("connected to the broker %s as %s", self.route.url, self.name)

    async def _drop(self, client: aiomqtt.Client) -> None:
        """Let go of a connection that no longer works (its reader stops; a clean goodbye if it can)."""
        if self._reader is not None:
            self._reader.cancel()
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), DROP_TIMEOUT)
        except (aiomqtt.MqttError, asyncio.TimeoutError, OSError):
            pass

    async def reconnect(self) -> None:
        """Drop the connection (one that stopped acknowledging, say) and make a new one."""
        client, self._client = self._client, None
        if client is not None:
            await self._drop(client)
            self._on_lost(f"the broker {self.route.url} stopped answering: connecting again")
        await self.connect()

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                self._on_message(message.topic.value, message.payload)
        except aiomqtt.MqttError as exc:
            self._on_lost(f"lost the broker {self.route.url}: {exc}")

    def _on_reply_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        device = self.devices.get(message.topic.split("/", 2)[1])
        if device is not None:
            device.on_reply(message.payload)

    def _on_message(self, topic: str, payload: Any) -> None:
        parts = topic.split("/")
        if len(parts) < 3:
            return
        if parts[2] == contract.STATUS_TOPIC:
            self._on_status(parts[1], bytes(payload))
        elif parts[2] == contract.REPORTED_TOPIC and self._reports is not None:
            try:
                self._reports[parts[1]] = json.loads(payload)
            except ValueError:
                pass
        elif parts[1] == "_sync" and self._synced is not None and not self._synced.done():
            self._synced.set_result(None)

    async def last_reports(self, device_ids: List[str]) -> Dict[str, Dict[str, Any]]:
        """What each device last reported at the broker (its retained ``reported``: the release it applied, when,
        how it went), for those that have: what ``fleet status`` says of a device that is offline now."""
        await self.connect()
        client = self._live()
        topics = [contract.device_topic(d, contract.REPORTED_TOPIC) for d in device_ids]
        self._reports = {}
        try:
            await client.subscribe([(topic, 1) for topic in topics])
            await self._sync(client)  # the broker sends retained messages before our own message comes back
            return dict(self._reports)
        finally:
            self._reports = None
            await client.unsubscribe(topics)

    async def _sync(self, client: aiomqtt.Client) -> None:
        """Send ourselves a message through the broker and wait for it: what it sent before has arrived."""
        self._synced = asyncio.get_running_loop().create_future()
        await client.publish(f"{contract.TOPIC_ROOT}/_sync/{self.name}", b"{}", qos=1)
        await asyncio.wait_for(asyncio.shield(self._synced), self.connect_timeout)

    def _on_status(self, device_id: str, payload: bytes) -> None:
        try:
            status = json.loads(payload) if payload else {"online": False}
        except ValueError:
            return
        if not isinstance(status, dict):
            return
        was = self.statuses.get(device_id, {}).get("online") is True
        self.statuses[device_id] = status
        device = self.devices.get(device_id)
        if device is not None and was != (status.get("online") is True):
            device.on_online(status.get("online") is True)

    def keep(self, retry_every: float) -> None:
        """Stay connected from now on: after a loss, connect again (retrying every ``retry_every`` seconds at
        most, with jitter); the devices' retained statuses then say who is online (``on_connected``)."""
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep(retry_every))

    async def _keep(self, retry_every: float) -> None:
        while True:
            if self.connected:
                self._lost.clear()
                await self._lost.wait()
                continue
            try:
                await self.connect()
                log.info("connected to the broker %s again", self.route.url)
            except DeviceUnreachable as exc:
                log.debug("%s", exc.message)
                await asyncio.sleep(retry_every * random.uniform(0.5, 1.0))

    def _on_lost(self, reason: str) -> None:
        """The broker connection dropped: every device counts as offline until the broker says otherwise again
        (its retained status, at the next connection), requests waiting for a reply fail, and so do publishes
        waiting for the broker's acknowledgement."""
        log.warning("%s", reason)
        self._client = None
        self._lost.set()
        self.last_error = reason
        self.statuses.clear()
        for send in list(self._sends):  # aiomqtt would wait out their time limit: say at once they were lost
            send.cancel()
        for device in self.devices.values():
            device.on_online(False, reason)

    def online(self, device_id: str) -> bool:
        return self.connected and self.statuses.get(device_id, {}).get("online") is True

    def _live(self) -> aiomqtt.Client:
        if self._client is None:
            raise DeviceUnreachable("", self.last_error or f"not connected to the broker {self.route.url}")
        return self._client

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> "asyncio.Future[None]":
        """Publish now (QoS 1); the future is done when the broker has acknowledged it (or failed, saying why)."""
        client = self._live()
        send = asyncio.ensure_future(client.publish(topic, payload, qos=1, retain=retain, timeout=ACK_TIMEOUT))
        self._sends.add(send)
        send.add_done_callback(self._sends.discard)
        return send

    def publish_blob(self, sha256: str, code: bytes) -> "asyncio.Future[None]":
        """A file's code, retained under its sha256: published once per session for every device that needs it
        (again if the last attempt failed)."""
        sent = self.blobs.get(sha256)
        if sent is None or (sent.done() and (sent.cancelled() or sent.exception() is not None)):
            sent = self.blobs[sha256] = self.publish(contract.blob_topic(sha256), code, retain=True)
        return sent

    def send_request(self, topic: str, payload: bytes, expires: float) -> None:
        """A request: published at once by the MQTT client underneath, with no task to wait for its acknowledgement
        (its reply is what counts, and its time limit covers a loss). aiomqtt has no call for this; the
        paho client it wraps does (aiomqtt's acknowledgement bookkeeping ignores messages it did not send)."""
        client = self._live()
        seconds = max(1, math.ceil(expires))
        properties = self._expiry.get(seconds)
        if properties is None:
            properties = self._expiry[seconds] = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = seconds
        info = client._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != 0:
            raise DeviceUnreachable("", f"the request could not be sent to the broker {self.route.url}: "
                                        f"{paho.error_string(info.rc)} (the next attempt reconnects)")

    async def flush(self) -> None:
        """Wait until the broker has acknowledged everything published so far (or the time limit passes)."""
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=ACK_TIMEOUT)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        await self.flush()
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass
        if self._reader is not None:
            self._reader.cancel()
