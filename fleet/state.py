"""The controller's memory: SQLite (WAL) beside the inventory. The one owner of its schema.

Every SQL statement of the controller lives here, behind small typed
functions; the schema is versioned (``PRAGMA user_version``) and migrates
forward, one numbered step at a time. Each change is one transaction, in
WAL mode: a controller killed at any moment loses no step it completed, and
never leaves half of one. (``synchronous=NORMAL``: a commit costs no fsync,
so a rollout can record every device's result as it arrives; an operating
system crash or a power cut may lose the last few, never corrupt the file.)

    releases        immutable, numbered sets of handler files (name -> sha256), with a message,
                    who made it and when; an identical set is the same release
    release_files   the files of each release
    blobs           file contents by sha256: one copy serves every release that holds it
    rollouts        each deploy: its file, version, release, plan, when it started and ended, outcome
    rollout_results each device's result in a rollout, as it arrived (an undo replaces it)
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigError

DEFAULT_STATE = Path(".pifleet") / "state.db"  # beside the inventory
STATE_ENV = "PIFLEET_STATE"

# Numbered migrations: the database at version N has run the first N. Append, never edit.
MIGRATIONS: Tuple[Tuple[str, ...], ...] = (
    (
        "CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, content BLOB NOT NULL)",
        "CREATE TABLE releases (number INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL UNIQUE, "
        "message TEXT NOT NULL, author TEXT NOT NULL, created REAL NOT NULL)",
        "CREATE TABLE release_files (release INTEGER NOT NULL REFERENCES releases(number), name TEXT NOT NULL, "
        "sha256 TEXT NOT NULL REFERENCES blobs(sha256), PRIMARY KEY (release, name))",
    ),
    (
        "CREATE TABLE rollouts (id INTEGER PRIMARY KEY AUTOINCREMENT, release INTEGER REFERENCES releases(number), "
        "file TEXT NOT NULL, version TEXT NOT NULL, plan TEXT NOT NULL, targets INTEGER NOT NULL, "
        "started REAL NOT NULL, finished REAL, outcome TEXT)",
        "CREATE TABLE rollout_results (rollout INTEGER NOT NULL REFERENCES rollouts(id), device TEXT NOT NULL, "
        "status TEXT NOT NULL, old_version TEXT, new_version TEXT, detail TEXT NOT NULL, at REAL NOT NULL, "
        "PRIMARY KEY (rollout, device))",
    ),
)


class UnknownRelease(ConfigError):
    code = "unknown_release"


@dataclass(frozen=True)
class Release:
    number: int
    message: str
    author: str
    created: float
    files: Dict[str, str]  # handler file name -> sha256


class StateStore:
    """``StateStore.open(path)``; close it when done (or use it as a context manager)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: every change below runs in its own explicit transaction.
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use the state file {path}: {exc} (give another with --state or "
                              f"${STATE_ENV})") from None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(f"it was written by a newer pifleet (schema {version}, this one knows "
                                        f"{len(MIGRATIONS)}); upgrade pifleet")
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                for statement in statements:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)

    # Releases

    def record_release(self, files: Mapping[str, bytes], *, message: str, author: str,
                       now: Optional[float] = None) -> Tuple[Release, bool]:
        """The release holding exactly ``files`` (name -> content): ``(release, True)`` if new, else the
        existing identical one and ``False``. Contents are stored by hash, once."""
        if not files:
            raise ConfigError("a release needs at least one handler file")
        hashes = {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
        fingerprint = _fingerprint(hashes)
        with self._transaction():
            row = self._db.execute("SELECT number FROM releases WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if row is not None:
                return self.release(row[0]), False
            for name, content in files.items():
                self._db.execute("INSERT OR IGNORE INTO blobs (sha256, content) VALUES (?, ?)",
                                 (hashes[name], content))
            number = self._db.execute(
                "INSERT INTO releases (fingerprint, message, author, created) VALUES (?, ?, ?, ?)",
                (fingerprint, message, author, time.time() if now is None else now)).lastrowid
            assert number is not None  # an INSERT into a rowid table always has one
            self._db.executemany("INSERT INTO release_files (release, name, sha256) VALUES (?, ?, ?)",
                                 [(number, name, sha) for name, sha in sorted(hashes.items())])
        return self.release(int(number)), True

    def release(self, number: int) -> Release:
        row = self._db.execute("SELECT number, message, author, created FROM releases WHERE number = ?",
                               (number,)).fetchone()
        if row is None:
            raise UnknownRelease(f"there is no release {number} in {self.path} (`fleet releases` lists them)")
        files = dict(self._db.execute("SELECT name, sha256 FROM release_files WHERE release = ? ORDER BY name",
                                      (number,)).fetchall())
        return Release(int(row[0]), row[1], row[2], float(row[3]), files)

    def releases(self, limit: Optional[int] = None) -> List[Release]:
        """Newest first."""
        numbers = self._db.execute("SELECT number FROM releases ORDER BY number DESC LIMIT ?",
                                   (-1 if limit is None else limit,)).fetchall()
        return [self.release(row[0]) for row in numbers]

    def content(self, sha256: str) -> bytes:
        row = self._db.execute("SELECT content FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise UnknownRelease(f"no file content {sha256[:12]} in {self.path}")
        return bytes(row[0])


    # Rollouts

    def start_rollout(self, *, file: str, version: str, release: Optional[int], plan: Mapping[str, Any],
                      targets: int) -> int:
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO rollouts (release, file, version, plan, targets, started) VALUES (?, ?, ?, ?, ?, ?)",
                (release, file, version, json.dumps(dict(plan), default=str), targets, time.time()))
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    def record_result(self, rollout: int, device: str, status: str, *, old_version: Optional[str],
                      new_version: Optional[str], detail: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO rollout_results VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (rollout, device, status, old_version, new_version, detail, time.time()))

    def finish_rollout(self, rollout: int, outcome: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE rollouts SET finished = ?, outcome = ? WHERE id = ?", (time.time(), outcome, rollout))

    def rollouts(self, limit: Optional[int] = None) -> List["RolloutRecord"]:
        """Newest first, each with its per-device results; one never finished has ``outcome`` None."""
        rows = self._db.execute("SELECT id, release, file, version, plan, targets, started, finished, outcome "
                                "FROM rollouts ORDER BY id DESC LIMIT ?", (-1 if limit is None else limit,)).fetchall()
        records = []
        for row in rows:
            results = {device: status for device, status in self._db.execute(
                "SELECT device, status FROM rollout_results WHERE rollout = ? ORDER BY device", (row[0],))}
            records.append(RolloutRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7],
                                         row[8], results))
        return records


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    release: Optional[int]
    file: str
    version: str
    plan: Dict[str, Any]
    targets: int
    started: float
    finished: Optional[float]
    outcome: Optional[str]  # None: the controller stopped before it ended (killed, Ctrl-C)
    results: Dict[str, str]  # device -> status


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error: all of a change, or none of it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _fingerprint(hashes: Mapping[str, str]) -> str:
    """The same files (names and contents) make the same fingerprint, in any order."""
    text = "\n".join(f"{name} {sha}" for name, sha in sorted(hashes.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def state_path(option: Optional[str], inventory: Path, environ: Mapping[str, str]) -> Path:
    """``--state``, else ``$PIFLEET_STATE``, else ``.pifleet/state.db`` beside the inventory."""
    if option:
        return Path(option)
    if environ.get(STATE_ENV):
        return Path(environ[STATE_ENV])
    return inventory.resolve().parent / DEFAULT_STATE
