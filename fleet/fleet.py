"""``Fleet``: the controller's view of many agents, mirroring the seed's ``HW_RASPI_MULTI``.

    seed (Node.js)                         here
    addRaspberryPi(config)                 fleet.add_device(device)
    connectToRaspberryPi(id)               await fleet.connect(id)  /  await fleet.connect()
    sendCommandToRaspberryPi(id, cmd)      await fleet.send(id, cmd) -> the device's reply
    sendCommandToAllRaspberryPis(cmd)      await fleet.send_all(cmd, targets) -> {id: DeviceResult}
    getConnectionStatus()                  fleet.connection_status()

Unlike the original, ``send`` returns the reply (matched by ``id``), every
call has a time limit, and ``send_all`` never raises for one device: an
unreachable, slow or misbehaving device is a ``DeviceResult`` with status
``UNREACHABLE``, ``TIMEOUT`` or ``FAILED`` beside everyone else's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from agent import contract
from agent.protocol import encode_shared_request

from .connection import DeviceConnection, MessageCallback
from .deadlines import Deadlines
from .errors import CommandTimeout, DeviceError, DeviceUnreachable, UnknownDevice
from .inventory import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_TOKEN_ENV, BrokerRoute, Device, Inventory
from .results import DeviceResult, Status

if TYPE_CHECKING:
    from .broker import BrokerSession
    from .broker_connection import BrokerConnection

Connection = Union[DeviceConnection, "BrokerConnection"]

log = logging.getLogger(__name__)

# Limits
DEFAULT_CONCURRENCY = 64  # requests in flight across the fleet
DEFAULT_BROKER_CONCURRENCY = 1000  # the same, for a fleet with devices behind a broker

ResultCallback = Callable[[DeviceResult], None]


class Fleet:
    def __init__(
        self,
        devices: Iterable[Device] = (),
        *,
        concurrency: Optional[int] = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_TIMEOUT,
        keepalive: bool = False,
        on_message: Optional[MessageCallback] = None,
    ) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._concurrency = concurrency
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self.on_message = on_message
        self._connections: Dict[str, Connection] = {}
        self._brokers: Dict[BrokerRoute, "BrokerSession"] = {}
        self._deadlines = Deadlines()  # one timer per distinct time limit, for every request of the fleet
        for device in devices:
            self.add_device(device)

    @property
    def concurrency(self) -> int:
        """Requests in flight at a time: as given, or by default 64, and 1,000 for a fleet with devices behind a
        broker (a request there is a message, not a connection's turn, and takes a few hops: more must be in flight
        to keep the broker busy)."""
        if self._concurrency is not None:
            return self._concurrency
        return DEFAULT_BROKER_CONCURRENCY if self._brokers else DEFAULT_CONCURRENCY

    @classmethod
    def from_inventory(cls, inventory: Inventory, **options: Any) -> "Fleet":
        options.setdefault("connect_timeout", inventory.connect_timeout)
        options.setdefault("request_timeout", inventory.timeout)
        return cls(inventory.devices, **options)

    # HW_RASPI_MULTI's five functions

    def add_device(self, device: Device) -> None:
        if device.id in self._connections:
            raise ValueError(f"device {device.id!r} is already in the fleet")
        if device.broker is not None:
            self._connections[device.id] = self._through_broker(device)
            return
        self._connections[device.id] = DeviceConnection(
            device,
            connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout,
            keepalive=self.keepalive,
            on_message=self.on_message,
            deadlines=self._deadlines,
        )

    def _through_broker(self, device: Device) -> "BrokerConnection":
        """A device behind NAT: reached through its broker's session, one per broker for the whole fleet."""
        from .broker import BrokerSession  # aiomqtt is imported only by fleets that use it
        from .broker_connection import BrokerConnection

        assert device.broker is not None
        session = self._brokers.get(device.broker)
        if session is None:
            session = self._brokers[device.broker] = BrokerSession(device.broker, self.connect_timeout)
        return BrokerConnection(device, session, request_timeout=self.request_timeout, deadlines=self._deadlines,
                                on_message=self.on_message)

    async def connect(self, device_id: Optional[str] = None, *,
                      targets: Optional[Sequence[str]] = None) -> Dict[str, DeviceResult]:
        """Connect one device, the ``targets``, or all; returns a result per device (OK or UNREACHABLE)."""
        if targets is None:
            targets = [device_id] if device_id is not None else list(self._connections)

        async def work(target: str) -> DeviceResult:
            started = time.perf_counter()
            result = await attempt(self._connections[target].connect(), target)
            result.seconds = time.perf_counter() - started
            return result

        return await self.run_each(targets, work)

    def watch(self, on_connected: Callable[[str], None], retry_every: float,
              targets: Optional[Sequence[str]] = None) -> None:
        """Keep connections to ``targets`` (default: all) open from now on, retrying offline devices every
        ``retry_every`` seconds at most; ``on_connected(device_id)`` runs each time one opens."""
        for device_id in (targets if targets is not None else list(self._connections)):
            self._connection(device_id).watch(on_connected, retry_every)

    def connected(self, device_id: str) -> bool:
        return self._connection(device_id).connected

    async def send(self, device_id: str, command: Dict[str, Any], *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The device's reply. Raises ``DeviceUnreachable``/``CommandTimeout`` (a refusal is a reply)."""
        return await self._connection(device_id).request(command, timeout)

    async def send_encoded(self, device_id: str, body: bytes, command: str, *,
                           timeout: Optional[float] = None) -> Dict[str, Any]:
        """``send`` for a request already encoded with ``encode_shared_request``: for one request sent to many devices."""
        return await self._connection(device_id).request_encoded(body, command, timeout)

    async def send_all(
        self,
        command: Dict[str, Any],
        targets: Optional[Sequence[str]] = None,
        *,
        timeout: Optional[float] = None,
        on_result: Optional[ResultCallback] = None,
    ) -> Dict[str, DeviceResult]:
        """Send to many devices at once (bounded concurrency); one ``DeviceResult`` per device.

        The request is encoded once. Devices with an open connection are sent
        to straight from callbacks, without a task each; the others connect
        first. At most ``concurrency`` requests of this call are in flight at a time.
        """
        ids = list(targets) if targets is not None else list(self._connections)
        connections = [self._connection(device_id) for device_id in ids]
        body = encode_shared_request(command)
        name = str(command.get("command"))
        loop = asyncio.get_running_loop()
        results: Dict[str, DeviceResult] = {}
        finished = loop.create_future()
        queue = deque(connections)
        in_flight = 0

        def launch() -> None:
            nonlocal in_flight
            while queue and in_flight < self.concurrency:
                conn = queue.popleft()
                in_flight += 1
                finish = functools.partial(done, conn.device, time.perf_counter())
                try:
                    conn.send_with_callback(body, name, finish, timeout)
                except DeviceUnreachable:  # not connected: connect first, then the same request
                    task = asyncio.ensure_future(conn.request(command, timeout))
                    task.add_done_callback(functools.partial(_task_outcome, conn.device.id, finish))

        def done(device: Device, started: float, reply: Optional[Dict[str, Any]],
                 error: Optional[BaseException]) -> None:
            nonlocal in_flight
            in_flight -= 1
            device_id = device.id
            result = _failed(device_id, error) if error is not None else _replied(device_id, reply, device)
            result.seconds = time.perf_counter() - started
            results[device_id] = result
            try:
                if on_result is not None:
                    on_result(result)
            finally:
                if queue:
                    launch()
                elif in_flight == 0 and not finished.done():
                    finished.set_result(None)

        if ids:
            launch()
            try:
                await finished
            finally:
                queue.clear()  # cancelled: replies still on their way must not launch the rest
        return {device_id: results[device_id] for device_id in ids}

    def connection_status(self) -> Dict[str, Dict[str, Any]]:
        return {device_id: conn.status() for device_id, conn in self._connections.items()}

    # More

    async def status(
        self, targets: Optional[Sequence[str]] = None, *, timeout: Optional[float] = None
    ) -> Tuple[Dict[str, DeviceResult], Dict[str, Optional[Dict[str, Any]]]]:
        """Every target's ``get_status`` result, and the newest update-log entry of each reachable one.

        What ``fleet status`` shows; ``tables.status_table`` renders it.
        """
        ids = list(targets) if targets is not None else list(self._connections)
        statuses = await self.send_all({"command": "get_status"}, ids, timeout=timeout)
        reachable = [i for i in ids if statuses[i].status is Status.OK]
        logs = await self.send_all({"command": "update_log", "limit": 1}, reachable, timeout=timeout)
        last = {i: ((logs[i].reply or {}).get("entries") or [None])[0] for i in reachable}
        return statuses, last

    @property
    def devices(self) -> List[Device]:
        return [conn.device for conn in self._connections.values()]

    def device(self, device_id: str) -> Device:
        return self._connection(device_id).device

    async def last_reports(self, device_ids: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        """What devices behind a broker last reported there (the release they applied, when, how it went): for
        those that are offline now, the broker still knows. Devices over TCP, or that never reported, are left out."""
        by_session: Dict["BrokerSession", List[str]] = {}
        for device_id in device_ids:
            session = self.broker_session(device_id)
            if session is not None:
                by_session.setdefault(session, []).append(device_id)
        reports: Dict[str, Dict[str, Any]] = {}
        for session, ids in by_session.items():
            try:
                reports.update(await session.last_reports(ids))
            except DeviceError:  # the broker is unreachable too: their rows say so already
                pass
        return reports

    def broker_session(self, device_id: str) -> "Optional[BrokerSession]":
        """The broker session ``device_id`` is reached through; None for a device reached over TCP."""
        connection = self._connection(device_id)
        return getattr(connection, "session", None)

    async def close(self) -> None:
        await asyncio.gather(*(conn.close() for conn in self._connections.values()))
        await asyncio.gather(*(session.close() for session in self._brokers.values()))
        self._deadlines.close()

    async def __aenter__(self) -> "Fleet":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _connection(self, device_id: str) -> Connection:
        try:
            return self._connections[device_id]
        except KeyError:
            raise UnknownDevice(f"no device {device_id!r} in the fleet") from None

    async def run_each(
        self,
        targets: Sequence[str],
        work: Callable[[str], Awaitable[DeviceResult]],
        on_result: Optional[ResultCallback] = None,
    ) -> Dict[str, DeviceResult]:
        """Run ``work(device_id)`` for each target, ``concurrency`` at a time; report as each finishes.

        A few workers take ids from one queue, rather than a task per device
        waiting on a semaphore: a rollout to 1,000 devices runs 64 tasks, not 1,000.
        """
        for device_id in targets:
            self._connection(device_id)
        queue = deque(targets)
        results: Dict[str, DeviceResult] = {}

        async def worker() -> None:
            while queue:
                device_id = queue.popleft()
                result = await work(device_id)
                results[device_id] = result
                if on_result is not None:
                    on_result(result)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(queue)))))
        return {device_id: results[device_id] for device_id in targets}


