"""The on-disk store without sockets: what a crash in the middle of a write leaves behind.

The kill -9 test in test_recovery.py kills real agents at random moments; these
tests make the crash happen at one exact step, every time.
"""

import os

import pytest

from agent.store import HandlerStore, atomic_write


def test_a_crash_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "ver.py"
    target.write_bytes(b"OLD = 1\n")

    def power_cut(fd):
        raise OSError("power cut")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="power cut"):
        atomic_write(target, b"NEW = 2\n" * 1000)
    assert target.read_bytes() == b"OLD = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ver.py"]  # no temp file left behind


def test_temp_files_from_an_interrupted_write_are_swept_at_start(tmp_path):
    store = HandlerStore(tmp_path, keep_backups=3)
    store.ensure_dirs()
    leftover = store.handlers_dir / ".ver.py.abc123.tmp"
    leftover.write_bytes(b"half a file")
    store.ensure_dirs()
    assert not leftover.exists()


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_start(tmp_path):
    # On a card that turned read-only no leftover can be removed; here one refuses by being a folder.
    store = HandlerStore(tmp_path, keep_backups=3)
    store.ensure_dirs()
    stuck = store.handlers_dir / ".ver.py.abc123.tmp"
    stuck.mkdir()
    removable = store.backups_dir / ".handlers_ver.py_x.backup.def456.tmp"
    removable.write_bytes(b"half a file")
    store.ensure_dirs()
    assert stuck.is_dir() and not removable.exists()


def test_a_torn_last_log_line_is_skipped(tmp_path):
    store = HandlerStore(tmp_path, keep_backups=3)
    store.ensure_dirs()
    store.append_log({"action": "deploy", "file": "a.py"})
    with open(store.log_path, "a") as log:
        log.write('{"action": "dep')  # the crash came mid-line
    assert [e["action"] for e in store.read_log()] == ["deploy"]


def test_a_lone_surrogate_from_a_request_is_logged_escaped_not_an_error(tmp_path):
    store = HandlerStore(tmp_path, keep_backups=3)
    store.ensure_dirs()
    store.append_log({"action": "deploy", "file": "a.py", "reason": "handler raised: bad \ud800"})
    assert store.read_log()[0]["reason"] == "handler raised: bad \ud800"
