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
    rollouts        each rollout (deploy, converge, rollback): its files, release, plan, when it started
                    and ended, outcome (none yet: running, or its controller was stopped)
    rollout_results each device's result in a rollout, as it arrived (an undo replaces it)
    rollout_targets each device a rollout means to change: the release it takes it to, and the desired
                    release it had before (so a halt can put it back, and a converge can finish the job)
    desired         the release each device should run, and the rollout that set it
    signatures      each handler file version's signatures (name and sha256, by release-signing key)

A rollout in progress holds a lock (``<state>.locks/rollout-N``, ``flock``):
a rollout with no outcome whose lock nobody holds was interrupted, and
``fleet converge`` finishes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from .errors import ConfigError

DEFAULT_STATE = Path(".pifleet") / "state.db"  # beside the inventory
_FEW = 200  # devices looked up by name; more than this, and the whole table is read at once (SQLite's
            # limit on the number of ? in one statement is 999 on older versions)
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
    (
        "ALTER TABLE rollouts ADD COLUMN kind TEXT NOT NULL DEFAULT 'deploy'",
        "CREATE TABLE rollout_targets (rollout INTEGER NOT NULL REFERENCES rollouts(id), device TEXT NOT NULL, "
        "release INTEGER NOT NULL REFERENCES releases(number), previous INTEGER, PRIMARY KEY (rollout, device))",
        "CREATE TABLE desired (device TEXT PRIMARY KEY, release INTEGER NOT NULL REFERENCES releases(number), "
        "set_at REAL NOT NULL, rollout INTEGER REFERENCES rollouts(id))",
    ),
    (
        "CREATE TABLE signatures (name TEXT NOT NULL, sha256 TEXT NOT NULL, key_id TEXT NOT NULL, "
        "signature TEXT NOT NULL, made REAL NOT NULL, PRIMARY KEY (name, sha256, key_id))",
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
            self._claims: Dict[int, int] = {}  # rollout -> the fd of its lock, held while it runs
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use the state file {path}: {exc} (give another with --state or "
                              f"${STATE_ENV})") from None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; rollouts still open here keep no lock (``fleet converge`` may finish them)."""
        for rollout in list(self._claims):
            fd = self._claims.pop(rollout)
            os.close(fd)
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


    def release_index(self) -> Tuple[Dict[Tuple[str, str], Set[int]], Dict[int, Dict[str, str]]]:
        """``({(file name, sha256): {releases holding that version}}, {release: {file name: sha256}})``:
        in one query, what telling behind from ahead needs."""
        known: Dict[Tuple[str, str], Set[int]] = {}
        files: Dict[int, Dict[str, str]] = {}
        for name, sha, number in self._db.execute("SELECT name, sha256, release FROM release_files"):
            known.setdefault((name, sha), set()).add(number)
            files.setdefault(number, {})[name] = sha
        return known, files

    # Signatures

    def add_signature(self, name: str, sha256: str, key_id: str, signature: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO signatures VALUES (?, ?, ?, ?, ?)",
                             (name, sha256, key_id, signature, time.time()))

    def signature(self, name: str, sha256: str, prefer: Optional[str] = None) -> Optional[Tuple[str, str]]:
        """``(key_id, signature)`` of a version: by the ``prefer`` key if it signed it, else the newest."""
        rows = self._db.execute("SELECT key_id, signature FROM signatures WHERE name = ? AND sha256 = ? "
                                "ORDER BY key_id = ? DESC, made DESC LIMIT 1", (name, sha256, prefer)).fetchall()
        return (rows[0][0], rows[0][1]) if rows else None

    # Desired state

    def desired(self, devices: Optional[Iterable[str]] = None) -> Dict[str, int]:
        """``{device: the release it should run}`` for ``devices`` (default: every device that has one)."""
        if devices is None:
            return dict(self._db.execute("SELECT device, release FROM desired").fetchall())
        wanted = list(devices)
        if len(wanted) > _FEW:  # most of the fleet: one pass over the table
            rows = dict(self._db.execute("SELECT device, release FROM desired").fetchall())
            return {d: rows[d] for d in wanted if d in rows}
        marks = ",".join("?" * len(wanted))
        rows = dict(self._db.execute(f"SELECT device, release FROM desired WHERE device IN ({marks})", wanted).fetchall())
        return {d: rows[d] for d in wanted if d in rows}

    def set_desired(self, releases: Mapping[str, Optional[int]], rollout: Optional[int] = None) -> None:
        """Set each device's desired release (None: it has none) in one transaction."""
        now = time.time()
        with self._transaction():
            for device, release in releases.items():
                if release is None:
                    self._db.execute("DELETE FROM desired WHERE device = ?", (device,))
                else:
                    self._db.execute("INSERT OR REPLACE INTO desired VALUES (?, ?, ?, ?)", (device, release, now, rollout))

    def changes_seen(self) -> int:
        """A number that changes whenever another connection commits: cheap to poll for new desired state."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # Rollouts

    def start_rollout(self, *, kind: str, file: str, version: str, release: Optional[int], plan: Mapping[str, Any],
                      targets: Mapping[str, int]) -> int:
        """Record a rollout taking each of ``targets`` to its release, and hold its lock until ``finish_rollout``."""
        previous = self.desired(targets)
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO rollouts (kind, release, file, version, plan, targets, started) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, release, file, version, json.dumps(dict(plan), default=str), len(targets), time.time()))
            assert cursor.lastrowid is not None
            rollout = int(cursor.lastrowid)
            self._db.executemany("INSERT INTO rollout_targets VALUES (?, ?, ?, ?)",
                                 [(rollout, d, release_, previous.get(d)) for d, release_ in targets.items()])
            self._claim(rollout)  # before the commit: no one can see this rollout unclaimed
        return rollout

    def record_result(self, rollout: int, device: str, status: str, *, old_version: Optional[str],
                      new_version: Optional[str], detail: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO rollout_results VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (rollout, device, status, old_version, new_version, detail, time.time()))

    def finish_rollout(self, rollout: int, outcome: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE rollouts SET finished = ?, outcome = ? WHERE id = ?", (time.time(), outcome, rollout))
        self._unclaim(rollout)

    def restore_desired(self, rollout: int, devices: Iterable[str]) -> None:
        """Put ``devices`` back on the desired release they had before ``rollout`` set theirs."""
        with self._transaction():
            for device in devices:
                row = self._db.execute("SELECT previous FROM rollout_targets t JOIN desired d USING (device) "
                                       "WHERE t.rollout = ? AND device = ? AND d.rollout = ?",
                                       (rollout, device, rollout)).fetchone()
                if row is None:
                    continue  # this rollout never set it, or something set it since
                if row[0] is None:
                    self._db.execute("DELETE FROM desired WHERE device = ?", (device,))
                else:
                    self._db.execute("UPDATE desired SET release = ?, set_at = ?, rollout = NULL WHERE device = ?",
                                     (row[0], time.time(), device))

    def adopt_interrupted(self, by: str) -> Dict[int, List[str]]:
        """Finish the job of every rollout whose controller stopped: ``{rollout: devices given its release}``.

        Each of its targets whose desired release is still the one it had
        before that rollout gets the rollout's release; one set since by
        anything else is left alone. The rollout's outcome then says ``by``.
        """
        adopted: Dict[int, List[str]] = {}
        with self._transaction():
            for (rollout,) in self._db.execute("SELECT id FROM rollouts WHERE outcome IS NULL").fetchall():
                if self.running(rollout):
                    continue
                rows = self._db.execute(
                    "SELECT t.device, t.release FROM rollout_targets t LEFT JOIN desired d USING (device) "
                    "WHERE t.rollout = ? AND (d.release IS t.previous) AND (d.rollout IS NOT ?)",
                    (rollout, rollout)).fetchall()
                now = time.time()
                self._db.executemany("INSERT OR REPLACE INTO desired VALUES (?, ?, ?, ?)",
                                     [(device, release, now, rollout) for device, release in rows])
                self._db.execute("UPDATE rollouts SET finished = ?, outcome = ? WHERE id = ?",
                                 (now, f"interrupted; finished by {by}", rollout))
                adopted[rollout] = [device for device, _ in rows]
        return adopted

    # Locks: a rollout in progress holds one

    def _lock_path(self, rollout: int) -> Path:
        return Path(f"{self.path}.locks") / f"rollout-{rollout}"

    def _claim(self, rollout: int) -> None:
        path = self._lock_path(rollout)
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)  # others only need to test it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._claims[rollout] = fd

    def _unclaim(self, rollout: int) -> None:
        fd = self._claims.pop(rollout, None)
        if fd is not None:
            self._lock_path(rollout).unlink(missing_ok=True)
            os.close(fd)

    def running(self, rollout: int) -> bool:
        """Whether a live controller holds ``rollout``'s lock (this one, or another process)."""
        if rollout in self._claims:
            return True
        try:
            fd = os.open(self._lock_path(rollout), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def rollouts(self, limit: Optional[int] = None) -> List["RolloutRecord"]:
        """Newest first, each with its per-device results; one never finished has ``outcome`` None."""
        rows = self._db.execute("SELECT id, kind, release, file, version, plan, targets, started, finished, outcome "
                                "FROM rollouts ORDER BY id DESC LIMIT ?", (-1 if limit is None else limit,)).fetchall()
        records = []
        for row in rows:
            results = {device: status for device, status in self._db.execute(
                "SELECT device, status FROM rollout_results WHERE rollout = ? ORDER BY device", (row[0],))}
            records.append(RolloutRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7],
                                         row[8], row[9], results, self.running(row[0]) if row[9] is None else False))
        return records


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    kind: str  # deploy, converge or rollback
    release: Optional[int]
    file: str
    version: str
    plan: Dict[str, Any]
    targets: int
    started: float
    finished: Optional[float]
    outcome: Optional[str]  # None: the controller stopped before it ended (killed, Ctrl-C)
    results: Dict[str, str]  # device -> status
    running: bool = False  # no outcome yet, and its controller is still at work


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
