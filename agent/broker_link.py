"""The agent connects out to an MQTT broker: for devices that the controller cannot reach (4G, NAT, a customer's LAN).

``pi-agent --broker mqtts://HOST:8883 --device-id ID`` keeps one connection to
the broker and serves the same requests as on TCP: a request arrives on
``pifleet/ID/req`` naming its reply topic (``reply_to``, which must lie under
``pifleet/ID/reply/``), and the reply goes there, matched by ``id``. Online and
offline are the broker's to say: the connection leaves a retained last will
(``pifleet/ID/status`` = offline) and publishes a retained birth message when
it connects. A lost connection is retried with exponential backoff and
jitter, so that ten thousand devices do not all come back in the same second
after a broker restart. The desired release the controller leaves in the
broker is handed to ``on_desired`` (``agent/desired.py``).

The MQTT client is paho-mqtt (Raspberry Pi OS: ``python3-paho-mqtt``; the
agent bundle carries it), MQTT 5, on its own network thread: its callbacks
hand everything over to the event loop, where the agent's work happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set

from . import contract
from .config import ConfigError
from .errors import WRONG_TOKEN, AgentError, Busy, ShuttingDown, TooLarge, Unauthorized
from .protocol import Request, error_line, parse_request, reply_to_of, request_id_of

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .tls import TLSFiles

log = logging.getLogger(__name__)

# Timeouts (seconds)
KEEPALIVE = 30  # MQTT keep-alive: the broker declares the device offline (its will) after 1.5x this silence
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
GOODBYE_TIMEOUT = 2.0  # at shutdown, how long the retained "offline" may take to reach the broker
# While the device is away, the broker keeps its session (its subscriptions, and the requests sent meanwhile
# that have not expired: each request expires after its own time limit), so a request sent while the device
# reconnects, after a broker restart say, is delivered when it is back instead of being lost.
SESSION_EXPIRY = 3600


def paho_client_module() -> Any:
    """paho-mqtt's client module, or a ``ConfigError`` saying how to install it."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ConfigError("--broker needs the paho-mqtt package, which this Python lacks: on Raspberry Pi OS "
                          "`sudo apt install python3-paho-mqtt`; the agent bundle (`fleet agent bundle`) carries "
                          "it") from None
    return mqtt


