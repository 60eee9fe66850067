"""Fleet memory over real agent processes: desired releases, converge (once and --watch), rollback to a release,
multi-file releases, and a controller killed mid-rollout."""

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, sha
from fleet.cli import main
from fleet.local import free_port
from fleet.state import StateStore

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = V1.replace("VERSION = 1", "VERSION = 2")
V3 = V1.replace("VERSION = 1", "VERSION = 3")
C1 = "def handle_cam(data):\n    return {'cam': 1}\n"
C2 = C1.replace("'cam': 1", "'cam': 2")


def write_inventory(tmp_path, agents, online=("d0", "d1"), late=()):
    """devices.json with agents started now (``online``) and devices that start later (``late``: fixed ports)."""
    entries = [{"id": d, "host": "127.0.0.1", "port": agents.start(d).device.port} for d in online]
    entries += [{"id": d, "host": "127.0.0.1", "port": free_port()} for d in late]
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"defaults": {"timeout": 20, "connect_timeout": 2}, "raspberryPiDevices": entries}))
    return path, {e["id"]: e["port"] for e in entries}


def start_late(agents, device_id, port):
    return agents.start(device_id, extra=["--port", str(port)])


def handler(tmp_path, code, name="ver.py"):
    folder = tmp_path / sha(code)[:8]
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(code)
    return str(folder / name)


def fleet_json(devices, *argv, capsys):
    capsys.readouterr()
    code = main(["-d", str(devices), *argv, "--json"])
    return code, json.loads(capsys.readouterr()[0])


def running(devices, capsys, command="version"):
    """Each device's reply to ``command``."""
    _, document = fleet_json(devices, "send", "all", command, capsys=capsys)
    return {d["device"]: {k: v for k, v in (d["reply"] or {}).items() if k not in ("success", "timestamp", "id")}
            for d in document["devices"]}


def states(devices, capsys):
    _, document = fleet_json(devices, "status", capsys=capsys)
    return {d["device"]: (d["desired_release"], d["reported_release"], d["state"]) for d in document["devices"]}


def pushes(agents, device_id, filename="ver.py"):
    """How many times a version of ``filename`` was deployed to the device (its update log)."""
    log = agents.agents[device_id].root / ".state" / "update_log.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [e["version"] for e in entries if e["action"] == "deploy" and e["file"] == filename]


def test_a_device_offline_during_a_deploy_gets_the_release_from_converge(tmp_path, agents, capsys):
    devices, ports = write_inventory(tmp_path, agents, late=["late"])
    code, report = fleet_json(devices, "deploy", handler(tmp_path, V1), capsys=capsys)
    assert code == 1 and report["counts"] == {"OK": 2, "UNREACHABLE": 1} and report["release"] == 1
    assert states(devices, capsys)["late"] == (1, None, "unreachable")  # it should run release 1 when it returns

    start_late(agents, "late", ports["late"])
    assert states(devices, capsys)["late"] == (1, None, "behind")
    code, converged = fleet_json(devices, "converge", capsys=capsys)
    assert code == 0
    assert {d["device"]: d["status"] for d in converged["devices"]} == {"d0": "SKIPPED", "d1": "SKIPPED", "late": "OK"}
    assert running(devices, capsys) == {d: {"version": 1} for d in ("d0", "d1", "late")}
    assert set(states(devices, capsys).values()) == {(1, 1, "current")}
    assert [len(pushes(agents, d)) for d in ("d0", "d1", "late")] == [1, 1, 1]  # nobody got it twice
    _, history = fleet_json(devices, "history", capsys=capsys)
    assert (history["rollouts"][0]["kind"], history["rollouts"][0]["results"]) == \
        ("converge", {"d0": "SKIPPED", "d1": "SKIPPED", "late": "OK"})


