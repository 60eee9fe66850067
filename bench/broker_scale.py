"""Through a broker at scale: one Mosquitto and 10,000 devices, beside 1,000 agents over direct TCP.

Starts a real Mosquitto (the configuration ``fleet broker config`` writes; the
devices and the controller use its plain listener on loopback, so no TLS
handshakes are counted), 10,000 simulated devices in a few processes (real
MQTT connections answering like agents: ``broker_devices.py``), and, for the
baseline in the same run, 1,000 real agents in a few processes
(``agent_host.py``) reached over direct TCP. Measures:

- connect time: every device online at the broker, and the controller's own
  connection (with every device's retained status in);
- ``send_all(ping)``: wall time and the controller's CPU per device (median of
  three), through the broker and over TCP;
- the time for all 10,000 devices to report a new desired release, from the
  moment the controller starts publishing it (``leave_desired``: one retained
  message per device, the file's code once);
- the broker's RSS, and its CPU per ping.

    python bench/broker_scale.py [--devices 10000] [--tcp 1000] [--processes 4]

Targets on this machine: send_all(ping) to 10,000 under 3 s with controller
CPU under 0.2 ms per device; all 10,000 on a new release under 10 s. Every
process here shares this machine's CPUs, so the bench prints that bound too.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import aiomqtt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fanout import processes_cpu, start_hosts  # noqa: E402
from fleet import Device, Fleet, Status  # noqa: E402
from fleet.broker_config import BrokerFiles, write_config  # noqa: E402
from fleet.broker_desired import leave_desired  # noqa: E402
from fleet.ca import FleetCA  # noqa: E402
from fleet.inventory import BrokerRoute  # noqa: E402
from fleet.local import free_port  # noqa: E402
from fleet.state import StateStore  # noqa: E402

CAMERA = (REPO / "handlers" / "camera_handlers.py").read_bytes()
ROUNDS = 3


def start_broker(folder: Path) -> Tuple[subprocess.Popen, int]:
    """Mosquitto with the fleet's configuration, on free ports; returns once it runs."""
    ca = FleetCA(folder / "ca")
    ca.init()
    issued = ca.issue("127.0.0.1", folder / "broker-tls", kind="broker", hosts=["127.0.0.1"])
    plain = free_port()
    conf, *_ = write_config(ca, BrokerFiles(issued.cert, issued.key, issued.ca, ca.crl_path), folder / "broker",
                           host="127.0.0.1", port=free_port(), plain_port=plain, run_as=getpass.getuser())
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    running = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if " running" in line:
                running.set()
        running.set()

    threading.Thread(target=drain, daemon=True).start()
    if not running.wait(30) or proc.poll() is not None:
        raise SystemExit("mosquitto did not start")
    return proc, plain


def start_devices(port: int, total: int, processes: int) -> Tuple[List[subprocess.Popen], float]:
    """``total`` simulated devices in ``processes`` processes; returns once all are online, and how long it took."""
    started = time.perf_counter()
    each = -(-total // processes)
    procs = [subprocess.Popen([sys.executable, str(REPO / "bench" / "broker_devices.py"), "--port", str(port),
                               "--first", str(first), "--count", str(min(each, total - first))],
                              stdout=subprocess.PIPE, text=True)
             for first in range(0, total, each)]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("a device process did not start")
    return procs, time.perf_counter() - started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def pings(fleet: Fleet, n: int, others: Sequence[int], devices: Sequence[int] = ()) -> Dict[str, float]:
    """send_all(ping): median wall and controller CPU of ``ROUNDS``, and the CPU per ping of ``others`` (the
    broker, or the agents) and of ``devices`` (the simulated devices' processes)."""
    await fleet.send_all({"command": "ping"})  # warm
    walls, cpus = [], []
    others_before, devices_before = processes_cpu(list(others)), processes_cpu(list(devices))
    for _ in range(ROUNDS):
        wall, cpu = time.perf_counter(), time.process_time()
        results = await fleet.send_all({"command": "ping"})
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        failed = [r for r in results.values() if r.status is not Status.OK]
        assert not failed, f"{len(failed)} pings failed, e.g. {failed[0].as_dict()}"
    return {"ping_wall": statistics.median(walls), "ping_cpu_per_device": statistics.median(cpus) / n,
            "others_cpu_per_ping": (processes_cpu(list(others)) - others_before) / (ROUNDS * n),
            "devices_cpu_per_ping": (processes_cpu(list(devices)) - devices_before) / (ROUNDS * n)}


async def through_broker(port: int, n: int, broker_pid: int, device_pids: List[int],
                         folder: Path) -> Dict[str, float]:
    url = f"mqtt://127.0.0.1:{port}"
    ids = [f"sim{i:05d}" for i in range(n)]
    async with Fleet([Device(id=d, host="", broker=BrokerRoute(url)) for d in ids], connect_timeout=60,
                     request_timeout=60) as fleet:
        started = time.perf_counter()
        connected = await fleet.connect()
        figures = {"controller_connect": time.perf_counter() - started}
        assert all(r.status is Status.OK for r in connected.values()), "a device is not online"
        figures.update(await pings(fleet, n, [broker_pid], device_pids))
        figures["converge"] = await new_release_everywhere(fleet, ids, port, folder)
    return figures


async def new_release_everywhere(fleet: Fleet, ids: List[str], port: int, folder: Path) -> float:
    """Seconds from the first desired message published to the last device's report on it."""
    with StateStore(folder / "state.db") as store:
        release, _ = store.record_release({"camera_handlers.py": CAMERA}, message="bench", author="bench")
        store.set_desired({d: release.number for d in ids})
        waiting = set(ids)
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5,
                                  max_queued_incoming_messages=0) as watcher:
            await watcher.subscribe("pifleet/+/reported", qos=1)
            started = time.perf_counter()
            problems = await leave_desired(fleet, store, ids)
            assert not problems, problems
            async for message in watcher.messages:
                if json.loads(message.payload).get("release") == release.number:
                    waiting.discard(message.topic.value.split("/")[1])
                    if not waiting:
                        return time.perf_counter() - started
    raise AssertionError("unreachable")


