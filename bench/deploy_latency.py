"""How long a safe deploy takes, beside the cost of starting a bare Python.

Deploys the seed's camera handler (Step 1 of the user's document) to a real
agent on loopback, again and again (each push differs by a trailing comment,
so none is an ``unchanged`` no-op), and prints the median and p95 of the
``update_handler`` round trip. In the same run it times ``python3 -c pass``
and ``python3 -I -S -c pass``: an in-process import is roughly what the
unsafe design cost, and starting a fresh interpreter per import test is what
a naive safe design would cost.

    python bench/deploy_latency.py [--deploys 60] [--starts 40]

Every deploy runs its import test in the box (namespaces, read-only
filesystem, unprivileged user where the agent is root); the bench prints
which of the box's protections were active while it measured.

Then the same pushes, signed (``fleet keys``), to a second agent that runs
only signed code (``--trusted-keys``), interleaved with unsigned pushes to the
first: the signature's cost on the device is its Ed25519 check and keeping it.

Targets: median deploy <= 2 x one bare ``python3 -I -S -c pass``; a signed
push <= 1.2 x an unsigned one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Tuple

REPO = Path(__file__).resolve().parent.parent
SEED_CAMERA = REPO / "tests" / "fixtures" / "seed_camera_step1.py"


def percentile(values: List[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def time_command(command: List[str], runs: int) -> List[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True)
        times.append(time.perf_counter() - started)
    return times


async def box_protections(address) -> str:
    """The protections the agent's import-test box had while the bench ran (from ``get_status``)."""
    reader, writer = await asyncio.open_connection(*address, limit=16 * 1024 * 1024)
    try:
        writer.write(b'{"command": "get_status"}\n')
        isolation = json.loads(await reader.readline()).get("isolation") or {}
    finally:
        writer.close()
    missing = ", ".join(sorted(isolation.get("missing", {}))) or "none"
    return f"box: {', '.join(sorted(isolation.get('active', {}))) or 'none'} (missing: {missing})"


async def time_deploys(address, code: str, deploys: int, key: Any = None, tag: str = "") -> List[float]:
    """Round trips of ``deploys`` pushes (each a new version); with ``key``, each signed (before the clock starts)."""
    reader, writer = await asyncio.open_connection(*address, limit=16 * 1024 * 1024)
    times = []
    try:
        for n in range(deploys + 2):  # two warm-up pushes: the first one starts the import helper
            request = {"command": "update_handler", "filename": "camera_handlers.py",
                       "code": f"{code}\n# push {tag}{n}\n", "probation": False}
            if key is not None:
                digest = hashlib.sha256(request["code"].encode()).hexdigest()
                request.update(signature=key.sign("camera_handlers.py", digest), key_id=key.key_id)
            started = time.perf_counter()
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readline())
            elapsed = time.perf_counter() - started
            if not reply.get("success") or reply.get("unchanged"):
                raise RuntimeError(f"deploy failed: {reply}")
            if n >= 2:
                times.append(elapsed)
    finally:
        writer.close()
    return times


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deploys", type=int, default=60, help="timed deploys (default 60)")
    parser.add_argument("--starts", type=int, default=40, help="timed interpreter starts of each kind (default 40)")
    args = parser.parse_args(argv)
    code = SEED_CAMERA.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        key, trusted = signing_key(Path(tmp))
        proc, address = start_agent(Path(tmp) / "root")
        signed_proc, signed_address = start_agent(Path(tmp) / "signed-root", "--trusted-keys", str(trusted))
        try:
            # Interleave the measurements in slices so machine noise hits all of them alike.
            deploys: List[float] = []
            signed: List[float] = []
            plain: List[float] = []
            isolated: List[float] = []
            slices = 4
            for number in range(slices):
                deploys += asyncio.run(time_deploys(address, code, args.deploys // slices, tag=f"{number}."))
                signed += asyncio.run(time_deploys(signed_address, code, args.deploys // slices, key, f"{number}."))
                plain += time_command([sys.executable, "-c", "pass"], args.starts // slices)
                isolated += time_command([sys.executable, "-I", "-S", "-c", "pass"], args.starts // slices)
            protections = asyncio.run(box_protections(address))
        finally:
            for running in (proc, signed_proc):
                running.terminate()
                running.wait(timeout=20)
    bare = statistics.median(isolated)
    print(f"deploy latency bench: seed camera handler ({len(code)} bytes), Python {sys.version.split()[0]}, "
          f"{len(deploys)} deploys, {len(plain)} + {len(isolated)} interpreter starts")
    print(protections)
    print(f"{'measure':40} {'median ms':>10} {'p95 ms':>8} {'x bare -I -S':>13}")
    for label, values in (
        ("update_handler round trip", deploys),
        ("python3 -c pass", plain),
        ("python3 -I -S -c pass", isolated),
    ):
        median = statistics.median(values)
        print(f"{label:40} {median * 1000:10.1f} {percentile(values, 0.95) * 1000:8.1f} {median / bare:13.2f}")
    ratio = statistics.median(deploys) / bare
    print(f"target: median deploy <= 2.00 x bare python3 -I -S: {ratio:.2f} -> {'met' if ratio <= 2 else 'MISSED'}")
    unsigned = statistics.median(deploys)
    print(f"{'signed update_handler round trip':40} {statistics.median(signed) * 1000:10.1f} "
          f"{percentile(signed, 0.95) * 1000:8.1f} {statistics.median(signed) / bare:13.2f}")
    signed_ratio = statistics.median(signed) / unsigned
    print(f"target: signed push <= 1.20 x unsigned: {signed_ratio:.2f} -> {'met' if signed_ratio <= 1.2 else 'MISSED'}")
    return 0


def start_agent(root: Path, *extra: str) -> Tuple[subprocess.Popen, Tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--port", "0", "--root", str(root), "--log-level",
                             "WARNING", *extra], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    host, port = proc.stdout.readline().split("listening on ", 1)[1].split()[0].rsplit(":", 1)
    return proc, (host, int(port))


def signing_key(folder: Path) -> Tuple[Any, Path]:
    """A release key (``fleet keys``), and a trusted-keys folder with its public half."""
    sys.path.insert(0, str(REPO))
    from fleet.keys import init_key, load_key

    private, public, _ = init_key(folder / "keys")
    trusted = folder / "trusted"
    trusted.mkdir()
    (trusted / "release.pub").write_bytes(public.read_bytes())
    return load_key(private), trusted


if __name__ == "__main__":
    sys.exit(main())
