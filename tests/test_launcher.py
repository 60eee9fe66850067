"""Upgrading the agent itself through its launcher: real bundles, real processes, a kill in the middle."""

import base64
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from fleet.bundle import AGENT, build_pyz
from fleet.local import free_port

HANDLER = "def handle_hello(data):\n    return {'hello': 1}\n"


def bundle(tmp_path, version, main=None):
    """A real agent bundle claiming ``version``; with ``main``, its __main__ replaced (a broken agent)."""
    source = tmp_path / f"src-{version}" / "agent"
    shutil.copytree(AGENT, source, ignore=shutil.ignore_patterns("__pycache__"))
    init = source / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', f'__version__ = "{version}"  # was "', 1))
    path = build_pyz(tmp_path / f"dist-{version}", source=source, version=version)
    if main is not None:
        import zipapp

        staging = tmp_path / f"broken-{version}"
        staging.mkdir()
        (staging / "__main__.py").write_text(main)
        zipapp.create_archive(staging, path)
    return path


class Launcher:
    """``python -m agent.launcher`` with a shipped bundle, on a fixed port, its stdout read line by line."""

    def __init__(self, shipped, root, port):
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.launcher", "--bundle", str(shipped), "--root", str(root),
             "--port", str(port), "--log-level", "WARNING"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)

    def line_with(self, words, limit=60.0):
        """The next line it prints that holds ``words`` (the agent's, or the launcher's own)."""
        deadline = time.monotonic() + limit
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if words in line:
                return line

    def listening(self):
        return self.line_with("listening on")

    def ask(self, request):
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            return json.loads(sock.makefile().readline())

    def stop(self, how=signal.SIGTERM):
        if self.process.poll() is None:
            os.killpg(self.process.pid, how)  # the launcher and its agent
            self.process.wait(30)
        self.process.stdout.close()
        self.process.stderr.close()


def upgrade_request(path):
    data = Path(path).read_bytes()
    return {"command": "upgrade_agent", "bundle": base64.b64encode(data).decode(),
            "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture
def device(tmp_path):
    launched = []

    def start(shipped):
        launched.append(Launcher(shipped, tmp_path / "root", free_port()))
        return launched[-1]

    yield start
    for launcher in launched:
        launcher.stop(signal.SIGKILL)


def test_a_good_bundle_becomes_the_agent_and_the_handlers_stay_live(tmp_path, device):
    launcher = device(bundle(tmp_path, "1.0.0"))
    launcher.listening()
    assert launcher.ask({"command": "update_handler", "filename": "hello.py", "code": HANDLER})["success"] is True
    new = bundle(tmp_path, "2.0.0")
    reply = launcher.ask(upgrade_request(new))
    assert reply["success"] is True and reply["restarting"] is True, reply
    launcher.listening()  # the new agent, up
    assert "2.0.0" not in launcher.line_with("launcher: ")  # kept once it stayed up: "switched <bundle>"
    status = launcher.ask({"command": "get_status"})
    assert status["agent_version"] == "2.0.0" and status["bundle"]["sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()
    assert launcher.ask({"command": "hello"})["hello"] == 1  # handlers, backups and state carried over
    history = (tmp_path / "root" / ".state" / "agent" / "history.jsonl").read_text()
    assert '"event": "switched"' in history and hashlib.sha256(new.read_bytes()).hexdigest() in history


def test_a_bundle_that_does_not_come_up_leaves_the_old_agent(tmp_path, device):
    launcher = device(bundle(tmp_path, "1.0.0"))
    launcher.listening()
    broken = bundle(tmp_path, "6.6.6", main="import sys\nsys.exit(3)\n")
    assert launcher.ask(upgrade_request(broken))["success"] is True
    assert "launcher: failed" in launcher.line_with("launcher: ")
    launcher.listening()  # the old agent again
    assert launcher.ask({"command": "get_status"})["agent_version"] == "1.0.0"
    history = (tmp_path / "root" / ".state" / "agent" / "history.jsonl").read_text()
    assert '"event": "failed"' in history and "exited with status 3 before listening" in history


def test_a_launcher_killed_while_the_new_agent_starts_comes_back_on_the_old_one(tmp_path, device):
    shipped = bundle(tmp_path, "1.0.0")
    launcher = device(shipped)
    launcher.listening()
    hangs = bundle(tmp_path, "7.7.7", main="import time\ntime.sleep(600)\n")  # never listens
    assert launcher.ask(upgrade_request(hangs))["success"] is True
    trial = tmp_path / "root" / ".state" / "agent" / "trial.json"
    deadline = time.monotonic() + 30
    while not (trial.exists() and json.loads(trial.read_text()).get("attempted")):
        assert time.monotonic() < deadline, "the launcher never started the new agent"
        time.sleep(0.02)
    launcher.stop(signal.SIGKILL)  # the power goes in the middle of the switch
    again = device(shipped)  # the next boot
    again.listening()
    assert again.ask({"command": "get_status"})["agent_version"] == "1.0.0"
    assert not trial.exists()


async def test_without_the_launcher_upgrade_agent_is_refused(start_agent, connect, tmp_path):
    agent = await start_agent()
    client = await connect(agent)
    request = upgrade_request(build_pyz(tmp_path))
    reply = await client.call(request.pop("command"), **request)
    assert reply["success"] is False and "not started by pi-agent's launcher" in reply["error"]


def fleet_of(tmp_path, agents, count, shipped, ports):
    entries = []
    for i in range(count):
        agent = agents.start(f"d{i}", launcher_bundle=shipped, extra=["--port", str(ports[i])])
        entries.append({"id": f"d{i}", "host": "127.0.0.1", "port": agent.device.port})
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"defaults": {"timeout": 60}, "raspberryPiDevices": entries}))
    return path