def test_converge_watch_brings_a_device_up_when_it_comes_back_and_stops_on_sigterm(tmp_path, agents, capsys):
    devices, ports = write_inventory(tmp_path, agents, online=["d0"], late=["late"])
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2)]) == 1  # late is offline
    watch = subprocess.Popen([sys.executable, "-m", "fleet", "-d", str(devices), "converge", "--watch",
                              "--retry-every", "0.2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    printed = StderrLines(watch)
    try:
        assert "watching 2 device(s), 2 with a desired release, 1 online" in printed.until("watching")
        start_late(agents, "late", ports["late"])  # nobody runs a command: the watch sees it come online
        line = printed.until(" late ")
        assert re.search(rf"late\s+OK\s+- -> {sha(V2)[:8]}\s+deployed", line), line
        assert running(devices, capsys)["late"] == {"version": 2}
        # Another controller sets d0's desired release without pushing (its rollout was stopped, say):
        # the watch sees the store change and converges d0 by itself.
        _, made = fleet_json(devices, "release", "create", handler(tmp_path, V3), "-m", "three", capsys=capsys)
        with StateStore(tmp_path / ".pifleet" / "state.db") as store:
            store.set_desired({"d0": made["release"]["number"]})
        line = printed.until(" d0 ")
        assert re.search(rf"d0\s+OK\s+{sha(V2)[:8]} -> {sha(V3)[:8]}\s+deployed", line), line
    finally:
        watch.send_signal(signal.SIGTERM)
        err = printed.rest()
    assert watch.returncode == 0 and "fleet: stopped" in err and "Traceback" not in err
    assert pushes(agents, "d0") == [sha(V2), sha(V3)]  # d0 was current until its desired release changed


class StderrLines:
    """The stderr lines of a process, read as it prints them (a thread feeds a queue, so a wait has a limit)."""

    def __init__(self, process):
        self.process = process
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, words, limit=60.0):
        """The next line that holds ``words``."""
        deadline = time.monotonic() + limit
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {words!r} within {limit} s") from None
            if line is None:
                raise AssertionError(f"the process ended before printing {words!r}")
            if words in line:
                return line

    def rest(self):
        """Everything else it printed, once it has ended."""
        self.process.wait(timeout=60)
        self.reader.join(timeout=60)
        self.process.stderr.close()
        lines = []
        while (line := self.lines.get(timeout=60)) is not None:
            lines.append(line)
        return "".join(lines)


def test_rollback_to_a_release_puts_every_device_on_exactly_its_versions(tmp_path, agents, capsys):
    devices, ports = write_inventory(tmp_path, agents, online=["d0", "d1", "d2", "late"])
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V1), handler(tmp_path, C1, "cam.py")]) == 0  # 1
    agents.stop("late")
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2)]) == 1  # release 2: V2 + C1; late is offline
    assert main(["-d", str(devices), "deploy", handler(tmp_path, C2, "cam.py")]) == 1  # release 3: V2 + C2
    assert main(["-d", str(devices), "rollback", "cam.py", "--only", "d1"]) == 0  # by hand: d1 back on C1
    start_late(agents, "late", ports["late"])  # still on release 1
    _, shown = fleet_json(devices, "release", "show", "2", capsys=capsys)
    assert shown["release"]["files"] == {"cam.py": sha(C1), "ver.py": sha(V2)}

    code, report = fleet_json(devices, "rollback", "--to-release", "2", capsys=capsys)
    assert code == 0, report
    by_device = {d["device"]: d for d in report["devices"]}
    assert by_device["d1"]["status"] == "SKIPPED"  # already exactly release 2 after the hand rollback
    assert by_device["late"]["files"] == {"ver.py": {"old_version": sha(V1), "new_version": sha(V2)}}  # up
    assert by_device["d0"]["files"] == {"cam.py": {"old_version": sha(C2), "new_version": sha(C1)}}  # down
    assert running(devices, capsys) == {d: {"version": 2} for d in ("d0", "d1", "d2", "late")}
    assert running(devices, capsys, "cam") == {d: {"cam": 1} for d in ("d0", "d1", "d2", "late")}
    assert set(states(devices, capsys).values()) == {(2, 2, "current")}


