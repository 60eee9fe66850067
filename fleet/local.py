"""Real agents on this machine, for the demo and the tests: one ``pi-agent`` process each.

Each agent listens on 127.0.0.1 on a free port (``--port 0``) with its own
root folder, exactly as on a Pi, and is stopped with SIGTERM.

Also here: a stand-in for the Pi's camera recorder (``rpicam-vid`` and its
predecessors) for machines without a camera. It is a small script that
writes a growing file until its ``-t`` time is up or it gets SIGINT, which is
all the camera handler relies on. It is never used on a real Pi.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from agent.contract import listening_address

from .inventory import Device

STAND_IN_RECORDER = '''#!{python}
"""Stand-in for {name}: writes a growing file until -t milliseconds pass or SIGINT arrives.

It records the arguments it was started with in OUTPUT.args.json, so the flags
a handler passes can be checked, and ignores SIGINT when STAND_IN_IGNORE_SIGINT
is set (a recorder that has to be stopped harder).
"""
import json, os, signal, sys, time
args = sys.argv[1:]
out = args[args.index("-o") + 1]
millis = int(args[args.index("-t") + 1])
with open(out + ".args.json", "w") as record:
    json.dump({{"name": os.path.basename(sys.argv[0]), "args": args}}, record)
stop = []
if os.environ.get("STAND_IN_IGNORE_SIGINT"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
deadline = time.monotonic() + millis / 1000.0 if millis else None
with open(out, "ab") as video:
    while not stop and (deadline is None or time.monotonic() < deadline):
        video.write(b"\\0" * 4096)
        video.flush()
        time.sleep(0.02)
'''


def install_stand_in_recorder(folder: Path, name: str = "rpicam-vid") -> Path:
    """Write an executable stand-in recorder called ``name`` into ``folder``; put that folder on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(STAND_IN_RECORDER.format(python=sys.executable, name=name))
    path.chmod(0o755)
    return path


def free_port() -> int:
    """A loopback port nothing listens on right now (for a device that is meant to be offline)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalAgent:
    device: Device
    root: Path
    process: subprocess.Popen


class LocalAgents:
    """Start and stop local agent processes. Use as a context manager so they always stop."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.agents: Dict[str, LocalAgent] = {}

    def start(self, device_id: str, *, env: Optional[Dict[str, str]] = None, extra: Sequence[str] = (),
              launcher_bundle: Optional[Path] = None) -> LocalAgent:
        """Start an agent; with ``launcher_bundle``, as a Pi's unit does: the launcher running that bundle."""
        root = self.base / device_id
        root.mkdir(parents=True, exist_ok=True)
        log = open(root / "agent.log", "ab")
        program = ["-m", "agent"] if launcher_bundle is None else \
            ["-m", "agent.launcher", "--bundle", str(launcher_bundle)]
        process = subprocess.Popen(
            [sys.executable, *program, "--host", "127.0.0.1", "--port", "0", "--root", str(root), *extra],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
        )
        log.close()
        assert process.stdout is not None
        address = listening_address(process.stdout.readline())
        if address is None:
            process.kill()
            raise RuntimeError(f"agent {device_id} did not start; see {root / 'agent.log'}")
        device = Device(id=device_id, host=address[0], port=address[1], name=device_id)
        agent = LocalAgent(device, root, process)
        self.agents[device_id] = agent
        return agent

    def stop(self, device_id: str) -> None:
        agent = self.agents.pop(device_id)
        if agent.process.poll() is None:
            agent.process.terminate()
            try:
                agent.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait()
        if agent.process.stdout is not None:
            agent.process.stdout.close()

    def stop_all(self) -> None:
        for device_id in list(self.agents):
            self.stop(device_id)

    def __enter__(self) -> "LocalAgents":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
