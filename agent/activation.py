"""Activation records and quarantine: the files that make every load of new code recoverable.

Before the agent runs a handler module's code in its own process (a push, a
rollback, a reload, each load at start), it writes an *activation record*,
durably. The record is removed once that code has stopped running: the module
loaded or failed, and its ``on_reload`` returned. So a record found at start
means that the agent died, or was stopped, while code of that version ran in
it. Recovery then puts the previous version back and *quarantines* this one:
a quarantined version is never loaded again unless a push says ``force``.

    <root>/.state/activating/NAME.<sha12>.json   {file, version, fallback_version, action, started_at}
    <root>/.state/quarantine/NAME.<sha256>.json  {file, version, reason, time, action}
    <root>/.state/quarantine/NAME.<sha256>.py    the quarantined bytes, for a person to read

Every write is atomic and synced (``store.atomic_write``). All methods block
on disk I/O; callers run them in the agent's worker threads.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .store import atomic_write, fsync_dir

log = logging.getLogger(__name__)

_QUARANTINE_ENTRY = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)\.([0-9a-f]{64})\.json$")


@dataclass(frozen=True)
class ActivationRecord:
    """Module ``name`` at ``version`` is about to run in the agent.

    ``fallback_version`` is what goes back in its place if it kills the agent:
    the version that ran before it, or None to leave the module out.
    """

    name: str
    version: str
    fallback_version: Optional[str]
    action: str  # what activated it, for the update log: deploy, rollback, reload, start, ...
    started_at: float = field(default_factory=time.time)

    @property
    def file_name(self) -> str:
        return f"{self.name}.{self.version[:12]}.json"


class ActivationRecords:
    """``<root>/.state/activating/``: at most a few files, each alive for the length of one load."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "activating"

    def ensure_dir(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def begin(self, record: ActivationRecord) -> None:
        atomic_write(self.folder / record.file_name, json.dumps(asdict(record)).encode("utf-8"))

    def end(self, record: ActivationRecord) -> None:
        (self.folder / record.file_name).unlink(missing_ok=True)
        fsync_dir(self.folder)

    def pending(self) -> List[ActivationRecord]:
        """Records left by a process that died mid-activation, oldest first; unreadable ones are dropped."""
        found = []
        for path in self.folder.glob("*.json"):
            try:
                found.append(ActivationRecord(**json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable activation record %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        return sorted(found, key=lambda record: record.started_at)


class Quarantine:
    """``<root>/.state/quarantine/``: versions that killed or hung the agent when loaded for real."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "quarantine"
        self._entries: Optional[List[Dict[str, Any]]] = None  # read once; get_status must not touch the disk

    def ensure_dir(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._entries = self._read_entries()

    def add(self, name: str, version: str, source: Optional[bytes], *, reason: str, action: str) -> Dict[str, Any]:
        entry = {"file": f"{name}.py", "version": version, "reason": reason, "time": time.time(), "action": action}
        if source is not None:
            atomic_write(self.folder / f"{name}.{version}.py", source)
        atomic_write(self.folder / f"{name}.{version}.json", json.dumps(entry).encode("utf-8"))
        self._entries = None
        return entry

    def get(self, name: str, version: str) -> Optional[Dict[str, Any]]:
        try:
            entry = json.loads((self.folder / f"{name}.{version}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def remove(self, name: str, version: str) -> None:
        """A push with ``force`` takes the version out of quarantine before it is tried again."""
        for suffix in (".json", ".py"):
            (self.folder / f"{name}.{version}{suffix}").unlink(missing_ok=True)
        self._entries = None
        fsync_dir(self.folder)

    def versions(self, name: str) -> List[str]:
        return [entry["version"] for entry in self.entries() if entry.get("file") == f"{name}.py"]

    def entries(self) -> List[Dict[str, Any]]:
        """Every quarantined version, newest first."""
        if self._entries is None:
            self._entries = self._read_entries()
        return list(self._entries)

    def _read_entries(self) -> List[Dict[str, Any]]:
        found = []
        for path in self.folder.glob("*.json"):
            match = _QUARANTINE_ENTRY.match(path.name)
            entry = self.get(match.group(1), match.group(2)) if match else None
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda entry: entry.get("time", 0), reverse=True)
