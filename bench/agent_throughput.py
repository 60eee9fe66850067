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

Then the agent over mutual TLS beside the same agent on plain TCP, in the
same run (certificates from the fleet CA, ``fleet/ca.py``; the client presents
a controller's): sequential and 50-connection ping throughput (target >= 0.6 x
plain), and what a full handshake costs (connect, TLS 1.3 handshake with both
certificates checked, first ping answered), beside a plain connect and ping.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


async def _connect(address: Tuple[str, int], tls: Optional[ssl.SSLContext] = None) -> _PingClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_PingClient, *address, ssl=tls)
    return client


def start_server(kind: str, root: Path, tls_args: Sequence[str] = (),
                 tls: Optional[ssl.SSLContext] = None) -> Tuple[subprocess.Popen, Tuple[str, int], float]:
    """Start a server process; return it, its address and the seconds to its first ping reply."""
    started = time.perf_counter()
    if kind == "agent":
        command = [sys.executable, "-m", "agent", "--port", "0", "--root", str(root), "--log-level", "WARNING",
                   *tls_args]
    else:
        command = [sys.executable, "-c", MINIMAL_SERVER]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    host, port = line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)
    address = (host, int(port))

    async def first_ping() -> None:
        client = await _connect(address, tls)
        await client.ping_many(1)
        client.transport.close()

    asyncio.run(first_ping())
    return proc, address, time.perf_counter() - started


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used (utime + stime, /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sequential_rate(address: Tuple[str, int], pings: int, tls: Optional[ssl.SSLContext] = None) -> float:
    async def run() -> float:
        client = await _connect(address, tls)
        await client.ping_many(100)  # warm up
        started = time.perf_counter()
        await client.ping_many(pings)
        elapsed = time.perf_counter() - started
        client.transport.close()
        return pings / elapsed

    return asyncio.run(run())


def concurrent_rate(address: Tuple[str, int], pings: int, connections: int = 50,
                    tls: Optional[ssl.SSLContext] = None, cpu: Optional[Dict[str, float]] = None,
                    server_pid: Optional[int] = None) -> float:
    """Pings/s over ``connections`` connections; with ``cpu``, also the CPU seconds per ping of the client
    and (``server_pid``) of the server, into ``cpu``."""
    async def run() -> float:
        clients = [await _connect(address, tls) for _ in range(connections)]
        await asyncio.gather(*(c.ping_many(10) for c in clients))
        each = max(1, pings // connections)
        started, client_cpu = time.perf_counter(), time.process_time()
        server_cpu = process_cpu(server_pid) if server_pid else 0.0
        await asyncio.gather(*(c.ping_many(each) for c in clients))
        elapsed = time.perf_counter() - started
        if cpu is not None:
            cpu["client"] = (time.process_time() - client_cpu) / (each * connections)
            cpu["server"] = (process_cpu(server_pid) - server_cpu) / (each * connections) if server_pid else 0.0
        for c in clients:
            c.transport.close()
        await asyncio.sleep(0.1)  # let the TLS goodbyes go out before the loop ends (not timed)
        return each * connections / elapsed

    return asyncio.run(run())


def connect_and_ping_ms(address: Tuple[str, int], count: int, tls: Optional[ssl.SSLContext]) -> Tuple[float, float]:
    """Median wall and client CPU (ms) of: connect (and with ``tls``, the full handshake), one ping, close."""
    async def run() -> Tuple[float, float]:
        walls, cpus = [], []
        for _ in range(count):
            wall, cpu = time.perf_counter(), time.process_time()
            client = await _connect(address, tls)
            await client.ping_many(1)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            client.transport.close()
            await asyncio.sleep(0.002)  # the goodbye goes out between samples (not timed)
        return statistics.median(walls) * 1000, statistics.median(cpus) * 1000

    return asyncio.run(run())


def make_pki(folder: Path) -> Tuple[List[str], ssl.SSLContext]:
    """A fleet CA, a device certificate for the agent and a controller's for the client."""
    sys.path.insert(0, str(REPO))
    from fleet.ca import FleetCA
    from fleet.tls import ClientTLS, client_context

    ca = FleetCA(folder / "ca")
    ca.init()
    device = ca.issue("bench", folder / "device")
    controller = ca.issue("bench-controller", folder / "controller", kind="controller")
    args = ["--tls-cert", str(device.cert), "--tls-key", str(device.key), "--tls-ca", str(device.ca),
            "--tls-crl", str(ca.crl_path)]
    return args, client_context(ClientTLS(ca.cert_path, controller.cert, controller.key, ca.crl_path))


def measure_tls(pings: int, folder: Path, tls_args: List[str], tls: Optional[ssl.SSLContext]) -> Dict[str, float]:
    """The agent, over TLS when ``tls`` is given, else plain: throughput and connect-and-ping cost."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, address, _ = start_server("agent", Path(tmp) / "root", tls_args if tls else (), tls)
        try:
            wall, cpu = connect_and_ping_ms(address, 50, tls)
            per_ping: Dict[str, float] = {}
            rates = {"sequential_per_s": sequential_rate(address, pings, tls),
                     "concurrent_per_s": concurrent_rate(address, pings * 4, tls=tls, cpu=per_ping,
                                                         server_pid=proc.pid)}
            return {**rates, "agent_us_per_ping": per_ping["server"] * 1e6,
                    "client_us_per_ping": per_ping["client"] * 1e6, "connect_ms": wall, "connect_cpu_ms": cpu}
        finally:
            proc.terminate()
            proc.wait(timeout=20)


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
    return tls_table(args)


TLS_ROWS: List[Tuple[str, str, Optional[Callable[[float], bool]]]] = [
    ("sequential_per_s", "sequential pings/s, 1 connection", lambda ratio: ratio >= 0.6),
    ("concurrent_per_s", "pings/s over 50 connections", lambda ratio: ratio >= 0.6),
    ("agent_us_per_ping", "  agent CPU per ping there (us)", None),
    ("client_us_per_ping", "  client CPU per ping there (us)", None),
    ("connect_ms", "connect (+ handshake) + 1 ping (ms)", None),
    ("connect_cpu_ms", "  of it, the client's CPU (ms)", None),
]


def tls_table(args: argparse.Namespace) -> int:
    """The agent over mutual TLS beside the same agent on plain TCP, alternating, medians."""
    with tempfile.TemporaryDirectory() as tmp:
        tls_args, context = make_pki(Path(tmp))
        results: Dict[str, List[Dict[str, float]]] = {"plain": [], "tls": []}
        for round_number in range(1, args.rounds + 1):
            for kind in ("plain", "tls"):
                results[kind].append(measure_tls(args.pings, Path(tmp), tls_args, context if kind == "tls" else None))
                print(f"round {round_number}/{args.rounds}: agent over {kind} measured", file=sys.stderr, flush=True)
    print()
    print(f"{'measure (pi-agent)':34} {'plain TCP':>15} {'mutual TLS':>12} {'ratio':>7}  target")
    for key, label, meets in TLS_ROWS:
        plain = statistics.median(r[key] for r in results["plain"])
        secure = statistics.median(r[key] for r in results["tls"])
        ratio = secure / plain
        verdict = ("met" if meets(ratio) else "MISSED") if meets else ""
        print(f"{label:34} {plain:15.2f} {secure:12.2f} {ratio:7.2f}  {'>= 0.6 ' + verdict if meets else '-'}")
    median = {kind: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for kind, rows in results.items()}
    cores = os.cpu_count() or 1
    print(f"bound: the client and the agent share this machine's {cores} CPUs, so over 50 connections neither can "
          "beat cores / (client + agent CPU per ping): "
          + ", ".join(f"{kind} {cores / ((m['client_us_per_ping'] + m['agent_us_per_ping']) / 1e6):.0f}/s"
                      for kind, m in median.items())
          + f"; the agent alone, as on a Pi serving a remote controller, could answer "
          f"{median['plain']['agent_us_per_ping'] / median['tls']['agent_us_per_ping']:.2f} x as many pings over TLS "
          "as over plain TCP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
