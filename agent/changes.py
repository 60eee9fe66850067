"""What a change to a handler file is and what came of it: the pipeline's inputs and results.

The pipeline (``pipeline``) and recovery (``recovery``) produce these; the
built-in commands (``deploy_commands``) turn them into the seed's replies.
Keeping the results as plain data is what lets the pipeline be called and
tested without a socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .report import CheckReport
from .errors import AgentError, StorageFailed
from .probation import ProbationRule, Watch


@dataclass(frozen=True)
class Change:
    """How a new version reaches the live file: the one thing the three flows differ in."""

    action: str  # the update log's word for it: deploy, rollback, reload, auto_rollback
    writes_file: bool = True  # reload activates the file already on disk
    rule: Optional[ProbationRule] = None  # probation after it; pushes only
    restored_from: Optional[str] = None  # the backup a rollback restores
    reason: Optional[str] = None  # why, when the agent decided it by itself
    release: Optional[int] = None  # the controller's release number, when a push names one


@dataclass
class Outcome:
    """A version that is live now (or would be, for a dry run)."""

    name: str
    version: str
    previous_version: Optional[str]
    commands: List[str]
    report: CheckReport
    started: float  # time.perf_counter() when the change began
    backup: Optional[str] = None
    unchanged: bool = False
    dry_run: bool = False
    watch: Optional[Watch] = None
    restored_from: Optional[str] = None


@dataclass
class Removal:
    """A handler file removed and its commands unloaded."""

    name: str
    backup: Optional[str]
    removed_commands: List[str]
    previous_version: Optional[str]
    warnings: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Untouched:
    """A conditional change (``if_version``) that found the file at another version: nothing was done."""

    name: str
    live_version: Optional[str]
    expected: str


def log_entry(action: str, name: str, version: Optional[str], previous: Optional[str], **extra: Any) -> Dict[str, Any]:
    """One line of the update log; ``outcome`` is ``ok`` unless given."""
    entry = {"time": time.time(), "action": action, "file": f"{name}.py", "version": version,
             "previous_version": previous}
    entry.update({k: v for k, v in extra.items() if v is not None})
    entry.setdefault("outcome", "ok")
    return entry


def refused(error_class: type, filename: str, report: CheckReport, first: str) -> AgentError:
    """A refused push in the seed's shape: ``Code validation failed: <first reason>``."""
    return error_class(
        f"Code validation failed: {first}",
        details={"filename": filename, "validation_passed": False, "validation_details": report.details()},
    )


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def made_anyway(unrecorded: List[Optional[str]]) -> List[str]:
    """Warnings for records that could not be written after a change that stands."""
    return [f"the change was made, but {text}" for text in unrecorded if text]


def storage_failed(doing: str, exc: OSError, still: str = "the previous version is still live") -> StorageFailed:
    return StorageFailed(
        f"{doing} on the device: {os_reason(exc)}; nothing was changed, {still} "
        "(free some space on the device, or check its SD card: a failing card turns read-only)")
