"""The agent on a hostile LAN: its memory under 255 unfinished 4 MiB lines, and the operator's ping under lock-out.

Two attacks by a stranger without the token, each on a fresh agent process
(``python -m agent``, default limits), each printed beside its bound:

1. **Memory.** 255 connections each send 4 MiB of one request line and never
   finish it (then half-close, so the bench knows when the agent has read
   it all). Printed: the agent's RSS before, its peak during (``VmHWM``), the
   growth, and beside it the bound: the budget for unfinished lines
   (``--max-buffered-bytes``) plus each connection's 64 KiB read buffer.
2. **Lock-out.** 300 connections send half a line and stay; one more trickles
   a byte every 50 ms. Then the operator connects: the time to its first
   ``pong``, beside the same ping on a quiet agent (same run).

    python bench/hostile_lan.py [--rounds 3]

Targets: growth within the bound; the operator always gets in (the ratio is
printed; on a 2-CPU machine the attack's own traffic shares the CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.admission import DEFAULT_MAX_BUFFERED_BYTES  # noqa: E402
from agent.protocol import DEFAULT_MAX_LINE_BYTES, DEFAULT_READ_SIZE  # noqa: E402

MIB = 1024 * 1024
PING = b'{"command": "ping"}\n'


def memory(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def start_agent(root: Path) -> Tuple[subprocess.Popen, Tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--port", "0", "--root", str(root), "--log-level", "ERROR"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    host, port = proc.stdout.readline().split("listening on ", 1)[1].split()[0].rsplit(":", 1)
    return proc, (host, int(port))


async def ping_time(address) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(*address)
    writer.write(PING)
    line = await asyncio.wait_for(reader.readline(), 30)
    elapsed = time.perf_counter() - started
    writer.close()
    if b'"pong"' not in line:
        raise RuntimeError(f"the operator did not get in: {line!r}")
    return elapsed


async def connections_left(address) -> int:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b'{"command": "get_status"}\n')
    line = await reader.readline()
    writer.close()
    return int(line.split(b'"connections":', 1)[1].split(b",", 1)[0])


async def memory_attack(address, pid: int) -> Tuple[int, int]:
    """RSS before, peak RSS during 255 unfinished 4 MiB lines."""
    before = memory(pid, "VmRSS")
    line = b'{"command": "ping", "pad": "' + b"x" * (DEFAULT_MAX_LINE_BYTES - 100)
    writers = []

    async def one() -> None:
        _, writer = await asyncio.open_connection(*address)
        writers.append(writer)
        try:
            writer.write(line)
            await asyncio.wait_for(writer.drain(), 60)
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # closed by the agent: over its budget

    await asyncio.gather(*[one() for _ in range(255)])
    deadline = time.monotonic() + 60
    while await connections_left(address) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for writer in writers:
        writer.close()
    return before, memory(pid, "VmHWM")


async def lockout_attack(address) -> float:
    """The operator's first pong while 300 connections hold half a line and one trickles."""
    strangers = []
    for _ in range(300):
        _, writer = await asyncio.open_connection(*address)
        writer.write(b'{"command": "pi')
        strangers.append(writer)
    _, trickler = await asyncio.open_connection(*address)
    stop = asyncio.Event()

    async def trickle() -> None:
        while not stop.is_set():
            trickler.write(b" ")
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(trickle())
    try:
        return await ping_time(address)
    finally:
        stop.set()
        await task
        for writer in strangers + [trickler]:
            writer.close()


def run_round() -> Tuple[int, int, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_agent(Path(tmp) / "a")
        try:
            quiet = asyncio.run(ping_time(address))
            before, peak = asyncio.run(memory_attack(address, proc.pid))
        finally:
            proc.terminate()
            proc.wait(20)
        proc, address = start_agent(Path(tmp) / "b")
        try:
            asyncio.run(ping_time(address))  # warm, like the quiet one
            attacked = asyncio.run(lockout_attack(address))
        finally:
            proc.terminate()
            proc.wait(20)
    return before, peak, quiet, attacked


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, medians printed (default 3)")
    args = parser.parse_args(argv)
    rounds = [run_round() for _ in range(args.rounds)]
    growth = statistics.median(peak - before for before, peak, _, _ in rounds)
    bound = DEFAULT_MAX_BUFFERED_BYTES + 255 * DEFAULT_READ_SIZE
    quiet = statistics.median(r[2] for r in rounds)
    attacked = statistics.median(r[3] for r in rounds)
    print(f"hostile LAN bench: Python {sys.version.split()[0]}, {args.rounds} rounds, medians")
    print(f"memory, 255 unfinished {DEFAULT_MAX_LINE_BYTES // MIB} MiB lines: RSS {rounds[0][0] / MIB:.1f} MiB before, "
          f"peak growth {growth / MIB:.1f} MiB; bound {bound / MIB:.1f} MiB (budget {DEFAULT_MAX_BUFFERED_BYTES // MIB} "
          f"MiB + 255 x {DEFAULT_READ_SIZE // 1024} KiB read buffers) -> {'met' if growth <= bound else 'MISSED'}")
    print(f"operator's first pong: quiet {quiet * 1000:.1f} ms, under 300 half-open connections and a trickle "
          f"{attacked * 1000:.1f} ms ({attacked / quiet:.1f}x) -> got in every round")
    return 0 if growth <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
