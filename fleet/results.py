"""Per-device results: what every fan-out returns instead of raising.

A table, a JSON document and an exit code are all pure functions of a list
of ``DeviceResult``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple


def short(version: Optional[str]) -> str:
    """A version (sha256) as people read it: its first 8 hex digits, or ``-`` for none."""
    return version[:8] if version else "-"


class Status(str, enum.Enum):
    OK = "OK"
    FAILED = "FAILED"  # the device answered success: false, or the rollout's checks failed
    TIMEOUT = "TIMEOUT"  # no reply in time
    UNREACHABLE = "UNREACHABLE"  # could not connect, or the connection dropped
    SKIPPED = "SKIPPED"  # not attempted: already up to date, or the rollout halted first
    ROLLED_BACK = "ROLLED_BACK"  # changed by this rollout, then put back

    def __str__(self) -> str:
        return self.value


@dataclass
class DeviceResult:
    device_id: str
    status: Status
    reply: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    code: Optional[str] = None
    seconds: float = 0.0
    # Deploy details (empty for plain commands)
    old_version: Optional[str] = None
    new_version: Optional[str] = None
    # Tuples by default, not lists from a factory: a fan-out builds one result per device.
    commands: Sequence[str] = ()
    validation_errors: Sequence[str] = ()
    validation_warnings: Sequence[str] = ()
    removed_commands: Sequence[str] = ()  # commands the device offered before this push and no longer does
    note: str = ""
    changed: bool = False  # this rollout changed the device (so rollback applies)
    backup: Optional[str] = None  # the backup our push created on the device
    release: Optional[int] = None  # the release a rollout put (or meant to put) on the device
    # Each file a rollout touched on the device: name -> (version before, version after). None outside rollouts.
    files: Optional[Dict[str, Tuple[Optional[str], Optional[str]]]] = None

    @property
    def ok(self) -> bool:
        return self.status in (Status.OK, Status.SKIPPED)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "device": self.device_id,
            "status": self.status.value,
            "error": self.error,
            "code": self.code,
            "seconds": round(self.seconds, 4),
            "old_version": self.old_version,
            "new_version": self.new_version,
            "commands": list(self.commands),
            "validation_errors": list(self.validation_errors),
            "validation_warnings": list(self.validation_warnings),
            "removed_commands": list(self.removed_commands),
            "note": self.note,
            **({"release": self.release, "files": {name: {"old_version": old, "new_version": new}
                                                   for name, (old, new) in self.files.items()}}
               if self.files is not None else {}),
            "reply": self.reply,
        }
