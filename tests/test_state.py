"""The controller's state store: a real SQLite file, migrations, releases, and a kill at any moment."""

import hashlib
import signal
import sqlite3
import subprocess
import sys

import pytest

from conftest import REPO
from fleet.errors import ConfigError
from fleet.state import MIGRATIONS, StateStore, UnknownRelease, state_path

CAM = b"def handle_cam(data):\n    return {}\n"
SYS = b"def handle_sys(data):\n    return {}\n"


def test_a_new_store_is_at_the_latest_schema_in_wal_mode(tmp_path):
    with StateStore(tmp_path / "s" / "state.db") as store:
        assert store.schema_version == len(MIGRATIONS)
    db = sqlite3.connect(str(tmp_path / "s" / "state.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_the_same_files_are_the_same_release_and_contents_are_stored_once(tmp_path):
    with StateStore(tmp_path / "state.db") as store:
        first, created = store.record_release({"cam.py": CAM, "sys.py": SYS}, message="two files", author="ann")
        assert created and first.number == 1
        assert first.files == {"cam.py": hashlib.sha256(CAM).hexdigest(), "sys.py": hashlib.sha256(SYS).hexdigest()}
        again, created = store.record_release({"sys.py": SYS, "cam.py": CAM}, message="other words", author="bob")
        assert not created and again == first  # immutable: the first message and author stay
        second, created = store.record_release({"cam.py": CAM}, message="one file", author="ann")
        assert created and second.number == 2
        assert store.content(first.files["cam.py"]) == CAM
        assert [r.number for r in store.releases()] == [2, 1]
    db = sqlite3.connect(str(tmp_path / "state.db"))
    assert db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0] == 2
    db.close()


def test_releases_survive_a_reopen_and_unknown_ones_say_how_to_list_them(tmp_path):
    with StateStore(tmp_path / "state.db") as store:
        store.record_release({"cam.py": CAM}, message="m", author="a", now=1000.0)
    with StateStore(tmp_path / "state.db") as store:
        release = store.release(1)
        assert (release.message, release.author, release.created) == ("m", "a", 1000.0)
        with pytest.raises(UnknownRelease, match="fleet releases"):
            store.release(7)
        with pytest.raises(ConfigError, match="at least one handler file"):
            store.record_release({}, message="m", author="a")


def test_a_database_from_a_newer_pifleet_is_refused_not_damaged(tmp_path):
    path = tmp_path / "state.db"
    StateStore(path).close()
    db = sqlite3.connect(str(path))
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(ConfigError, match="newer pifleet"):
        StateStore(path)


def test_the_state_file_is_beside_the_inventory_unless_told(tmp_path):
    inventory = tmp_path / "site" / "devices.json"
    assert state_path(None, inventory, {}) == tmp_path / "site" / ".pifleet" / "state.db"
    assert state_path(None, inventory, {"PIFLEET_STATE": "/x/s.db"}) == tmp_path.joinpath("/x/s.db")
    assert state_path("/y/s.db", inventory, {"PIFLEET_STATE": "/x/s.db"}) == tmp_path.joinpath("/y/s.db")


WRITER = r"""
import sys
from fleet.state import StateStore
store = StateStore(__import__("pathlib").Path(sys.argv[1]))
n = 0
while True:
    n += 1
    store.record_release({"a.py": b"A = %d\n" % n, "b.py": b"B = %d\n" % n}, message=str(n), author="w")
    print(n, flush=True)
"""


def test_a_controller_killed_while_writing_loses_no_release_it_finished(tmp_path):
    path = tmp_path / "state.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    finished = 0
    while finished < 40:  # kill it mid-stride, after 40 releases it said were done
        finished = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    writer.stdout.close()
    with StateStore(path) as store:
        releases = store.releases()
        assert releases[0].number >= finished
        for release in releases:  # every release is whole: both files, both contents
            assert set(release.files) == {"a.py", "b.py"}
            for sha in release.files.values():
                assert hashlib.sha256(store.content(sha)).hexdigest() == sha


def test_a_state_file_from_the_first_schema_migrates_forward_and_keeps_its_releases(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(str(path))  # what the first version of pifleet's store wrote
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("INSERT INTO blobs VALUES (?, ?)", (hashlib.sha256(CAM).hexdigest(), CAM))
    db.execute("INSERT INTO releases VALUES (1, 'f', 'old', 'ann', 5.0)")
    db.execute("INSERT INTO release_files VALUES (1, 'cam.py', ?)", (hashlib.sha256(CAM).hexdigest(),))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with StateStore(path) as store:
        assert store.schema_version == len(MIGRATIONS) > 1
        assert store.release(1).files == {"cam.py": hashlib.sha256(CAM).hexdigest()}
        rollout = store.start_rollout(kind="deploy", file="cam.py", version="ab", release=1, plan={"canary": 1},
                                      targets={"d0": 1, "d1": 1})
        store.record_result(rollout, "d0", "OK", old_version=None, new_version="ab", detail="")
        store.set_desired({"d0": 1}, rollout)
        store.finish_rollout(rollout, "1 OK")
        (record,) = store.rollouts()
        assert (record.release, record.results, record.outcome, record.plan) == (1, {"d0": "OK"}, "1 OK", {"canary": 1})
        assert (record.kind, record.targets, store.desired()) == ("deploy", 2, {"d0": 1})


def test_desired_releases_are_set_restored_and_adopted_from_an_interrupted_rollout(tmp_path):
    with StateStore(tmp_path / "state.db") as store:
        one, _ = store.record_release({"cam.py": CAM}, message="1", author="ann")
        two, _ = store.record_release({"cam.py": SYS}, message="2", author="ann")
        store.set_desired({"d0": one.number, "d1": one.number})
        rollout = store.start_rollout(kind="deploy", file="cam.py", version="", release=two.number, plan={},
                                      targets={"d0": two.number, "d1": two.number, "d2": two.number})
        assert store.running(rollout)
        store.set_desired({"d0": two.number, "d2": two.number}, rollout)  # the first wave
        store.restore_desired(rollout, ["d0", "d2"])  # a halt with rollback: as before the rollout
        assert store.desired() == {"d0": one.number, "d1": one.number}
        store.set_desired({"d0": two.number}, rollout)
        store.close()  # the controller stops without an outcome: its lock goes with it

    with StateStore(tmp_path / "state.db") as store:
        assert not store.running(rollout)
        store.set_desired({"d1": two.number})  # set since by something else: left alone
        adopted = store.adopt_interrupted(by="fleet converge")
        assert adopted == {rollout: ["d2"]}  # d0 has its release already; d1's was set by something else
        assert store.desired() == {"d0": two.number, "d1": two.number, "d2": two.number}
        (record,) = store.rollouts()
        assert record.outcome == "interrupted; finished by fleet converge" and not record.running
        assert store.adopt_interrupted(by="again") == {}  # only once


def test_a_running_rollout_is_not_adopted_by_another_controller(tmp_path):
    with StateStore(tmp_path / "state.db") as running, StateStore(tmp_path / "state.db") as other:
        one, _ = running.record_release({"cam.py": CAM}, message="1", author="ann")
        rollout = running.start_rollout(kind="deploy", file="cam.py", version="", release=one.number, plan={},
                                        targets={"d0": one.number})
        assert other.running(rollout) and other.adopt_interrupted(by="converge") == {}
        (record,) = other.rollouts()
        assert record.outcome is None and record.running
        running.finish_rollout(rollout, "1 OK")
        assert not other.running(rollout) and not (tmp_path / "state.db.locks" / f"rollout-{rollout}").exists()