class BrokerLink:
    """One device's connection to the broker: kept open, serving requests, announcing itself."""

    def __init__(self, url: str, device_id: str, dispatcher: "Dispatcher", *, birth: Callable[[], Dict[str, Any]],
                 tls: "Optional[TLSFiles]" = None, max_in_flight: int = 64, max_request_bytes: int = 4 << 20,
                 on_desired: Optional[Callable[[bytes], None]] = None) -> None:
        self.url = url
        self.device_id = device_id
        self._secure, self._host, self._port = contract.broker_address(url)
        self._dispatcher = dispatcher
        self._birth = birth
        self._tls = tls
        self._max_in_flight = max_in_flight
        self._max_request_bytes = max_request_bytes
        self.on_desired = on_desired
        self._reply_prefix = contract.device_topic(device_id, contract.REPLY_TOPIC) + "/"
        self._in_flight: Set["asyncio.Future[bytes]"] = set()
        self._blobs: Dict[str, "asyncio.Future[bytes]"] = {}  # topic -> the code asked for
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self.connected = asyncio.Event()
        self.connections = 0  # how many times it has connected: a test waits for a reconnect with this
        self.last_error: Optional[str] = None
        self._client = self._make_client()

    def _make_client(self) -> Any:
        mqtt = paho_client_module()
        options: Dict[str, Any] = {"client_id": f"pifleet-device-{self.device_id}", "protocol": mqtt.MQTTv5,
                                   "reconnect_on_failure": True}
        if hasattr(mqtt, "CallbackAPIVersion"):  # paho 2; 1.6 has one callback API
            options["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
        client = mqtt.Client(**options)
        client.will_set(self._topic(contract.STATUS_TOPIC), self._offline(), qos=1, retain=True)
        if self._secure:
            client.tls_set_context(self._tls_context())
        client.on_connect = lambda _c, _u, _flags, code, *_: self._soon(self._on_connect, code)
        client.on_disconnect = lambda *args: self._soon(self._on_disconnect, args[-2] if len(args) > 3 else args[-1])
        client.on_message = lambda _c, _u, message: self._soon(self._on_message, message.topic, message.payload)
        client.on_connect_fail = lambda *_: self._soon(self._on_connect_fail)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            raise ConfigError(f"broker {self.url}: mqtts needs --tls-cert, --tls-key and --tls-ca (this device's "
                              "certificate is its identity at the broker)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=str(self._tls.ca))
        context.load_cert_chain(certfile=str(self._tls.cert), keyfile=str(self._tls.key))
        return context

    def _topic(self, leaf: str) -> str:
        return contract.device_topic(self.device_id, leaf)

    def _offline(self) -> bytes:
        return json.dumps({"online": False, "device_id": self.device_id}).encode()

    def _soon(self, callback: Callable[..., None], *args: Any) -> None:
        """From paho's thread to the event loop."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    # Staying connected

    def start(self) -> None:
        """Connect in the background; paho's thread reconnects after a loss, with the backoff below."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._jitter_backoff()
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = SESSION_EXPIRY
        self._client.connect_async(self._host, self._port, KEEPALIVE, clean_start=False, properties=session)
        self._client.loop_start()

    def _jitter_backoff(self) -> None:
        """Each device its own random base for paho's doubling backoff: after a broker restart, ten thousand
        devices spread their attempts over seconds instead of landing together."""
        self._client.reconnect_delay_set(min_delay=BACKOFF_FIRST * random.uniform(0.5, 1.5), max_delay=BACKOFF_MAX)

    def _on_connect_fail(self) -> None:
        self.last_error = f"cannot reach the broker {self.url}"
        log.warning("%s; trying again", self.last_error)

    def _on_connect(self, code: Any) -> None:
        if code != 0:  # refused: not authorised, bad identity (the broker closes the connection next)
            self.last_error = f"the broker {self.url} refused the connection: {code}"
            log.error("%s", self.last_error)
            return
        self.last_error = None
        self._client.subscribe([(self._topic(contract.REQUEST_TOPIC), 1), (self._topic(contract.DESIRED_TOPIC), 1)])
        birth = self._announce()
        self._loop.run_in_executor(None, _wait_published, birth).add_done_callback(lambda _: self._online())

    def _online(self) -> None:
        """The broker holds our birth message: from now on, anyone who looks sees this device online."""
        self.connections += 1
        self.connected.set()
        log.info("connected to the broker %s as %s", self.url, self.device_id)

    def _announce(self) -> Any:
        """Publish the retained birth message: online, this agent's version and start."""
        birth = {"online": True, "device_id": self.device_id, **self._birth()}
        return self._client.publish(self._topic(contract.STATUS_TOPIC), json.dumps(birth), qos=1, retain=True)

    def _on_disconnect(self, code: Any) -> None:
        self.connected.clear()
        if not self._closing:
            why = paho_client_module().error_string(code) if isinstance(code, int) else str(code)  # paho 1.6: a number
            self.last_error = f"lost the broker {self.url}: {why}"
            log.warning("%s; reconnecting", self.last_error)
            self._jitter_backoff()

    def publish(self, leaf: str, payload: bytes, retain: bool = False) -> None:
        """Publish under this device's topic tree (QoS 1); dropped while disconnected, as a reply would be."""
        self._client.publish(self._topic(leaf), payload, qos=1, retain=retain)

    # Requests

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self._topic(contract.DESIRED_TOPIC):
            if self.on_desired is not None:
                self.on_desired(payload)
        elif topic == self._topic(contract.REQUEST_TOPIC):
            self._serve(payload)
        elif topic in self._blobs and not self._blobs[topic].done():
            self._blobs[topic].set_result(payload)

    async def fetch_blob(self, sha256: str, timeout: float) -> Optional[bytes]:
        """A file's code, retained at the broker under its sha256; None if it does not come within ``timeout``."""
        topic = contract.blob_topic(sha256)
        waiting = self._blobs.setdefault(topic, self._loop.create_future())
        self._client.subscribe(topic, 1)  # the broker sends the retained message at once
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self._client.unsubscribe(topic)
            self._blobs.pop(topic, None)

    def _serve(self, payload: bytes) -> None:
        request: Optional[Request] = None
        try:
            if len(payload) > self._max_request_bytes:
                raise TooLarge(f"request over the limit of {self._max_request_bytes} bytes")
            request = parse_request(payload)
            reply_to = request.args.get("reply_to")
        except AgentError as exc:  # refused, with a reply if it says where to
            refusal, reply_to = exc, reply_to_of(payload)
        if not isinstance(reply_to, str) or not reply_to.startswith(self._reply_prefix) or "#" in reply_to \
                or "+" in reply_to:
            log.warning("dropped a request without a usable 'reply_to' (one under %s)", self._reply_prefix)
            return
        if request is None:
            has_id, request_id = request_id_of(payload)
            self._reply(reply_to, error_line(refusal, request_id, has_id))
            return
        outcome = self._outcome(request)
        if isinstance(outcome, bytes):
            self._reply(reply_to, outcome)
            return
        task = asyncio.ensure_future(outcome)
        self._in_flight.add(task)
        task.add_done_callback(lambda done: self._finished(done, reply_to))

    def _outcome(self, request: Request) -> Any:
        """The reply bytes now, or an awaitable for them: the dispatcher's, after the link's own refusals."""
        if not self._dispatcher.token_ok(request):
            return error_line(Unauthorized(WRONG_TOKEN), request.id, request.has_id)
        if self._closing:
            return error_line(ShuttingDown("the agent is shutting down; this request was not run"),
                              request.id, request.has_id)
        if len(self._in_flight) >= self._max_in_flight:
            return error_line(Busy(f"{self._max_in_flight} requests are running; retry in a moment"),
                              request.id, request.has_id)
        return self._dispatcher.handle(request, authorized=True)

    def _finished(self, task: "asyncio.Future[bytes]", reply_to: str) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # the dispatcher never raises; if it does, it is our bug
            log.error("request task failed", exc_info=exc)
            return
        self._reply(reply_to, task.result())

    def _reply(self, reply_to: str, line: bytes) -> None:
        self._client.publish(reply_to, line.rstrip(b"\n"), qos=1)

    # Stopping

    async def close(self, grace: float) -> None:
        """Refuse new requests, give those running ``grace`` seconds to answer, say "offline" (retained), then
        disconnect: a clean goodbye sends no will."""
        self._closing = True
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=grace)
        if self.connected.is_set():
            info = self._client.publish(self._topic(contract.STATUS_TOPIC), self._offline(), qos=1, retain=True)
            await self._loop.run_in_executor(None, _wait_published, info)
        self._client.disconnect()
        await self._loop.run_in_executor(None, self._client.loop_stop)


def _wait_published(info: Any) -> None:
    try:
        info.wait_for_publish(GOODBYE_TIMEOUT)
    except (RuntimeError, ValueError):  # the connection went meanwhile: the will says it anyway
        pass