async def attempt(awaitable: Awaitable[Any], device_id: str, device: Optional[Device] = None) -> DeviceResult:
    """Await one device operation and classify how it ended. Never raises for device trouble."""
    try:
        reply = await awaitable
    except DeviceError as exc:
        return _failed(device_id, exc)
    return _replied(device_id, reply, device)


def _task_outcome(device_id: str, finish: Callable[[Optional[Dict[str, Any]], Optional[BaseException]], None],
                  task: "asyncio.Future[Dict[str, Any]]") -> None:
    """Hand a finished request task to a reply callback."""
    if task.cancelled():
        finish(None, DeviceError(device_id, "cancelled"))
    elif task.exception() is not None:
        finish(None, task.exception())
    else:
        finish(task.result(), None)


def _failed(device_id: str, exc: BaseException) -> DeviceResult:
    if not isinstance(exc, DeviceError):  # a bug on our side: report it on this device, keep the others going
        log.error("request to %s failed unexpectedly", device_id, exc_info=exc)
        return DeviceResult(device_id, Status.FAILED, error=f"internal error: {exc!r}", code=contract.INTERNAL_ERROR)
    if isinstance(exc, CommandTimeout):
        return DeviceResult(device_id, Status.TIMEOUT, error=exc.message, code=contract.TIMEOUT)
    if isinstance(exc, DeviceUnreachable):  # code: unreachable, or connection_lost (the request may have run)
        return DeviceResult(device_id, Status.UNREACHABLE, error=exc.message, code=exc.code)
    return DeviceResult(device_id, Status.FAILED, error=exc.message, code=exc.code)


def _replied(device_id: str, reply: Any, device: Optional[Device] = None) -> DeviceResult:
    if not isinstance(reply, dict):  # connect() returns None
        return DeviceResult(device_id, Status.OK)
    if reply.get("success") is False:
        error = str(reply.get("error"))
        if reply.get("code") == contract.UNAUTHORIZED:  # the agent's sentence is for any client; this one has an inventory
            source = device.token_source if device is not None and device.token_source else f"${DEFAULT_TOKEN_ENV}"
            error += (f" (this controller sends the token from {source}: set it to the agent's token, "
                      "or give the device 'token' or 'token_env' in devices.json)")
        return DeviceResult(device_id, Status.FAILED, reply=reply, error=error, code=reply.get("code"))
    return DeviceResult(device_id, Status.OK, reply=reply)
