"""``fleet demo``: a real rollout to real agents on this machine, start to finish.

What it does, and says it does:

1. starts local agents (real ``pi-agent`` processes on 127.0.0.1, free ports,
   a temporary folder) and writes a devices.json for them, with one more
   device that is offline on purpose;
2. one agent carries a leftover module that already offers ``camera_status``,
   so that device refuses the push (a clash the agent names);
3. rolls ``handlers/camera_handlers.py`` out as release 1 (a state file in
   the same folder) with a canary, batches and a verify command, printing a
   line per device as results arrive, then the table;
4. runs the new commands across the fleet (with a stand-in recorder, because
   this machine has no camera);
5. brings the offline device up and runs ``fleet converge``: it gets the
   release it missed, devices already on it are skipped, and the one with
   the clash refuses again; then prints the status table;
6. stops every agent and removes the folder.

With ``--json`` the narration goes to stderr, and stdout carries one document
with every result: the rollout, each command's replies, the converge and the
status.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, TextIO, Tuple

from . import status_view, tables
from .converge import converge, deploy_targets, run_recorded
from .errors import ConfigError
from .fileset import read_handlers
from .fleet import Fleet
from .inventory import load_inventory
from .local import LocalAgents, free_port, install_stand_in_recorder
from .results import DeviceResult, Status
from .rollout import RolloutPlan, RolloutReport
from .state import StateStore

HANDLER = Path(__file__).resolve().parent.parent / "handlers" / "camera_handlers.py"
NAMES = ["raspi_main", "raspi_finish", "raspi_pit", "raspi_paddock", "raspi_grandstand", "raspi_tunnel"]
BROKEN = "raspi_pit"
OFFLINE = "raspi_offline"
LEFTOVER_MODULE = '''"""An old module left on this device: it already offers camera_status."""


def handle_camera_status(data):
    return {"success": True, "recording": False, "note": "old handler"}
'''


_narration: TextIO = sys.stdout  # stderr with --json, so that stdout is one JSON document


def say(text: str = "") -> None:
    print(text, file=_narration, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text}")


async def run_demo(agents: int = 4, as_json: bool = False) -> int:
    global _narration
    if agents < 3 or agents > len(NAMES):
        raise ConfigError(f"demo: --agents must be from 3 to {len(NAMES)}")
    if not HANDLER.exists():
        raise ConfigError(f"demo: {HANDLER} not found (run the demo from a checkout of the project)")
    _narration = sys.stderr if as_json else sys.stdout
    try:
        with tempfile.TemporaryDirectory(prefix="pifleet-demo-") as tmp:
            base = Path(tmp)
            with LocalAgents(base) as local:
                inventory_path = await asyncio.to_thread(_start_agents, local, base, agents)
                with StateStore(base / ".pifleet" / "state.db") as store:
                    code, document = await _rollout(inventory_path, store, local, base)
    finally:
        _narration = sys.stdout
    if as_json:
        json.dump(document, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return code


def _start_agents(local: LocalAgents, base: Path, count: int) -> Path:
    heading(f"Starting {count} local agents in {base}")
    bin_dir = base / "bin"
    install_stand_in_recorder(bin_dir)
    say("This machine has no camera: the agents find a stand-in rpicam-vid on their PATH that writes a\n"
        "growing file and stops on SIGINT, like the real one. On a Pi the handler finds the real recorder.")
    entries: List[Dict[str, object]] = []
    for device_id in NAMES[:count]:
        root = base / device_id
        if device_id == BROKEN:
            (root / "handlers").mkdir(parents=True, exist_ok=True)
            (root / "handlers" / "old_camera.py").write_text(LEFTOVER_MODULE)
        agent = local.start(device_id, env=_camera_env(base, device_id))
        note = " (has a leftover old_camera.py that offers camera_status)" if device_id == BROKEN else ""
        say(f"  {device_id:<16} pi-agent pid {agent.process.pid} on {agent.device.address}{note}")
        entries.append({"id": device_id, "name": device_id.replace("raspi_", "").title() + " camera",
                        "host": "127.0.0.1", "port": agent.device.port, "type": "camera", "tags": ["cams"]})
    offline_port = free_port()
    entries.append({"id": OFFLINE, "name": "Offline camera", "host": "127.0.0.1", "port": offline_port,
                    "type": "camera", "tags": ["cams"], "description": "nothing listens here: offline on purpose"})
    say(f"  {OFFLINE:<16} nothing listening on 127.0.0.1:{offline_port} (offline on purpose)")
    path = base / "devices.json"
    path.write_text(json.dumps({"defaults": {"timeout": 30}, "raspberryPiDevices": entries}, indent=2))
    say(f"Inventory written to {path}")
    return path


def _camera_env(base: Path, device_id: str) -> Dict[str, str]:
    """The stand-in recorder on PATH, and the device's own recordings folder."""
    return {"PATH": f"{base / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PI_AGENT_RECORDINGS": str(base / device_id / "recordings")}


