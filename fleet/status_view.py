"""The status table (``fleet status``): where each device stands, in a 120-column terminal.

One row per device: its desired release, the release it reports, its state
(``standing``), its agent, uptime, how many commands it offers, and its last
change. Everything else goes under the table, each line
naming its device: files that drift from what most devices of the same type
run, files that differ from the desired release, why a device did not answer,
and what its agent found by itself. ``--wide`` adds each device's address and
a column per handler file with its version.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

from .inventory import Device
from .results import DeviceResult, Status, short
from .standing import CURRENT, REFUSED, UNREACHABLE, Known, Standing, count, standing
from .tables import DRIFT_MARK, LOW_DISK_SHARE, ago, duration
from .text import grid, lines

LEGEND = "desired: release it should run; runs: release it runs; commands: how many it offers (agent's and handlers')"


def _running(result: DeviceResult) -> Dict[str, str]:
    """``{handler file: sha256}`` of what a device said it runs."""
    return {module["file"]: module["sha256"] for module in (result.reply or {}).get("modules", [])}


def _failed_to_load(result: DeviceResult) -> Set[str]:
    """Handler files a device has but could not load."""
    return {module["file"] for module in (result.reply or {}).get("failed_modules", [])}


def _findings(reply: Dict[str, Any]) -> List[str]:
    """What an agent found by itself and a person should know: files changed behind its back, versions
    it quarantined, code that probation rolled back (the newest time per file), and storage that is
    nearly full."""
    found = [str(finding.get("detail")) for finding in reply.get("integrity", [])]
    for entry in reply.get("quarantine", []):  # each version once: a finding at start may already name it
        version = str(entry.get("version"))
        if not any(version[:12] in line for line in found):
            found.append(f"{entry.get('file')} at {short(version)} is quarantined ({ago(entry.get('time'))}): "
                         f"{entry.get('reason')}; the agent will not load it again unless pushed with --force")
    newest = {record.get("file"): record for record in reply.get("auto_rollbacks", [])}  # oldest first
    for file, record in newest.items():
        found.append(f"{file} was rolled back automatically {ago(record.get('time'))}: {record.get('reason')}")
    disk = reply.get("disk") or {}
    free, total = disk.get("free_bytes"), disk.get("total_bytes")
    if isinstance(free, int) and isinstance(total, int) and total > 0 and free < total * LOW_DISK_SHARE:
        found.append(f"only {size(free)} free of {size(total)} ({free * 100 // total}%) on the agent's storage: "
                     "deploys (and recordings) fail once it is full")
    return found


def size(count: int) -> str:
    """Storage sizes for people: ``120 MiB``, ``1.1 GiB``."""
    if count < 1024 ** 3:
        return f"{count / 1024 ** 2:.0f} MiB"
    return f"{count / 1024 ** 3:.1f} GiB"


def drifted(devices: Sequence[Device], statuses: Dict[str, DeviceResult]) -> Dict[str, List[str]]:
    """``{device_id: [handler files on which it differs from most devices of its type]}``.

    Only devices that answered count. A missing file counts as a version of its
    own: a device that lacks a handler its peers run, or runs one they do not,
    is as far off as one on an old version. Devices are compared with others of
    the same ``type``, because a sensor need not run the camera's handlers. When
    devices are split evenly there is no majority to follow, and every one of
    them is marked rather than an arbitrary half.
    """
    peers_by_type: Dict[str, Dict[str, Dict[str, str]]] = {}
    for device in devices:
        result = statuses.get(device.id)
        if result is not None and result.status is Status.OK:
            peers_by_type.setdefault(device.type, {})[device.id] = _running(result)
    out: Dict[str, List[str]] = {}
    for peers in peers_by_type.values():
        for file in sorted({file for running in peers.values() for file in running}):
            counts = Counter(running.get(file) for running in peers.values()).most_common(2)
            split = len(counts) == 2 and counts[0][1] == counts[1][1]
            for device_id, running in peers.items():
                if split or running.get(file) != counts[0][0]:
                    out.setdefault(device_id, []).append(file)
    return out


def agent_drift(devices: Sequence[Device], statuses: Dict[str, DeviceResult]) -> Dict[str, str]:
    """``{device_id: what most of the fleet's agents run}`` for devices whose agent version differs from most
    (all of them when they split evenly): drift in agents, shown like drift in handlers."""
    versions = {d.id: str((statuses[d.id].reply or {}).get("agent_version")) for d in devices
                if statuses[d.id].status is Status.OK}
    counts = Counter(versions.values()).most_common(2)
    if len(counts) < 2:
        return {}
    split = counts[0][1] == counts[1][1]
    return {device_id: counts[0][0] for device_id, version in versions.items() if split or version != counts[0][0]}


def status_table(devices: Sequence[Device], statuses: Dict[str, DeviceResult],
                 last_changes: Dict[str, Optional[Dict[str, Any]]], standings: Dict[str, Standing],
                 wide: bool = False, reports: Optional[Mapping[str, Dict[str, Any]]] = None) -> str:
    """``reports``: what offline devices behind a broker last reported there (``Fleet.last_reports``)."""
    drift = drifted(devices, statuses)
    files = sorted({file for result in statuses.values() if result.status is Status.OK
                    for file in {*_running(result), *_failed_to_load(result)}}) if wide else []
    headers = ["device", *(["name", "address"] if wide else []), "desired", "runs", "state", "agent", "up",
               "commands", *files, "last change, age"]
    rows = []
    notes: List[str] = []  # under the table, each naming its device
    agents = agent_drift(devices, statuses)
    for device in devices:
        result, place = statuses[device.id], standings[device.id]
        reply = result.reply or {}
        where = [device.label, device.address] if wide else []
        stands = [str(place.desired_release or "-"), str(place.reported_release or "-"), place.state]
        if result.status is not Status.OK:
            rows.append([device.id, *where, *stands, "-", "-", "-", *["-" for _ in files], "-"])
            notes.append(f"{device.id}: {result.error}")
            if reports and device.id in reports:
                notes.append(f"{device.id}: {last_report(reports[device.id])}")
            continue
        notes.extend(_notes(device, reply, place, drift.get(device.id, [])))
        if device.id in agents:
            notes.append(f"{device.id}: {DRIFT_MARK} agent {reply.get('agent_version')}; most devices run "
                         f"{agents[device.id]} (`fleet agent upgrade`)")
        running, failed = _running(result), _failed_to_load(result)
        cells = ["LOAD FAILED" if f in failed else short(running.get(f)) + (f" {DRIFT_MARK}" if f in drift.get(
            device.id, ()) else "") for f in files]
        change = last_changes.get(device.id)
        last = f"{change['action']} {change['file']} {ago(change.get('time'))[:-len(' ago')]}" if change else "-"
        rows.append([device.id, *where, *stands, reply.get("agent_version", "?"), duration(reply.get("uptime_seconds")),
                     reply.get("command_count", "-"), *cells, last])
    summary = ", ".join(f"{n} {state}" for state, n in count(standings[d.id] for d in devices))
    text = grid(rows, headers) + "\n" + lines(
        [f"{len(devices)} device(s): {summary}", LEGEND]
        + [f"{DRIFT_MARK} drift: differs from most devices of the same type (another version, missing or extra), "
           "or they split evenly"] * bool(drift and wide))
    return text + "\n\n" + lines(notes) if notes else text


def _notes(device: Device, reply: Dict[str, Any], place: Standing, drift: List[str]) -> List[str]:
    """What to say under the table about a device that answered: where it differs from its desired
    release, what its agent found by itself, and the files that drift from its peers."""
    notes = []
    if place.files and place.state != CURRENT:
        relation = {"ahead": "ahead of", "diverged": "diverged from"}.get(place.state, place.state)
        notes.append(f"{device.id}: {relation} its desired release {place.desired_release}: "
                     f"{', '.join(place.files)} differ{'s' if len(place.files) == 1 else ''}")
    notes.extend(f"{device.id}: {finding}" for finding in _findings(reply))
    if drift:
        notes.append(f"{device.id}: {DRIFT_MARK} {', '.join(drift)} drift{'s' if len(drift) == 1 else ''} from what "
                     f"most {device.type + ' ' if device.type else ''}devices run")
    return notes


def last_report(report: Dict[str, Any]) -> str:
    """A line on what an offline device last reported at its broker."""
    said = f"last reported release {report.get('release')} ({report.get('state', '?')}"
    said += f": {report['file']}: {report.get('error')}" if report.get("file") else ""
    return said + (f", {ago(report['at'])})" if isinstance(report.get("at"), (int, float)) else ")")


def standings(devices: Sequence[Device], statuses: Dict[str, DeviceResult], desired: Mapping[str, int],
              known: Known, releases: Mapping[int, Mapping[str, str]],
              reports: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, Standing]:
    """Where each device stands (``standing``), from its status and the store's desired releases; for an offline
    device behind a broker, the release it last reported there (``reports``) is the one it runs, as far as
    anyone can tell."""
    out = {}
    for device in devices:
        result, want = statuses[device.id], desired.get(device.id)
        if result.status is not Status.OK and result.reply:  # it answered: reachable, but it would not say
            out[device.id] = Standing(REFUSED, want, None)
            continue
        if result.status is not Status.OK and reports and device.id in reports:
            said = reports[device.id]
            out[device.id] = Standing(UNREACHABLE, want, said.get("release") if said.get("state") == CURRENT else None)
            continue
        modules = (result.reply or {}).get("modules", []) if result.status is Status.OK else None
        out[device.id] = standing(want, releases.get(want, {}) if want else {}, modules, known, releases)
    return out


def status_document(devices: Sequence[Device], statuses: Dict[str, DeviceResult],
                    last_changes: Dict[str, Optional[Dict[str, Any]]], standings: Dict[str, Standing],
                    reports: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """What ``status_table`` shows, as one JSON-ready document (``--json``)."""
    drift, agents = drifted(devices, statuses), agent_drift(devices, statuses)
    return {"devices": [
        {"device": device.id, "address": device.address, "reachable": statuses[device.id].status is Status.OK,
         "status": statuses[device.id].status.value, "error": statuses[device.id].error,
         **standings[device.id].as_dict(),
         "agent": statuses[device.id].reply, "last_change": last_changes.get(device.id),
         "drift": drift.get(device.id, []), "agent_drift": device.id in agents,
         "last_report": (reports or {}).get(device.id)}
        for device in devices
    ]}