def test_status_says_current_behind_ahead_and_diverged(tmp_path, agents, capsys):
    devices, _ = write_inventory(tmp_path, agents, online=["d0", "d1", "d2", "d3"])
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V1)]) == 0  # release 1
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2)]) == 0  # release 2
    assert main(["-d", str(devices), "rollback", "ver.py", "--only", "d1"]) == 0  # runs release 1's version
    assert main(["-d", str(devices), "rollback", "--to-release", "1", "--only", "d2"]) == 0
    assert main(["-d", str(devices), "send", "d2", "update_handler", "filename=ver.py", f"code={json.dumps(V2)}"]) == 0
    assert main(["-d", str(devices), "send", "d3", "update_handler", "filename=ver.py", f"code={json.dumps(V3)}"]) == 0
    assert states(devices, capsys) == {"d0": (2, 2, "current"), "d1": (2, 1, "behind"), "d2": (1, 2, "ahead"),
                                       "d3": (2, None, "diverged")}
    capsys.readouterr()
    assert main(["-d", str(devices), "status"]) == 0
    out = capsys.readouterr()[0]
    assert "4 device(s): 1 current, 1 behind, 1 ahead, 1 diverged" in out
    assert "d3: diverged from its desired release 2: ver.py differs" in out and "d2: ahead of its desired release 1" in out
    assert max(len(line) for line in out.split("\n\n")[0].splitlines()) <= 120


def test_a_two_file_release_that_fails_on_one_device_puts_it_back_on_its_previous_release(tmp_path, agents, capsys):
    devices, _ = write_inventory(tmp_path, agents)
    a1, b1 = "def handle_a(d):\n    return {'a': 1}\n", "def handle_b(d):\n    return {'b': 1}\n"
    a2, b2 = a1.replace("1", "2"), b1.replace("1}", "2}") + "\ndef handle_bee(d):\n    return {}\n"
    assert main(["-d", str(devices), "deploy", handler(tmp_path, a1, "a.py"), handler(tmp_path, b1, "b.py")]) == 0
    # On d1 another module already offers 'bee': b.py's new version is refused there, after a.py went through.
    assert main(["-d", str(devices), "send", "d1", "update_handler", "filename=clash.py",
                 f"code={json.dumps('def handle_bee(d):' + chr(10) + '    return {}' + chr(10))}"]) == 0
    code, report = fleet_json(devices, "deploy", handler(tmp_path, a2, "a.py"), handler(tmp_path, b2, "b.py"),
                              capsys=capsys)
    by_device = {d["device"]: d for d in report["devices"]}
    assert code == 1 and by_device["d0"]["status"] == "OK" and by_device["d1"]["status"] == "FAILED"
    assert "put back on its previous release: a.py: rolled back to" in by_device["d1"]["note"], by_device["d1"]
    assert running(devices, capsys, "a") == {"d0": {"a": 2}, "d1": {"a": 1}}
    assert running(devices, capsys, "b") == {"d0": {"b": 2}, "d1": {"b": 1}}
    assert states(devices, capsys) == {"d0": (2, 2, "current"), "d1": (2, 1, "behind")}


def test_the_preflight_unreachable_limit_changes_nothing_desired_state_included(tmp_path, agents, capsys):
    devices, _ = write_inventory(tmp_path, agents, late=["off"])
    code, report = fleet_json(devices, "deploy", handler(tmp_path, V1), "--max-unreachable", "0", capsys=capsys)
    assert code == 1 and report["halted"] and report["counts"] == {"SKIPPED": 2, "UNREACHABLE": 1}
    assert set(states(devices, capsys).values()) == {(None, None, "unmanaged"), (None, None, "unreachable")}
    _, history = fleet_json(devices, "history", capsys=capsys)
    assert history["rollouts"][0]["outcome"].startswith("halted: 1 device(s) unreachable")