async def _wait_for_footage(fleet: Fleet, ids: List[str]) -> Dict[str, DeviceResult]:
    """Poll camera_status until every recording has bytes on disk (a few tenths of a second)."""
    for _ in range(50):
        status = await fleet.send_all({"command": "camera_status"}, ids)
        if all((r.reply or {}).get("size_bytes") for r in status.values()):
            break
        await asyncio.sleep(0.1)
    return status


async def _catch_up(fleet: Fleet, store: StateStore, local: LocalAgents, base: Path, port: int, ids: List[str],
                    plan: RolloutPlan) -> RolloutReport:
    """The offline device starts, and ``fleet converge`` brings it to the release it missed."""
    heading(f"{OFFLINE} comes back online; fleet converge")
    await asyncio.to_thread(local.start, OFFLINE, env=_camera_env(base, OFFLINE), extra=["--port", str(port)])
    caught_up = await converge(fleet, store, ids, plan, on_result=_progress(len(ids)))
    assert caught_up.rollout is not None  # every device has a desired release since the deploy
    say()
    say(tables.rollout_table(list(caught_up.rollout.results.values())))
    say(f"{caught_up.rollout.tally()}: {OFFLINE} caught up; the devices already on the release were not pushed to")
    return caught_up.rollout


def _progress(total: int):
    done = [0]

    def report(result: DeviceResult) -> None:
        done[0] += 1
        say("  " + tables.progress_line(result, done[0], total))

    return report


async def _rollout(inventory_path: Path, store: StateStore, local: LocalAgents,
                   base: Path) -> Tuple[int, Dict[str, Any]]:
    inventory = load_inventory(inventory_path)
    ids = [d.id for d in inventory.devices]
    plan = RolloutPlan(canary=1, batch=2, max_failures=1, verify="camera_status")
    async with Fleet.from_inventory(inventory) as fleet:
        heading(f"fleet deploy {HANDLER.relative_to(HANDLER.parent.parent)} --canary 1 --batch 2 "
                "--max-failures 1 --verify camera_status")
        say(f"(the controller's state file: {store.path})")
        targets = deploy_targets(store, ids, read_handlers([HANDLER]), message="demo", author="fleet demo")
        report = await run_recorded(fleet, store, "deploy", targets, plan, on_result=_progress(len(ids)))
        say()
        say(tables.rollout_table(list(report.results.values())))
        say(f"{report.filename} (release {report.releases[0]}): {report.tally()}"
            + (f"; HALTED: {report.halt_reason}" if report.halted else ""))
        broken = report.results.get(BROKEN)
        if broken is not None and broken.status is Status.FAILED:
            say(f"{BROKEN} refused the push and kept running its old code: {broken.error}")
        say(f"{OFFLINE} was offline: release {report.releases[0]} is now its desired release, for when it returns.")

        live = [d for d, r in report.results.items() if r.status is Status.OK]
        heading(f"fleet send all start_recording duration=30 filename=demo.h264 (the {len(live)} updated devices)")
        started = await fleet.send_all({"command": "start_recording", "duration": 30, "filename": "demo.h264"}, live)
        say(tables.reply_table([started[d] for d in live]))
        heading("fleet send all camera_status (once every recording has written something)")
        status = await _wait_for_footage(fleet, live)
        say(tables.reply_table([status[d] for d in live], lambda r: (
            f"recording={r.get('recording')} elapsed={r.get('elapsed_seconds')}s size={r.get('size_bytes')} bytes "
            f"recorder={r.get('recorder')}")))
        heading("fleet send all stop_recording")
        stopped = await fleet.send_all({"command": "stop_recording"}, live)
        say(tables.reply_table([stopped[d] for d in live], lambda r: (
            f"{r.get('message')} with {r.get('stopped_with')}: {Path(r.get('last_file') or '-').name}, "
            f"{r.get('size_bytes')} bytes")))

        again = await _catch_up(fleet, store, local, base, inventory.get(OFFLINE).port, ids, plan)

        heading("fleet status")
        statuses, last = await fleet.status(ids)
        known, releases = store.release_index()
        places = status_view.standings(inventory.devices, statuses, store.desired(ids), known, releases)
        say(status_view.status_table(inventory.devices, statuses, last, places, wide=True))
    document = {
        "rollout": report.as_dict(),
        "start_recording": [started[d].as_dict() for d in live],
        "camera_status": [status[d].as_dict() for d in live],
        "stop_recording": [stopped[d].as_dict() for d in live],
        "converge": again.as_dict(),
        "status": status_view.status_document(inventory.devices, statuses, last, places),
    }
    heading("Stopping the agents and removing the demo folder")
    say("Next: run agents on your Pis (README: 'Installing the agent on a Pi'), list them in devices.json,\n"
        "and run `fleet status`, `fleet deploy` and `fleet converge --watch`.")
    expected = (report.results[ids[0]].status is Status.OK and report.results[OFFLINE].status is Status.UNREACHABLE
                and all(r.status is Status.OK for r in started.values())
                and again.results[OFFLINE].status is Status.OK)
    return (0 if expected else 1), document
