"""Shared fixtures: real agents on 127.0.0.1 port 0 in tmp_path, real sockets.

``start_agent`` runs an ``Agent`` in the test's own event loop (fast, and the
test can look inside it); ``spawn_agent`` runs ``python -m agent`` as a child
process, for what only a real process shows (signals, exit codes, kill -9).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from agent.app import Agent
from agent.contract import listening_address
from agent.config import AgentConfig
from agent.tls import TLSFiles
from fleet.ca import FleetCA
from fleet.tls import ClientTLS

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
def _visible_base() -> Path:
    """Where tests keep what the import test's box must see as it is, wherever the repository lives.

    The box mounts a fresh /tmp, /var/tmp and /dev/shm, and runs as nobody when the
    agent is root: the folder must be outside those, and open to every user.
    """
    base = Path("/run") if os.geteuid() == 0 and os.access("/run", os.W_OK) else Path.home() / ".cache"
    return base / "pifleet-tests"


VISIBLE = _visible_base()
SCRIPTED = Path(__file__).resolve().parent / "scripted_handlers"
REPLY_TIMEOUT = 20.0  # a bound on every wait, so a broken agent fails a test instead of hanging it


async def wait_until(predicate, timeout: float = REPLY_TIMEOUT, what: str = "condition") -> None:
    """Wait for a condition the test cannot be told about directly (polls; bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def scripted(name: str) -> str:
    """The source of a scripted handler module from tests/scripted_handlers/."""
    return (SCRIPTED / f"{name}.py").read_text()


def sha(text: str) -> str:
    """The version an agent gives handler code: the sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def waits_for(flag: Path) -> str:
    """Module code that blocks its import (the push's import test) until ``flag`` exists: a push held mid-way.

    ``flag`` must be in ``flag_dir``: the import test's box has its own /tmp.
    """
    return f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


class Client:
    """A minimal line-JSON client over a real socket, independent of the agent's own protocol code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address, *, limit: int = 64 * 1024 * 1024) -> "Client":
        reader, writer = await asyncio.open_connection(address[0], address[1], limit=limit)
        return cls(reader, writer)

    async def send(self, message: Dict[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> Dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("the agent closed the connection")
        return json.loads(line)

    async def call(self, command: str, reply_timeout: float = REPLY_TIMEOUT, **fields: Any) -> Dict[str, Any]:
        await self.send({"command": command, **fields})
        return await self.reply(reply_timeout)

    async def closed_by_peer(self, timeout: float = REPLY_TIMEOUT) -> bool:
        """True once the agent has closed the connection (EOF), reading away anything before it."""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def visible_folder(prefix: str) -> Path:
    """A new folder outside /tmp that every user can enter (``VISIBLE``); the caller removes it."""
    VISIBLE.mkdir(parents=True, exist_ok=True)
    VISIBLE.chmod(0o755)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=VISIBLE))
    folder.chmod(0o755)
    return folder


@pytest.fixture
def flag_dir():
    """A folder the import test's box can see (read-only): outside /tmp, readable by the sandbox user.

    Tests hold a push mid-way with a module that waits for a file to appear;
    the box gives the module a fresh /tmp, so such files cannot live in tmp_path.
    """
    folder = visible_folder("flags-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def start_agent(tmp_path):
    """``await start_agent(handlers={"name": source}, **config)`` -> a started ``Agent``."""
    agents: List[Agent] = []

    async def _start(handlers: Optional[Dict[str, str]] = None, root: Optional[Path] = None, **options: Any) -> Agent:
        folder = root or tmp_path / f"agent{len(agents)}"
        (folder / "handlers").mkdir(parents=True, exist_ok=True)
        for name, source in (handlers or {}).items():
            (folder / "handlers" / f"{name}.py").write_text(source)
        options.setdefault("port", 0)
        agent = Agent(AgentConfig(root=folder, **options))
        await agent.start()
        agents.append(agent)
        if agent.broker_link is not None:  # online at the broker: what the test does next may look there
            await asyncio.wait_for(agent.broker_link.connected.wait(), REPLY_TIMEOUT)
        return agent

    yield _start
    for agent in agents:
        await agent.close()


@pytest.fixture
async def connect():
    """``await connect(agent_or_address)`` -> a ``Client``; every client is closed afterwards."""
    clients: List[Client] = []

    async def _connect(target: Any) -> Client:
        address = target.address if isinstance(target, Agent) else target
        client = await Client.connect(address)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        await client.close()


def python39() -> Optional[str]:
    """A Python 3.9 that runs (the agent's oldest target): on PATH or in pyenv; None if there is none."""
    for candidate in (shutil.which("python3.9"), "/root/.pyenv/versions/3.9.18/bin/python3.9"):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if probe.returncode == 0 and "(3, 9)" in probe.stdout:
                return candidate
    return None


class AgentProcess:
    """``python -m agent`` in a child process, started and read until it listens."""

    def __init__(self, root: Path, *extra: str, env: Optional[Dict[str, str]] = None,
                 python: str = sys.executable, cwd: Path = REPO,
                 preexec_fn: Optional[Callable[[], None]] = None) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [python, "-m", "agent", "--host", "127.0.0.1", "--port", "0", "--root", str(root), *extra],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        )
        self.address = self._read_address()

    def _read_address(self):
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the agent prints this line once it accepts connections
        address = listening_address(line)
        if address is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"agent did not start: {line!r} {err}")
        return address

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def spawn_agent(tmp_path):
    procs: List[AgentProcess] = []

    def _spawn(*extra: str, root: Optional[Path] = None, **kwargs: Any) -> AgentProcess:
        proc = AgentProcess(root or tmp_path / f"proc{len(procs)}", *extra, **kwargs)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.stop()


@pytest.fixture
def agents(tmp_path):
    """Real agent processes (``fleet.local``), each in its own folder under ``tmp_path``; stopped at the end."""
    from fleet.local import LocalAgents

    with LocalAgents(tmp_path / "agents") as local:
        yield local


class PKI:
    """A fleet CA with two devices and controllers in every state; and a second, unrelated CA."""

    def __init__(self, folder: Path) -> None:
        self.ca = FleetCA(folder / "ca")
        self.ca.init()
        self.devices = {d: self.ca.issue(d, folder / d) for d in ("d0", "d1")}
        self.controller = self.ca.issue("laptop", folder / "laptop", kind="controller")
        self.lost = self.ca.issue("lost-laptop", folder / "lost", kind="controller")
        long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
        self.expired = self.ca.issue("old-laptop", folder / "old", kind="controller", days=1, valid_from=long_ago)
        other = FleetCA(folder / "other-ca")
        other.init(name="someone else's CA")
        self.stranger = other.issue("laptop", folder / "stranger", kind="controller")

    def agent_files(self, device_id: str) -> TLSFiles:
        issued = self.devices[device_id]
        return TLSFiles(issued.cert, issued.key, issued.ca, self.ca.crl_path)

    def client(self, issued=None) -> ClientTLS:
        issued = issued or self.controller
        return ClientTLS(self.ca.cert_path, issued.cert, issued.key)


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path / "pki")