HOLD = ("import os, time\n\nVERSION = {v}\n\ndef handle_version(data):\n    return {{'version': VERSION}}\n\n"
        "def handle_hold(data):\n"
        "    hold = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'hold')\n"
        "    while os.path.exists(hold):  # this device's verify waits while its folder has a file named hold\n"
        "        time.sleep(0.05)\n"
        "    return {{}}\n")


@pytest.mark.parametrize("held", ["d0", "d1", "d2"])
def test_a_controller_killed_mid_rollout_leaves_a_consistent_store_and_converge_finishes_it(
        tmp_path, agents, capsys, held):
    devices, _ = write_inventory(tmp_path, agents, online=["d0", "d1", "d2"])
    assert main(["-d", str(devices), "deploy", handler(tmp_path, HOLD.format(v=1))]) == 0  # release 1
    (agents.agents[held].root / "hold").touch()
    new = handler(tmp_path, HOLD.format(v=2))
    deploy = subprocess.Popen([sys.executable, "-m", "fleet", "-d", str(devices), "deploy", new, "--canary", "1",
                               "--batch", "1", "--verify", "hold"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    printed = StderrLines(deploy)
    try:
        printed.until("rolling out")
        live = agents.agents[held].root / "handlers" / "ver.py"
        deadline = time.monotonic() + 60
        while "VERSION = 2" not in live.read_text():  # the held device has the push: its verify is waiting
            assert time.monotonic() < deadline, "the push never reached the held device"
            time.sleep(0.02)
    finally:
        deploy.kill()
        printed.rest()
    order = ["d0", "d1", "d2"]
    done, reached = order[:order.index(held)], order[:order.index(held) + 1]

    _, history = fleet_json(devices, "history", capsys=capsys)
    killed = history["rollouts"][0]
    assert killed["outcome"] is None and killed["running"] is False
    assert killed["results"] == {d: "OK" for d in done}  # every finished device, nothing more
    expected = {d: (2, 2, "current") if d in reached else (1, 1, "current") for d in order}
    assert states(devices, capsys) == expected  # each wave's desired release was set before it was pushed

    (agents.agents[held].root / "hold").unlink()
    code, converged = fleet_json(devices, "converge", capsys=capsys)
    assert code == 0
    assert {d["device"]: d["status"] for d in converged["devices"]} == \
        {d: "SKIPPED" if d in reached else "OK" for d in order}
    assert set(states(devices, capsys).values()) == {(2, 2, "current")}
    assert all(len(pushes(agents, d)) == 2 for d in order)  # release 1, then release 2 once: never twice
    _, history = fleet_json(devices, "history", capsys=capsys)
    assert history["rollouts"][1]["outcome"] == "interrupted; finished by fleet converge"


def test_rollback_needs_a_file_or_a_release_not_both(tmp_path, agents, capsys):
    devices, _ = write_inventory(tmp_path, agents, online=["d0"])
    assert main(["-d", str(devices), "rollback"]) == 2
    assert main(["-d", str(devices), "rollback", "ver.py", "--to-release", "1"]) == 2
    assert "give a handler file" in capsys.readouterr()[1]
    assert main(["-d", str(devices), "rollback", "--to-release", "7"]) == 2
    assert "there is no release 7" in capsys.readouterr()[1]


def test_the_store_is_beside_the_inventory_and_says_so(tmp_path, agents, capsys):
    devices, _ = write_inventory(tmp_path, agents, online=["d0"])
    assert main(["-d", str(devices), "status"]) == 0
    assert f"state {tmp_path / '.pifleet' / 'state.db'}" in capsys.readouterr()[1]
    assert not (tmp_path / ".pifleet" / "state.db").exists()  # status reads the state; it never makes one
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V1)]) == 0
    assert (tmp_path / ".pifleet" / "state.db").exists()
