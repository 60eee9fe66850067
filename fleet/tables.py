"""Tables for people: pure functions from results to text (tabulate).

Nothing here talks to a device; every function takes results and returns a
string (or, for ``--json``, a document), so the CLI's JSON and its tables come
from the same data.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Set

from .inventory import Device
from .results import DeviceResult, Status, short
from .text import grid, lines, visible

DRIFT_MARK = "*"
# Limits
LOW_DISK_SHARE = 0.10  # below this share of free space a device's storage is called out under the status table


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def ago(timestamp: Optional[float], now: Optional[float] = None) -> str:
    if not timestamp:
        return "-"
    return duration((now or time.time()) - timestamp) + " ago"


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


def status_table(devices: Sequence[Device], statuses: Dict[str, DeviceResult],
                 last_changes: Dict[str, Optional[Dict[str, Any]]]) -> str:
    drift = drifted(devices, statuses)
    files = sorted({file for result in statuses.values() if result.status is Status.OK
                    for file in {*_running(result), *_failed_to_load(result)}})
    headers = ["device", "name", "address", "reachable", "agent", "uptime", *files, "commands", "last change"]
    rows = []
    problems = []  # under the table: why a device did not answer, or what its agent reported
    for device in devices:
        result = statuses.get(device.id)
        reply = (result.reply or {}) if result else {}
        if result is None or result.status is not Status.OK:
            reason = result.status.value.lower() if result else "unknown"
            # A device that answered is reachable, even when it refused (a wrong token, say).
            reachable = f"yes ({result.code})" if result is not None and result.reply else f"no ({reason})"
            rows.append([device.id, device.label, device.address, reachable, "-", "-",
                         *["-" for _ in files], "-", "-"])
            if result is not None and result.error:
                problems.append(f"{device.id}: {result.error}")
            continue
        problems.extend(f"{device.id}: {finding}" for finding in _findings(reply))
        running, failed = _running(result), _failed_to_load(result)
        cells = []
        for file in files:
            if file in failed:
                cells.append("LOAD FAILED")
            elif file in drift.get(device.id, ()):
                cells.append(f"{short(running.get(file))} {DRIFT_MARK}")
            else:
                cells.append(short(running.get(file)))
        change = last_changes.get(device.id)
        last = f"{change['action']} {change['file']} {ago(change.get('time'))}" if change else "-"
        rows.append([device.id, device.label, device.address, "yes", reply.get("agent_version", "?"),
                     duration(reply.get("uptime_seconds")), *cells, reply.get("command_count", "-"), last])
    text = grid(rows, headers)
    if drift:
        text += (f"\n{DRIFT_MARK} drift: differs from what most devices of the same type run "
                 "(another version, or a file missing or extra), or they are split evenly")
    if problems:
        text += "\n\n" + lines(problems)
    return text


def status_document(devices: Sequence[Device], statuses: Dict[str, DeviceResult],
                    last_changes: Dict[str, Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """What ``status_table`` shows, as one JSON-ready document (``--json``)."""
    drift = drifted(devices, statuses)
    return {"devices": [
        {"device": device.id, "address": device.address, "reachable": statuses[device.id].status is Status.OK,
         "status": statuses[device.id].status.value, "error": statuses[device.id].error,
         "agent": statuses[device.id].reply, "last_change": last_changes.get(device.id),
         "drift": drift.get(device.id, [])}
        for device in devices
    ]}


def rollout_table(results: Sequence[DeviceResult]) -> str:
    """The per-device table, then what needs a look even where the push went through (``rollout_notes``)."""
    rows = []
    for r in results:
        error = r.error
        if error and r.validation_errors and r.status is Status.FAILED:
            error = f"{error} ({len(r.validation_errors)} validation error(s))"
        detail = _detail(error, r.note, _cautions(r))
        rows.append([r.device_id, r.status.value, f"{short(r.old_version)} -> {short(r.new_version)}",
                     len(r.commands) if r.commands else "-", f"{r.seconds:.2f}s", detail or ""])
    text = grid(rows, ["device", "outcome", "version", "commands", "time", "detail"])
    notes = rollout_notes(results)
    return f"{text}\n\n{notes}" if notes else text


def rollout_notes(results: Sequence[DeviceResult]) -> str:
    """The agents' check warnings and the commands a push takes away, each listed once with its devices.

    A warning does not stop a push, and a file that no longer offers a command
    passes every check, so on a large fleet both would be easy to miss in a
    column of "deployed". Listed once each, they are not.
    """
    warnings: Dict[str, List[str]] = {}
    removed: Dict[str, List[str]] = {}
    for r in results:
        for warning in r.validation_warnings:
            warnings.setdefault(warning, []).append(r.device_id)
        if r.removed_commands:
            removed.setdefault(", ".join(r.removed_commands), []).append(r.device_id)
    sections = []
    if warnings:
        sections.append("Warnings from the agents' checks (they did not stop the push):\n" + lines(
            f"  {warning}: {some(ids)}" for warning, ids in warnings.items()))
    if removed:
        sections.append("Commands offered before that the new version drops (calls to them will get unknown_command):\n"
                        + lines(f"  {commands}: {some(ids)}" for commands, ids in removed.items()))
    return "\n".join(sections)


def some(items: Sequence[str], shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 495 more``: names enough to act on, without a wall of them."""
    text = ", ".join(items[:shown])
    return f"{text} and {len(items) - shown} more" if len(items) > shown else text


def reply_table(results: Sequence[DeviceResult], summarise=None) -> str:
    """A generic table for one command sent to many devices."""
    rows = []
    for r in results:
        if r.status is Status.OK:
            text = summarise(r.reply or {}) if summarise else _summary(r.reply or {})
        else:
            text = r.error or ""
        rows.append([r.device_id, r.status.value, f"{r.seconds:.2f}s", text])
    return grid(rows, ["device", "outcome", "time", "reply"])


def _detail(error: Optional[str], note: str, cautions: str = "") -> str:
    """What went wrong and what is known about it: a timed-out push, and that it may still land."""
    return "; ".join(part for part in (error, note, cautions) if part)


def _cautions(result: DeviceResult) -> str:
    """What to look at even when a push went through: commands it takes away, warnings from the checks."""
    parts = []
    if result.removed_commands:
        verb = "drops" if result.changed else "would drop"
        parts.append(f"{verb} {', '.join(result.removed_commands)}")
    if result.validation_warnings:
        count = len(result.validation_warnings)
        parts.append(f"{count} check warning{'' if count == 1 else 's'}")
    return "; ".join(parts)


def _summary(reply: Dict[str, Any]) -> str:
    if "message" in reply:
        return str(reply["message"])
    shown = {k: v for k, v in reply.items() if k not in ("success", "timestamp", "id", "type")}
    text = ", ".join(f"{k}={v}" for k, v in shown.items())
    return text if len(text) <= 100 else text[:97] + "..."


def progress_line(result: DeviceResult, done: int, total: int) -> str:
    """One line per device as results arrive, so a long rollout shows it is moving.

    A rollout reports every target once; results after that (``done > total``)
    are its undos, after a halt with rollback on failure, and say so.
    """
    width = len(str(total))
    position = f"{done:>{width}}/{total}" if done <= total else "undo".center(2 * width + 1)
    detail = _detail(result.error, result.note, _cautions(result))
    versions = ""
    if result.old_version or result.new_version:
        versions = f" {short(result.old_version)} -> {short(result.new_version)}"
    return visible(f"[{position}] {result.device_id:<16} {result.status.value:<11}{versions}  {detail}".rstrip())
