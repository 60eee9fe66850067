"""pi-agent's launcher: runs the current agent bundle, and switches to a new one only once it is up.

    python3 launcher.py --bundle /opt/pi-agent/pi-agent.pyz --root /var/lib/pi-agent [pi-agent options]

The unit of the ``.deb`` runs this, and it runs the agent (a ``.pyz``) as its
child with the same options. An upgrade (``upgrade_agent``, ``agent/upgrade.py``)
stages the new bundle under ``ROOT/.state/agent/``, writes a trial record, and
exits with status 76. The launcher then follows the same record-then-confirm
rule that keeps handler pushes from bricking a device:

    trial.json      written by the agent, durably, before it exits: the bundle to try
    attempted       the launcher marks the record, durably, before it starts that bundle
    healthy         the new agent printed its listening line and is still up 2 s later:
                    ``current`` names the new bundle (atomically), the record goes
    not healthy     it is stopped, the record goes, and the previous bundle starts again
    killed between  a record found already marked ``attempted`` means the launcher died while
                    trying it: the previous bundle starts, and the failure is recorded

so at every moment one of the two agents is what the next start runs. Each
switch and failure is a line in ``ROOT/.state/agent/history.jsonl``. Standard
library only, and small on purpose: it is the one part an upgrade does not
replace.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

LAUNCHER_ENV = "PI_AGENT_LAUNCHER"  # set for the agent: it may stage upgrades
BUNDLE_ENV = "PI_AGENT_BUNDLE"  # the bundle the agent runs from, for get_status
EXIT_UPGRADE = 76  # the agent staged a new bundle: try it
HEALTH_TIMEOUT = 60.0  # seconds a new agent may take to print its listening line
SETTLE = 2.0  # and then stay up this long
LISTENING = "listening on"  # contract.LISTENING, repeated: this file runs alone, without the agent package


def state_folder(root: Path) -> Path:
    return root / ".state" / "agent"


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def write_durably(path: Path, text: str) -> None:
    """``path`` holds ``text`` afterwards, whole, even across a power cut (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def record(state: Path, event: str, bundle: str, reason: str = "") -> None:
    line = json.dumps({"time": time.time(), "event": event, "bundle": bundle, "reason": reason})
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "history.jsonl", "a") as out:
        out.write(line + "\n")
    print(f"pi-agent launcher: {event} {bundle}{': ' + reason if reason else ''}", flush=True)


def current_bundle(state: Path, shipped: Path) -> Path:
    try:
        named = Path((state / "current").read_text().strip())
    except OSError:
        return shipped
    return named if named.is_file() else shipped


class Child:
    """The running agent: started with the launcher's options, its output passed through."""

    def __init__(self, bundle: Path, agent_args: List[str]) -> None:
        env = {**os.environ, LAUNCHER_ENV: "1", BUNDLE_ENV: str(bundle)}
        self.process = subprocess.Popen([sys.executable, str(bundle), *agent_args], stdout=subprocess.PIPE, env=env)

    def wait_until_up(self) -> Tuple[bool, str]:
        """Its listening line within HEALTH_TIMEOUT, then still alive SETTLE seconds later."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT
        line = b""
        while LISTENING.encode() not in line:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return False, f"no listening line within {HEALTH_TIMEOUT:g} s"
            line = self.process.stdout.readline()
            if not line:
                return False, f"it exited with status {self.process.wait()} before listening"
        sys.stdout.write(line.decode("utf-8", "replace"))
        sys.stdout.flush()
        try:
            status = self.process.wait(SETTLE)
            return False, f"it exited with status {status} right after it started"
        except subprocess.TimeoutExpired:
            return True, ""

    def pass_output_through(self) -> None:
        def copy() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                sys.stdout.write(line.decode("utf-8", "replace"))
                sys.stdout.flush()
        threading.Thread(target=copy, daemon=True).start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def try_trial(state: Path, trial: Dict[str, Any], agent_args: List[str], signals: "Signals") -> Optional[Child]:
    """Start the staged bundle; the child if it came up (and is now current), else None (and recorded)."""
    bundle = str(trial.get("bundle"))
    if trial.get("attempted"):
        (state / "trial.json").unlink(missing_ok=True)
        record(state, "failed", bundle, "the launcher stopped while this agent was starting; the previous one runs")
        return None
    write_durably(state / "trial.json", json.dumps({**trial, "attempted": True}))
    child = Child(Path(bundle), agent_args)
    signals.child = child
    up, why = child.wait_until_up()
    if signals.stopping:  # told to stop while it started: the record stays marked, the next start decides
        child.stop()
        return None
    if up:
        write_durably(state / "current", bundle)
        (state / "trial.json").unlink(missing_ok=True)
        record(state, "switched", bundle)
        return child
    child.stop()
    (state / "trial.json").unlink(missing_ok=True)
    record(state, "failed", bundle, why)
    return None


class Signals:
    """SIGTERM and SIGINT: passed to the agent running now; and no new agent is started after one."""

    def __init__(self) -> None:
        self.stopping = False
        self.child: Optional[Child] = None
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)

    def _forward(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        child = self.child
        if child is not None and child.process.poll() is None:
            child.process.send_signal(signum)


def launch(shipped: Path, root: Path, agent_args: List[str]) -> int:
    state = state_folder(root)
    signals = Signals()
    while True:
        trial = read_json(state / "trial.json")
        child = try_trial(state, trial, agent_args, signals) if trial else None
        if signals.stopping:
            return 0
        if child is None:
            child = Child(current_bundle(state, shipped), agent_args)
            signals.child = child
        child.pass_output_through()
        status = child.process.wait()
        if status != EXIT_UPGRADE or signals.stopping:
            return status


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pi-agent-launcher", description=__doc__.split("\n\n")[0],
                                     epilog="Every other option is pi-agent's, passed on unchanged.")
    parser.add_argument("--bundle", required=True, type=Path, help="the agent bundle shipped with this install")
    parser.add_argument("--root", required=True, type=Path, help="the agent's --root (its state lives there)")
    args, agent_args = parser.parse_known_args(argv)
    return launch(args.bundle, args.root, ["--root", str(args.root), *agent_args])


if __name__ == "__main__":
    sys.exit(main())
