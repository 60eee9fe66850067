"""Instructions per ping, counted by valgrind, beside a bare baseline measured in the same run.

On this shared machine, wall and CPU times drift by a third from one minute
to the next. Instruction counts do not, so they show whether a change made
the Python side cheaper. There are two measures:

- controller: the instructions ``Fleet.send_all(ping)`` spends per device,
  beside a bare ``asyncio.BufferedProtocol`` client that sends the same ping
  over as many connections, 64 in flight as well, and only counts replies;
- agent: the instructions an agent spends per ping, beside the minimal
  asyncio server of ``agent_throughput.py``.

Each figure is the difference between a run of few rounds and a run of many,
divided by the pings in between, so start-up is not counted. Only user space
is counted: system calls and wake-ups happen in the kernel and are not
included here. ``fanout.py`` measures those, as time.

    python bench/instructions.py        (needs valgrind; takes two or three minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent_throughput import MINIMAL_SERVER  # noqa: E402
from fanout import start_hosts  # noqa: E402

CONTROLLER_DEVICES = 100
AGENT_CONNECTIONS = 50
PING = b'{"command":"ping","id":1}\n'


def collected(stderr: str) -> int:
    match = re.search(r"Collected : (\d+)", stderr)
    if match is None:
        raise RuntimeError(f"valgrind printed no instruction count:\n{stderr[-2000:]}")
    return int(match.group(1))


def valgrind(argv: List[str]) -> List[str]:
    return ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]


# The controller side: this file, run again under valgrind as the client.

async def client(kind: str, rounds: int, ports: List[int]) -> None:
    if kind == "fleet":
        from fleet import Device, Fleet
        async with Fleet([Device(id=f"d{i}", host="127.0.0.1", port=p) for i, p in enumerate(ports)],
                         connect_timeout=120, request_timeout=600) as fleet:
            await fleet.connect()
            for _ in range(rounds + 1):  # the first round warms up, as in the bare client
                results = await fleet.send_all({"command": "ping"})
                assert all(r.ok for r in results.values())
        return
    loop = asyncio.get_running_loop()

    class Counter(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buffer = bytearray(16 * 1024)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.transport = transport

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            state["left"] -= 1
            if state["queue"]:
                state["queue"].pop().transport.write(PING)
            if state["left"] == 0:
                state["done"].set_result(None)

    state: dict = {}
    protocols = [(await loop.create_connection(Counter, "127.0.0.1", port))[1] for port in ports]
    for _ in range(rounds + 1):
        state.update(left=len(protocols), queue=list(protocols), done=loop.create_future())
        for _ in range(min(64, len(protocols))):
            state["queue"].pop().transport.write(PING)
        await state["done"]


def controller_instructions(kind: str, ports: List[int]) -> float:
    counts = []
    for rounds in (1, 4):
        done = subprocess.run(valgrind([sys.executable, __file__, "--client", kind, "--rounds", str(rounds),
                                        "--ports", json.dumps(ports)]), cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {kind} client failed:\n{done.stderr[-2000:]}")
        counts.append(collected(done.stderr))
    return (counts[1] - counts[0]) / (3 * len(ports))


# The agent side: the server runs under valgrind, this process pings it.

def agent_instructions(kind: str) -> float:
    counts = []
    for rounds in (5, 45):
        with tempfile.TemporaryDirectory(prefix="pifleet-instructions-") as tmp:
            if kind == "agent":
                argv = [sys.executable, str(REPO / "bench" / "agent_host.py"), "--count", str(AGENT_CONNECTIONS),
                        "--base", tmp]
            else:
                argv = [sys.executable, "-c", MINIMAL_SERVER]
            server = subprocess.Popen(valgrind(argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            assert server.stdout is not None
            line = server.stdout.readline()
            if kind == "agent":
                ports = json.loads(line)["ports"]
            else:
                ports = [int(line.rsplit(":", 1)[1])] * AGENT_CONNECTIONS
            socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for port in ports]
            for _ in range(rounds):
                for sock in socks:
                    sock.sendall(PING)
                for sock in socks:
                    reply = b""
                    while not reply.endswith(b"\n"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise RuntimeError(f"the {kind} server closed a connection")
                        reply += chunk
            for sock in socks:
                sock.close()
            server.send_signal(signal.SIGINT if kind == "minimal" else signal.SIGTERM)
            _, stderr = server.communicate(timeout=300)
            counts.append(collected(stderr))
    return (counts[1] - counts[0]) / (40 * AGENT_CONNECTIONS)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", choices=["fleet", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        asyncio.run(client(args.client, args.rounds, json.loads(args.ports)))
        return 0
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    print("controller: counting...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pifleet-instructions-") as tmp:
        procs, ports = start_hosts(CONTROLLER_DEVICES, 1, Path(tmp))
        try:
            fleet = controller_instructions("fleet", ports)
            bare = controller_instructions("bare", ports)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
    print("agent: counting...", file=sys.stderr, flush=True)
    agent = agent_instructions("agent")
    minimal = agent_instructions("minimal")
    print(f"instructions per ping, user space only (valgrind), Python {sys.version.split()[0]}")
    print(f"{'side':<12} {'pifleet':>10} {'bare baseline':>14} {'ratio':>6}")
    print(f"{'controller':<12} {fleet:>10,.0f} {bare:>14,.0f} {fleet / bare:>6.2f}   "
          f"send_all(ping) to {CONTROLLER_DEVICES} agents; baseline: a bare BufferedProtocol client")
    print(f"{'agent':<12} {agent:>10,.0f} {minimal:>14,.0f} {agent / minimal:>6.2f}   "
          f"ping over {AGENT_CONNECTIONS} connections; baseline: agent_throughput.py's minimal server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
