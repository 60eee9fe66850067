"""Everything the agent keeps on disk, and how it is written so a power cut is harmless.

    <root>/handlers/NAME.py                      the live handler files
    <root>/.backups/handlers_NAME.py_<stamp>[_n].backup
                                                 earlier versions (seed naming)
    <root>/.state/good/NAME.py                   the last version that deployed and loaded
    <root>/.state/update_log.jsonl               append-only log of every change

Files are replaced by write-to-temp, fsync, rename, fsync the folder, so a
crash at any moment leaves the old file or the new one, never part of one.
(The system the seed documents opened the live file with ``open(path, 'w')``,
which truncates first; a kill mid-write left an empty handler.) Backup names
get a ``_n`` suffix instead of overwriting each other within one second.

All methods block on disk I/O; the pipeline calls them from a worker thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import BadRequest, NotFound

log = logging.getLogger(__name__)

LOG_FILE = "update_log.jsonl"
# Limits
DEFAULT_MAX_BACKUP_BYTES = 128 * 1024 * 1024  # all of .backups/ together
DEFAULT_MAX_HANDLER_FILES = 64
LOG_ROTATE_BYTES = 1024 * 1024  # one old generation is kept as update_log.jsonl.1

_BACKUP_NAME = re.compile(r"^handlers_([A-Za-z][A-Za-z0-9_]*)\.py_(\d{8}_\d{6})(?:_(\d+))?\.backup$")


class BackupBudgetExceeded(OSError):
    """A backup would pass ``max_backup_bytes`` even after pruning: the push is refused, nothing changes."""


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, whole."""
    folder = path.parent
    import tempfile  # here, not at the top: the agent's start time is mostly imports

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HandlerStore:
    def __init__(self, root: Path, *, keep_backups: int, max_backup_bytes: int = DEFAULT_MAX_BACKUP_BYTES) -> None:
        self.root = root
        self.handlers_dir = root / "handlers"
        self.backups_dir = root / ".backups"
        self.good_dir = root / ".state" / "good"
        self.log_path = root / ".state" / LOG_FILE
        self.keep_backups = keep_backups
        self.max_backup_bytes = max_backup_bytes

    def ensure_dirs(self) -> None:
        for folder in (self.handlers_dir, self.backups_dir, self.good_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._sweep_temp_files()

    def _sweep_temp_files(self) -> None:
        """Remove temp files a crash left behind mid-write (they were never renamed into place)."""
        for folder in (self.handlers_dir, self.backups_dir, self.good_dir):
            for leftover in folder.glob(".*.tmp"):
                log.warning("removing %s, left over from an interrupted write", leftover)
                try:
                    leftover.unlink(missing_ok=True)
                except OSError as exc:  # a read-only card: harmless litter, and no reason not to start
                    log.error("could not remove %s: %s", leftover, exc)

    # Live files

    def live_path(self, name: str) -> Path:
        return self.handlers_dir / f"{name}.py"

    def live_names(self) -> List[str]:
        """Handler module names on disk, in load order (files starting with '_' are skipped)."""
        return sorted(
            p.stem for p in self.handlers_dir.glob("*.py")
            if not p.name.startswith("_") and p.stem.isidentifier()
        )

    def read_live(self, name: str) -> Optional[bytes]:
        path = self.live_path(name)
        if path.is_symlink():
            raise BadRequest(f"handlers/{name}.py is a symbolic link; the agent does not follow links")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def write_live(self, name: str, data: bytes) -> None:
        path = self.live_path(name)
        if path.is_symlink():
            raise BadRequest(f"handlers/{name}.py is a symbolic link; the agent does not follow links")
        atomic_write(path, data)

    def remove_live(self, name: str) -> None:
        self.live_path(name).unlink(missing_ok=True)
        fsync_dir(self.handlers_dir)

    # Last good copies

    def read_good(self, name: str) -> Optional[bytes]:
        try:
            return (self.good_dir / f"{name}.py").read_bytes()
        except FileNotFoundError:
            return None

    def save_good(self, name: str, data: bytes) -> None:
        atomic_write(self.good_dir / f"{name}.py", data)

    def remove_good(self, name: str) -> None:
        (self.good_dir / f"{name}.py").unlink(missing_ok=True)

    # Backups

    def create_backup(self, name: str, data: bytes) -> str:
        """Write a backup of ``data``; return its path relative to the root (as the seed shows it).

        Raises ``BackupBudgetExceeded`` (an ``OSError``) and writes nothing when
        it cannot fit in ``max_backup_bytes`` even after pruning.
        """
        self._make_room(len(data))
        stamp = time.strftime("%Y%m%d_%H%M%S")
        base = f"handlers_{name}.py_{stamp}"
        # Number past the highest suffix used in this second, never into a gap that
        # pruning left: a reused name would sort as older than it is.
        taken = [m for m in (_BACKUP_NAME.match(p.name) for p in self.backups_dir.glob(f"{base}*.backup"))
                 if m is not None and m.group(2) == stamp]
        if taken:
            n = max(int(m.group(3) or 0) for m in taken) + 1
            candidate = self.backups_dir / f"{base}_{n}.backup"
        else:
            candidate = self.backups_dir / f"{base}.backup"
        atomic_write(candidate, data)
        self._prune(name)
        return f".backups/{candidate.name}"

    def backups(self, name: Optional[str] = None) -> List[Dict[str, Any]]:
        """Backups, newest first, as ``{file, name, created, size}`` dicts."""
        found = []
        for path in self.backups_dir.glob("handlers_*.backup"):
            match = _BACKUP_NAME.match(path.name)
            if match is None or (name is not None and match.group(1) != name):
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            stamp, n = match.group(2), int(match.group(3) or 0)
            found.append(((stamp, n), {
                "backup": path.name,
                "path": f".backups/{path.name}",
                "file": f"{match.group(1)}.py",
                "created": time.mktime(time.strptime(stamp, "%Y%m%d_%H%M%S")),
                "size": size,
            }))
        found.sort(key=lambda item: item[0], reverse=True)
        return [entry for _, entry in found]

    @staticmethod
    def backup_name(backup: str) -> str:
        """A backup's file name, from the name or the ``.backups/...`` path the replies show."""
        return backup[len(".backups/"):] if backup.startswith(".backups/") else backup

    def read_backup(self, name: str, backup: str) -> bytes:
        """The bytes of a named backup of module ``name``; ``backup`` may carry the ``.backups/`` prefix."""
        plain = self.backup_name(backup)
        match = _BACKUP_NAME.match(plain)
        if match is None:
            raise BadRequest(f"{backup!r} is not a backup name; list_backups shows the names")
        if match.group(1) != name:
            raise BadRequest(f"backup {plain} belongs to {match.group(1)}.py, not {name}.py")
        try:
            return (self.backups_dir / plain).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no backup named {plain}; list_backups shows what exists") from None

    def remove_backup(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def _make_room(self, size: int) -> None:
        """Remove backups until ``size`` more bytes fit the budget: the oldest backups of the files with
        the most versions first; the newest backup of every file is kept."""
        if self._backup_bytes() + size <= self.max_backup_bytes:
            return  # the usual case, known from one scan of the folder
        entries = self.backups()
        total = sum(entry["size"] for entry in entries) + size
        by_file: Dict[str, List[Dict[str, Any]]] = {}
        for entry in entries:  # newest first
            by_file.setdefault(entry["file"], []).append(entry)
        spare = [(len(versions), -entry["created"], entry) for versions in by_file.values() for entry in versions[1:]]
        spare.sort(key=lambda item: (-item[0], -item[1]))  # most versions first, then the oldest
        chosen = []
        for _, _, entry in spare:
            if total <= self.max_backup_bytes:
                break
            chosen.append(entry)
            total -= entry["size"]
        if total > self.max_backup_bytes:
            raise BackupBudgetExceeded(errno.ENOSPC, (
                f"the backups would pass their budget of {self.max_backup_bytes} bytes even without every "
                "older version (the newest backup of each file is always kept); raise --max-backup-bytes "
                "or delete handler files you no longer need"))
        for entry in chosen:
            (self.backups_dir / entry["backup"]).unlink(missing_ok=True)
            log.info("removed backup %s to stay within %d bytes of backups", entry["backup"], self.max_backup_bytes)

    def _backup_bytes(self) -> int:
        total = 0
        with os.scandir(self.backups_dir) as found:
            for entry in found:
                if entry.name.endswith(".backup"):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass
        return total

    def _prune(self, name: str) -> None:
        for entry in self.backups(name)[self.keep_backups:]:
            (self.backups_dir / entry["backup"]).unlink(missing_ok=True)

    # Update log

    def append_log(self, entry: Dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(LOG_FILE + ".1"))
        except FileNotFoundError:
            pass
        # backslashreplace: a lone surrogate from a request is written escaped, never an error
        with open(self.log_path, "a", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def release_of(self, name: str, version: str) -> Optional[int]:
        """The release a version of handler ``name`` last came with, from the update log; None if never told."""
        for entry in self.read_log():  # newest first
            if entry.get("file") == f"{name}.py" and entry.get("version") == version and entry.get("release"):
                release = entry["release"]
                return release if isinstance(release, int) and not isinstance(release, bool) else None
        return None

    def read_log(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Log entries newest first. A line torn by a crash is skipped, not fatal."""
        entries: List[Dict[str, Any]] = []
        for path in (self.log_path, self.log_path.with_name(LOG_FILE + ".1")):
            try:
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                continue
            for line in reversed(lines):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
                    if limit is not None and len(entries) >= limit:
                        return entries
        return entries