@pytest.fixture(scope="session")
def broker_pki(tmp_path_factory):
    from mosquitto import BrokerPKI, MISSING, have_mosquitto

    if not have_mosquitto():
        pytest.skip(MISSING)
    return BrokerPKI(tmp_path_factory.mktemp("broker-pki"))


@pytest.fixture(scope="session")
def broker(broker_pki, tmp_path_factory):
    """One Mosquitto for the whole session (TLS and plain listeners on loopback)."""
    from mosquitto import Mosquitto

    server = Mosquitto.for_pki(tmp_path_factory.mktemp("broker"), broker_pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_broker(broker_pki, tmp_path):
    """A Mosquitto of the test's own, to restart at will."""
    from mosquitto import Mosquitto

    server = Mosquitto.for_pki(tmp_path / "own-broker", broker_pki)
    server.start()
    yield server
    server.stop()


async def until_online(fleet, device_id, limit=20.0):
    """The device's status, once its agent (started just now) is online at the broker: the broker says when."""
    online = asyncio.Event()
    fleet.watch(lambda _device: online.set(), retry_every=1.0, targets=[device_id])
    await fleet.connect(device_id)  # connects to the broker; the device may not be there yet
    if not fleet.connected(device_id):
        await asyncio.wait_for(online.wait(), limit)
    return await fleet.send(device_id, {"command": "get_status"})
