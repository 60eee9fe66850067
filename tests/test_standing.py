"""Where a device stands against its desired release: pure functions of its status and the store's releases."""

import time

import pytest

from fleet.inventory import Device
from fleet.results import DeviceResult, Status
from fleet.standing import count, reported_release, standing
from fleet.status_view import standings, status_table

# Three releases of two files: a.py moves 1 -> 2 -> 2, b.py 1 -> 1 -> 3.
RELEASES = {1: {"a.py": "a1", "b.py": "b1"}, 2: {"a.py": "a2", "b.py": "b1"}, 3: {"a.py": "a2", "b.py": "b3"}}
KNOWN = {}
for _number, _files in RELEASES.items():
    for _name, _sha in _files.items():
        KNOWN.setdefault((_name, _sha), set()).add(_number)


def modules(**versions):
    return [{"file": f"{name}.py", "sha256": sha, "release": None} for name, sha in versions.items()]


@pytest.mark.parametrize("desired, running, expected", [
    (2, modules(a="a2", b="b1"), ("current", 2)),
    (2, modules(a="a2", b="b1", extra="x"), ("current", 2)),  # files the release does not name do not count
    (3, modules(a="a2", b="b1"), ("behind", 2)),
    (3, modules(a="a1"), ("behind", None)),  # b.py missing: not there yet
    (1, modules(a="a2", b="b3"), ("ahead", 3)),
    (2, modules(a="a9", b="b1"), ("diverged", None)),  # a version no release holds
    (2, modules(a="a1", b="b3"), ("diverged", None)),  # one file older, one newer
    (None, modules(a="a1", b="b1"), ("unmanaged", 1)),
    (2, None, ("unreachable", None)),
])
def test_states(desired, running, expected):
    place = standing(desired, RELEASES.get(desired, {}), running, KNOWN, RELEASES)
    assert (place.state, place.reported_release) == expected


def test_a_version_held_by_releases_on_both_sides_goes_by_the_release_the_device_names():
    # a2 is in releases 2 and 3. Wanting release 1, a device that says its a2 came with release 2 is ahead
    # either way; wanting 3 with b1 (releases 1, 2), its own word "release 1" makes it behind.
    running = [{"file": "a.py", "sha256": "a2", "release": 3}, {"file": "b.py", "sha256": "b1", "release": 1}]
    assert standing(3, RELEASES[3], running, KNOWN, RELEASES).state == "behind"
    assert standing(1, RELEASES[1], running, KNOWN, RELEASES).state == "ahead"


def test_a_device_a_controller_never_saw_reports_the_release_its_agent_names():
    running = {"x.py": {"file": "x.py", "sha256": "unknown", "release": 7}}
    assert reported_release(running, RELEASES, KNOWN) == 7
    assert reported_release({}, RELEASES, KNOWN) is None


def test_counts_come_in_a_fixed_order():
    places = [standing(2, RELEASES[2], m, KNOWN, RELEASES) for m in (None, modules(a="a2", b="b1"), None)]
    assert count(places) == [("current", 1), ("unreachable", 2)]


def test_the_status_table_fits_120_columns_with_long_names_and_says_what_it_counts():
    devices = [Device(id=f"raspi_finish_line{i}", host=f"192.168.100.{i}", port=3000, type="camera")
               for i in range(3)]
    reply = {"agent_version": "0.1.0", "uptime_seconds": 99999, "command_count": 14,
             "modules": modules(a="a2", b="b1", camera_handlers="c" * 64)}
    statuses = {d.id: DeviceResult(d.id, Status.OK, reply=reply) for d in devices[:2]}
    statuses[devices[2].id] = DeviceResult(devices[2].id, Status.UNREACHABLE, error="connection refused")
    last = {d.id: {"action": "auto_rollback", "file": "camera_handlers.py", "time": time.time() - 30 * 3600} for d in devices}
    places = standings(devices, statuses, {d.id: 2 for d in devices}, KNOWN, RELEASES)
    table = status_table(devices, statuses, last, places)
    rows = table.split("\n\n")[0].splitlines()
    assert max(len(row) for row in rows) <= 120, table
    assert "desired: release it should run; runs: release it runs; commands: how many it offers" in table
    assert "2 current, 1 unreachable" in table
    wide = status_table(devices, statuses, last, places, wide=True)
    assert "camera_handlers.py" in wide.splitlines()[0] and "192.168.100.0:3000" in wide


def test_an_agent_version_that_differs_from_most_of_the_fleet_is_called_out():
    devices = [Device(id=f"d{i}", host="127.0.0.1", port=3000 + i) for i in range(3)]
    statuses = {d.id: DeviceResult(d.id, Status.OK, reply={"agent_version": "0.2.0" if d.id != "d2" else "0.1.0",
                                                          "modules": []}) for d in devices}
    places = standings(devices, statuses, {}, KNOWN, RELEASES)
    table = status_table(devices, statuses, {}, places)
    assert "d2: * agent 0.1.0; most devices run 0.2.0 (`fleet agent upgrade`)" in table
    assert "d0: * agent" not in table
