"""Agent throughput, start time and memory, beside the floor any Python agent stands on.

The floor is a minimal asyncio server that answers each JSON line with one
JSON line (``asyncio.start_server``, ``readline``, ``json.loads``,
``json.dumps``, ``write``, ``drain``): no auth, no dispatch, no handlers.
Both servers run as separate processes, measured in the same run by the same
client, alternating, several rounds; the table shows medians. The machine is
shared and noisy: read the ratios, not the absolute numbers.

    python bench/agent_throughput.py [--rounds 3] [--pings 5000]

Targets: agent throughput >= 0.8 x the floor (sequential and 50 connections),
idle RSS <= 1.3 x, time to first ping <= 2 x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent

MINIMAL_SERVER = r'''
import asyncio, json

async def handle(reader, writer):
    while True:
        line = await reader.readline()
        if not line:
            break
        request = json.loads(line)
        reply = {"success": True, "message": "pong", "id": request.get("id")}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print("listening on 127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
'''

PING = b'{"command":"ping","id":1}\n'


class _PingClient(asyncio.Protocol):
    """A lean client: one request in flight, counts reply lines."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.waiter: asyncio.Future
        self.buffer = b""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer:
            self.buffer = self.buffer.split(b"\n")[-1]
            if not self.waiter.done():
                self.waiter.set_result(None)

    async def ping_many(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            self.waiter = loop.create_future()
            self.transport.write(PING)
            await self.waiter


async def _connect(address: Tuple[str, int]) -> _PingClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_PingClient, *address)
    return client


def start_server(kind: str, root: Path) -> Tuple[subprocess.Popen, Tuple[str, int], float]:
    """Start a server process; return it, its address and the seconds to its first ping reply."""
    started = time.perf_counter()
    if kind == "agent":
        command = [sys.executable, "-m", "agent", "--port", "0", "--root", str(root), "--log-level", "WARNING"]
    else:
        command = [sys.executable, "-c", MINIMAL_SERVER]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    host, port = line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)
    address = (host, int(port))

    async def first_ping() -> None:
        client = await _connect(address)
        await client.ping_many(1)
        client.transport.close()

    asyncio.run(first_ping())
    return proc, address, time.perf_counter() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sequential_rate(address: Tuple[str, int], pings: int) -> float:
    async def run() -> float:
        client = await _connect(address)
        await client.ping_many(100)  # warm up
        started = time.perf_counter()
        await client.ping_many(pings)
        elapsed = time.perf_counter() - started
        client.transport.close()
        return pings / elapsed

    return asyncio.run(run())


def concurrent_rate(address: Tuple[str, int], pings: int, connections: int = 50) -> float:
    async def run() -> float:
        clients = [await _connect(address) for _ in range(connections)]
        await asyncio.gather(*(c.ping_many(10) for c in clients))
        each = max(1, pings // connections)
        started = time.perf_counter()
        await asyncio.gather(*(c.ping_many(each) for c in clients))
        elapsed = time.perf_counter() - started
        for c in clients:
            c.transport.close()
        return each * connections / elapsed

    return asyncio.run(run())


def measure(kind: str, pings: int) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, address, first_ping = start_server(kind, Path(tmp) / "root")
        try:
            rss = rss_kib(proc.pid)
            return {
                "first_ping_ms": first_ping * 1000,
                "idle_rss_mib": rss / 1024,
                "sequential_per_s": sequential_rate(address, pings),
                "concurrent_per_s": concurrent_rate(address, pings * 2),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=20)


ROWS: List[Tuple[str, str, Callable[[float], bool]]] = [
    ("idle_rss_mib", "idle RSS (MiB)", lambda ratio: ratio <= 1.3),
    ("first_ping_ms", "start to first ping (ms)", lambda ratio: ratio <= 2.0),
    ("sequential_per_s", "sequential pings/s, 1 connection", lambda ratio: ratio >= 0.8),
    ("concurrent_per_s", "pings/s over 50 connections", lambda ratio: ratio >= 0.8),
]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server (default 3)")
    parser.add_argument("--pings", type=int, default=5000, help="pings per sequential measurement (default 5000)")
    args = parser.parse_args(argv)
    results: Dict[str, List[Dict[str, float]]] = {"agent": [], "minimal": []}
    for round_number in range(1, args.rounds + 1):
        for kind in ("minimal", "agent"):
            results[kind].append(measure(kind, args.pings))
            print(f"round {round_number}/{args.rounds}: {kind} measured", file=sys.stderr, flush=True)
    print(f"agent throughput bench: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds, medians")
    print(f"{'measure':34} {'minimal server':>15} {'pi-agent':>12} {'ratio':>7}  target")
    all_met = True
    for key, label, meets in ROWS:
        floor = statistics.median(r[key] for r in results["minimal"])
        ours = statistics.median(r[key] for r in results["agent"])
        ratio = ours / floor
        ok = meets(ratio)
        all_met &= ok
        target = {"idle_rss_mib": "<= 1.3", "first_ping_ms": "<= 2.0"}.get(key, ">= 0.8")
        print(f"{label:34} {floor:15.1f} {ours:12.1f} {ratio:7.2f}  {target} {'met' if ok else 'MISSED'}")
    print("all targets met" if all_met else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