def test_fleet_agent_upgrade_moves_every_device_in_waves_and_keeps_their_handlers(tmp_path, agents, capsys):
    from fleet.cli import main

    devices = fleet_of(tmp_path, agents, 3, bundle(tmp_path, "1.0.0"), [free_port() for _ in range(3)])
    (tmp_path / "hello.py").write_text(HANDLER)
    assert main(["-d", str(devices), "deploy", str(tmp_path / "hello.py")]) == 0
    new = bundle(tmp_path, "2.0.0")
    capsys.readouterr()
    assert main(["-d", str(devices), "agent", "upgrade", "--bundle", str(new), "--canary", "1", "--batch", "1",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr()[0])
    assert report["waves"] == [["d0"], ["d1"], ["d2"]]
    assert [d["note"] for d in report["devices"]] == ["agent 2.0.0 running"] * 3
    assert main(["-d", str(devices), "status", "--json"]) == 0
    assert [d["agent"]["agent_version"] for d in json.loads(capsys.readouterr()[0])["devices"]] == ["2.0.0"] * 3
    assert main(["-d", str(devices), "send", "all", "hello", "--json"]) == 0  # handlers carried over


def test_a_bundle_that_does_not_come_up_halts_the_upgrade_at_the_canary(tmp_path, agents, capsys):
    from fleet.cli import main

    devices = fleet_of(tmp_path, agents, 3, bundle(tmp_path, "1.0.0"), [free_port() for _ in range(3)])
    broken = bundle(tmp_path, "6.6.6", main="import sys\nsys.exit(3)\n")
    capsys.readouterr()
    assert main(["-d", str(devices), "agent", "upgrade", "--bundle", str(broken), "--json"]) == 1
    report = json.loads(capsys.readouterr()[0])
    assert report["halted"] and report["counts"] == {"FAILED": 1, "SKIPPED": 2}
    assert "launcher went back to the previous one" in report["devices"][0]["error"]
    assert main(["-d", str(devices), "status", "--json"]) == 0
    assert [d["agent"]["agent_version"] for d in json.loads(capsys.readouterr()[0])["devices"]] == ["1.0.0"] * 3


async def test_with_trusted_keys_only_a_signed_bundle_is_staged(start_agent, connect, tmp_path, monkeypatch):
    from agent.launcher import LAUNCHER_ENV
    from agent.upgrade import BUNDLE_NAME
    from fleet.keys import init_key, load_key

    private, public, _ = init_key(tmp_path / "keys")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "release.pub").write_bytes(public.read_bytes())
    monkeypatch.setenv(LAUNCHER_ENV, "1")  # as if the launcher had started it
    agent = await start_agent(trusted_keys=trusted)
    client = await connect(agent)
    request = upgrade_request(build_pyz(tmp_path / "dist"))
    command = request.pop("command")
    unsigned = await client.call(command, **request)
    assert unsigned["code"] == "unsigned" and not agent.upgrade_staged.is_set()
    key = load_key(private)
    signed = await client.call(command, **request, signature=key.sign(BUNDLE_NAME, request["sha256"]),
                               key_id=key.key_id)
    assert signed["success"] is True and signed["staged"].endswith(f"{request['sha256']}.pyz")
    trial = json.loads((agent.config.root / ".state" / "agent" / "trial.json").read_text())
    assert trial["sha256"] == request["sha256"]