async def over_tcp(ports: List[int], host_pids: List[int]) -> Dict[str, float]:
    devices = [Device(id=f"dev{i:04d}", host="127.0.0.1", port=port) for i, port in enumerate(ports)]
    async with Fleet(devices, connect_timeout=60, request_timeout=60) as fleet:
        started = time.perf_counter()
        await fleet.connect()
        figures = {"controller_connect": time.perf_counter() - started}
        figures.update(await pings(fleet, len(ports), host_pids))
    return figures


def stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10000, help="simulated devices behind the broker (10000)")
    parser.add_argument("--tcp", type=int, default=1000, help="real agents over direct TCP, the baseline (1000)")
    parser.add_argument("--processes", type=int, default=4, help="processes for each kind of device (4)")
    args = parser.parse_args(argv)
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is not installed: apt-get install mosquitto", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pifleet-broker-scale-") as tmp:
        folder = Path(tmp)
        broker, port = start_broker(folder)
        procs: List[subprocess.Popen] = []
        try:
            procs, connect_all = start_devices(port, args.devices, args.processes)
            print(f"{args.devices} devices online at the broker in {connect_all:.1f}s", file=sys.stderr, flush=True)
            broker_cpu = processes_cpu([broker.pid])
            mqtt = asyncio.run(through_broker(port, args.devices, broker.pid, [p.pid for p in procs], folder))
            mqtt.update(connect_all=connect_all, broker_rss=rss_mib(broker.pid),
                        broker_cpu=processes_cpu([broker.pid]) - broker_cpu)
            stop(procs)
            procs = []
            started = time.perf_counter()
            hosts, ports = start_hosts(args.tcp, args.processes, folder / "agents")
            procs = hosts
            tcp = asyncio.run(over_tcp(ports, [h.pid for h in hosts]))
            tcp["connect_all"] = time.perf_counter() - started
        finally:
            stop(procs)
            stop([broker])
    report(args, mqtt, tcp)
    return 0


def report(args: argparse.Namespace, mqtt: Dict[str, float], tcp: Dict[str, float]) -> None:
    cores = os.cpu_count() or 1
    print(f"broker scale bench: Python {sys.version.split()[0]}, {cores} CPUs, one Mosquitto "
          f"(plain MQTT on loopback), devices in {args.processes} processes, controller = this process")
    print(f"{'measure':44} {f'broker, {args.devices} sim.':>20} {f'TCP, {args.tcp} agents':>18}  target")
    rows: List[Tuple[str, float, Optional[float], str]] = [
        ("every device online / listening (s)", mqtt["connect_all"], tcp["connect_all"], ""),
        ("controller connected, statuses in (s)", mqtt["controller_connect"], tcp["controller_connect"], ""),
        ("send_all(ping) wall (s)", mqtt["ping_wall"], tcp["ping_wall"],
         f"< 3 s: {'met' if mqtt['ping_wall'] < 3 else 'MISSED'}"),
        ("  controller CPU per device (ms)", mqtt["ping_cpu_per_device"] * 1000, tcp["ping_cpu_per_device"] * 1000,
         f"< 0.2: {'met' if mqtt['ping_cpu_per_device'] < 0.0002 else 'MISSED'}"),
        ("  broker / agents CPU per ping (ms)", mqtt["others_cpu_per_ping"] * 1000, tcp["others_cpu_per_ping"] * 1000,
         ""),
        ("all report a new desired release (s)", mqtt["converge"], None,
         f"< 10 s: {'met' if mqtt['converge'] < 10 else 'MISSED'}"),
    ]
    for label, broker_figure, tcp_figure, target in rows:
        tcp_text = f"{tcp_figure:18.3f}" if tcp_figure is not None else f"{'-':>18}"
        print(f"{label:44} {broker_figure:20.3f} {tcp_text}  {target}")
    print(f"broker: RSS {mqtt['broker_rss']:.0f} MiB with {args.devices} connections and their retained messages; "
          f"CPU {mqtt['broker_cpu']:.1f} s over the whole broker run")
    per_ping = mqtt["ping_cpu_per_device"] + mqtt["others_cpu_per_ping"] + mqtt["devices_cpu_per_ping"]
    print(f"bound: the controller, the broker and the simulated devices ({mqtt['devices_cpu_per_ping'] * 1000:.3f} ms "
          f"CPU per ping) share {cores} CPUs here, so a send_all(ping) to {args.devices} cannot take less than "
          f"their CPU per ping x devices / {cores} = {per_ping * args.devices / cores:.2f} s; on a fleet each "
          "device has its own CPU and the broker a machine of its own")


if __name__ == "__main__":
    sys.exit(main())
