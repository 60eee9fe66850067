"""Which backup a rollback restores.

A plain rollback restores the newest backup that differs from what runs now
(rolling back must change something: the system the seed documents "rolled
back" to the current version) and that the agent itself took off the device:
a version probation rolled back because it kept failing, or a version in
quarantine because it killed or hung the agent when loaded. An operator who
sees errors and sends a rollback after the agent already acted must not put
the failing code back. A backup named explicitly, or a version asked for by
sha256, is restored as asked (quarantine is checked later, by the pipeline).

Blocking (reads backups and the update log); call from a worker thread.
"""

from __future__ import annotations

from typing import AbstractSet, Optional, Set, Tuple

from .errors import NotFound
from .registry import sha256_hex
from .store import HandlerStore


def choose_backup(store: HandlerStore, name: str, *, backup: Optional[str] = None,
                  to_version: Optional[str] = None, quarantined: AbstractSet[str] = frozenset()) -> Tuple[str, bytes]:
    """``(backup name, its bytes)`` for a rollback of ``name``; ``NotFound`` says why there is none."""
    if backup is not None:
        return store.backup_name(backup), store.read_backup(name, backup)
    if to_version is not None:
        for entry in store.backups(name):
            data = store.read_backup(name, entry["backup"])
            if sha256_hex(data) == to_version:
                return entry["backup"], data
        raise NotFound(f"no backup of {name}.py is at version {to_version[:12]}")
    live = store.read_live(name)
    live_version = sha256_hex(live) if live is not None else None
    entries = store.backups(name)
    if not entries:
        raise NotFound(f"there is no backup of {name}.py to roll back to")
    taken_off = failed_probation(store, name) | set(quarantined)
    skipped = []
    for entry in entries:
        data = store.read_backup(name, entry["backup"])
        version = sha256_hex(data)
        if version in taken_off:
            skipped.append(version[:12])
        elif version != live_version:
            return entry["backup"], data
    if skipped:
        raise NotFound(
            f"no backup of {name}.py to go back to: the others are versions the agent took off the device "
            f"({', '.join(dict.fromkeys(skipped))}: probation rolled back the ones that kept failing, quarantine "
            "holds the ones that killed or hung the agent); to restore one anyway, name it with 'backup' "
            "(list_backups shows them)")
    raise NotFound(f"every backup of {name}.py is identical to the live version; nothing to roll back to")


def previous_version(store: HandlerStore, name: str, version: str, quarantined: Set[str]) -> Optional[str]:
    """The newest backed-up version of ``name`` other than ``version`` and not quarantined, or None.

    What to go back to when ``version`` kills the agent and nothing else ran
    before it in this process (a load at start, a reload of the same file).
    """
    for entry in store.backups(name):
        candidate = sha256_hex(store.read_backup(name, entry["backup"]))
        if candidate != version and candidate not in quarantined:
            return candidate
    return None


def failed_probation(store: HandlerStore, name: str) -> Set[str]:
    """Versions of ``name`` that probation rolled back and that nobody has deployed or restored since.

    A rollback sent by hand is itself backed up, so a second one undoes it;
    walking the log newest first, a version counts again once it is deployed
    or restored.
    """
    file = f"{name}.py"
    failed: Set[str] = set()
    put_back: Set[str] = set()
    for entry in store.read_log():  # newest first
        if entry.get("file") != file or entry.get("outcome") != "ok":
            continue
        if entry.get("action") == "auto_rollback":
            previous = entry.get("previous_version")
            if previous and previous not in put_back:
                failed.add(previous)
        if entry.get("action") in ("deploy", "rollback", "auto_rollback") and entry.get("version"):
            put_back.add(entry["version"])
    return failed
