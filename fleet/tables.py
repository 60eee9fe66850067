"""Tables for people: pure functions from results to text (tabulate).

Nothing here talks to a device; every function takes results and returns a
string (or, for ``--json``, a document), so the CLI's JSON and its tables come
from the same data.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from .results import DeviceResult, Status, short
from .text import grid, lines, visible

DRIFT_MARK = "*"
TABLE_WIDTH = 120  # the terminal every table is made to fit
MIN_DETAIL = 24  # the narrowest a rollout table's detail column gets
ROLLOUT_LEGEND = "commands: what the pushed files offer (fleet status counts all the device offers)"
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


def rollout_table(results: Sequence[DeviceResult], width: int = TABLE_WIDTH) -> str:
    """The per-device table, then what needs a look even where the push went through (``rollout_notes``).

    The table fits ``width`` columns: a detail too long for its column is cut
    short there and given whole under the table, naming its device.
    """
    rows, details = [], []
    for r in results:
        error = r.error
        if error and r.validation_errors and r.status is Status.FAILED:
            error = f"{error} ({len(r.validation_errors)} validation error(s))"
        details.append(_detail(error, r.note, _cautions(r)))
        rows.append([r.device_id, r.status.value, change_cell(r), len(r.commands) if r.commands else "-",
                     f"{r.seconds:.2f}s"])
    headers = ["device", "outcome", "change", "commands", "time"]
    room = max(MIN_DETAIL, width - max(len(line) for line in grid(rows, headers).splitlines()) - 2)
    cut = [(r.device_id, text) for r, text in zip(results, details) if len(visible(text)) > room]
    cells = [text if len(visible(text)) <= room else visible(text)[:room - 1] + "…" for text in details]
    text = grid([row + [cell] for row, cell in zip(rows, cells)], headers + ["detail"])
    text += "\n" + ROLLOUT_LEGEND
    sections = [lines(f"{device}: {detail}" for device, detail in cut)] if cut else []
    notes = rollout_notes(results)
    return "\n\n".join([text, *sections, *([notes] if notes else [])])


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
    return f"[{position}] {progress_detail(result)}"


def progress_detail(result: DeviceResult) -> str:
    """``d3  OK  a1b2c3d4 -> 9f8e7d6c  deployed``: one device's result on one line."""
    detail = _detail(result.error, result.note, _cautions(result))
    change = change_cell(result)
    versions = f" {change}" if change != "-" else ""
    return visible(f"{result.device_id:<16} {result.status.value:<11}{versions}  {detail}".rstrip())


def change_cell(result: DeviceResult) -> str:
    """What a rollout did to a device: ``a1b2c3d4 -> 9f8e7d6c`` for one file, ``release 4 (2 files)`` for several."""
    if result.files is not None and len(result.files) > 1:
        changed = sum(old != new for old, new in result.files.values())
        return f"release {result.release or '-'} ({changed} file{'' if changed == 1 else 's'} changed)"
    if result.old_version or result.new_version:
        return f"{short(result.old_version)} -> {short(result.new_version)}"
    return "-"
