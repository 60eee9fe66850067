"""Safe remote deploy over real sockets: update, checks, import test, rollback, delete, log."""

import asyncio
import json
import re
import resource
import signal
from pathlib import Path

import pytest

from conftest import Client, fixture_text, sha, waits_for

SEED_STEP1 = fixture_text("seed_camera_step1.py")
SEED_STEP2 = fixture_text("seed_camera_step2.py")
SEED_COMMANDS = ["start_recording", "stop_recording", "camera_status"]
BACKUP_NAME = re.compile(r"^\.backups/handlers_camera_handlers\.py_\d{8}_\d{6}(_\d+)?\.backup$")


def version_module(n: int) -> str:
    return f"VERSION = {n}\n\ndef handle_version(data):\n    return {{'version': VERSION}}\n"


async def deploy(client, filename, code, **fields):
    return await client.call("update_handler", filename=filename, code=code, **fields)


async def test_seed_camera_handler_deploys_with_the_seed_reply(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    reply = await deploy(client, "camera_handlers.py", SEED_STEP1)
    assert reply["success"] is True, reply
    assert reply["message"] == "Handler camera_handlers.py updated successfully with safety checks"
    assert reply["filename"] == "handlers/camera_handlers.py"
    assert reply["backup_created"] is None  # nothing to back up on the first deploy
    assert reply["validation_passed"] is True
    assert reply["reload"] == {"success": True, "command_count": 3, "commands": SEED_COMMANDS}
    assert reply["version"] == sha(SEED_STEP1)
    assert reply["validation"]["warnings"] == []
    assert isinstance(reply["timestamp"], float)
    assert (agent.store.handlers_dir / "camera_handlers.py").read_text() == SEED_STEP1
    status = await client.call("camera_status")
    assert status["success"] is True and status["recording"] is False


async def test_seed_step2_string_deploys_over_step1_and_backs_it_up(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "camera_handlers.py", SEED_STEP1)
    reply = await deploy(client, "handlers/camera_handlers.py", SEED_STEP2)
    assert reply["success"] is True and reply["reload"]["commands"] == SEED_COMMANDS
    assert BACKUP_NAME.match(reply["backup_created"]), reply["backup_created"]
    assert (agent.config.root / reply["backup_created"]).read_text() == SEED_STEP1
    assert reply["previous_version"] == sha(SEED_STEP1)


async def test_seed_bad_code_is_refused_with_the_seed_error_and_the_old_handler_works(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "camera_handlers.py", SEED_STEP1)
    reply = await deploy(client, "camera_handlers.py", fixture_text("seed_bad_code.py.txt"))
    assert reply["success"] is False and reply["code"] == "validation_failed"
    assert reply["error"] == "Code validation failed: Dangerous pattern detected: os.system("
    details = reply["validation_details"]
    assert details["valid"] is False
    assert details["errors"][0].startswith("Dangerous pattern detected: os.system(")
    assert "(line 4)" in details["errors"][0]
    assert (agent.store.handlers_dir / "camera_handlers.py").read_text() == SEED_STEP1
    assert list(agent.store.backups_dir.iterdir()) == []
    assert (await client.call("camera_status"))["success"] is True


async def test_seed_broken_code_gets_the_syntax_error_and_nothing_breaks(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "camera_handlers.py", SEED_STEP1)
    reply = await deploy(client, "camera_handlers.py", fixture_text("seed_broken_code.py.txt"))
    assert reply["success"] is False
    assert re.match(r"^Code validation failed: Syntax Error at line \d+: .+", reply["error"]), reply["error"]
    assert (await client.call("camera_status"))["success"] is True


# Over real sockets, a few of each; every case is in test_lint.py, called directly.
DANGEROUS = {
    "os.system": "import os\nos.system('ls')\n",
    "shell=True": "import subprocess\nsubprocess.run('ls', shell=True)\n",
    "sh -c in a list": "import subprocess\nsubprocess.run(['sh', '-c', 'ls'])\n",
    "sys.modules": "import sys\nsys.modules['os'].system('ls')\n",
}


@pytest.mark.parametrize("source", DANGEROUS.values(), ids=DANGEROUS.keys())
async def test_every_dangerous_form_is_refused(start_agent, connect, source):
    agent = await start_agent()
    client = await connect(agent)
    reply = await deploy(client, "risky.py", "def handle_risky(data):\n    return {}\n" + source)
    assert reply["success"] is False and reply["code"] == "validation_failed", reply
    assert reply["error"].startswith("Code validation failed: Dangerous pattern detected: ")
    assert all("(line " in e for e in reply["validation_details"]["errors"])
    assert not (agent.store.handlers_dir / "risky.py").exists()


def test_every_reason_is_listed_not_only_the_first():
    from agent.checks import check_code

    report = check_code("import os\nos.system('a')\neval('b')\nimport ctypes\n", "x.py")
    texts = [e.text() for e in report.errors]
    assert texts == [
        "Dangerous pattern detected: os.system( (line 2)",
        "Dangerous pattern detected: eval( (line 3)",
        "Dangerous pattern detected: import ctypes (line 4)",
    ]


ALLOWED = {
    "Popen with a list": "import subprocess\ndef start():\n    return subprocess.Popen(['raspivid', '-o', 'x.h264'])\n",
    "unlink under /tmp": "import os\ndef clean():\n    os.unlink('/tmp/camera.lock')\n",
    "log says rm -rf": "import logging\nlogging.getLogger(__name__).info('never rm -rf the card')\n",
}


@pytest.mark.parametrize("source", ALLOWED.values(), ids=ALLOWED.keys())
async def test_ordinary_code_is_not_refused(start_agent, connect, source):
    client = await connect(await start_agent())
    reply = await deploy(client, "fine.py", source + "\ndef handle_fine(data):\n    return {}\n")
    assert reply["success"] is True, reply


BAD_FILENAMES = [
    "../main.py", "../../etc/cron.py", "/etc/passwd.py", "handlers/../main.py", "sub/x.py",
    "handlers/sub/x.py", "x.txt", "x", "_private.py", "handlers/_x.py", "class.py", "1abc.py",
    "x-y.py", "", "x.py\x00.txt", "C:\\x.py", "..", 5, None,
]


@pytest.mark.parametrize("filename", BAD_FILENAMES)
async def test_bad_filenames_are_refused_and_nothing_is_written(start_agent, connect, filename, tmp_path):
    agent = await start_agent()
    client = await connect(agent)
    reply = await client.call("update_handler", filename=filename, code="def handle_x(d):\n    return {}\n")
    assert reply["success"] is False and reply["code"] == "bad_request", reply
    assert "filename" in reply["error"]
    assert list(agent.store.handlers_dir.iterdir()) == []
    assert not (agent.config.root / "main.py").exists()


async def test_a_symlinked_handler_file_is_refused(start_agent, connect, tmp_path):
    agent = await start_agent()
    outside = tmp_path / "outside.py"
    outside.write_text("ORIGINAL = True\n")
    (agent.store.handlers_dir / "linked.py").symlink_to(outside)
    client = await connect(agent)
    reply = await deploy(client, "linked.py", "def handle_x(d):\n    return {}\n")
    assert reply["code"] == "bad_request" and "symbolic link" in reply["error"]
    assert outside.read_text() == "ORIGINAL = True\n"


@pytest.mark.parametrize("source", [
    "import agent\n",
    "import agent.server\n",
    "from agent import deploy\n",
    "from agent.registry import Registry\n",
    "import core.updater\n",
    "from core import validator\n",
])
async def test_protected_imports_are_refused(start_agent, connect, source):
    client = await connect(await start_agent())
    reply = await deploy(client, "sneaky.py", source + "def handle_x(d):\n    return {}\n")
    assert reply["code"] == "validation_failed"
    assert reply["error"].startswith("Code validation failed: Protected import detected: ")


async def test_a_missing_dependency_is_named(start_agent, connect):
    client = await connect(await start_agent())
    reply = await deploy(client, "needs.py", "import surely_not_installed_xyz\ndef handle_x(d):\n    return {}\n")
    assert reply["code"] == "validation_failed" and "surely_not_installed_xyz" in reply["error"]
    assert "install it there, or import it inside try/except ImportError" in reply["error"]


IMPORT_FAILURES = {
    "hangs": ("import time\ntime.sleep(600)\n", "did not finish within 1 s"),
    "sys.exit": ("import sys\nsys.exit(2)\n", "sys.exit(2)"),
    "os._exit": ("import os\nos._exit(7)\n", "exit status 7"),
    "segfault": ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "SIGSEGV"),
    "memory": ("hog = bytearray(4 * 1024 ** 3)\n", "ran out of memory"),
    "raises": ("raise RuntimeError('no such sensor')\n", "RuntimeError at import (line 1): no such sensor"),
}


@pytest.mark.parametrize("case", IMPORT_FAILURES.values(), ids=IMPORT_FAILURES.keys())
async def test_imports_that_hang_exit_or_crash_are_refused_while_ping_answers(start_agent, connect, case):
    source, words = case
    agent = await start_agent(import_timeout=1.0, import_memory_mb=256)
    deployer = await connect(agent)
    prober = await connect(agent)
    await deploy(deployer, "good.py", version_module(1))
    await deployer.send({"command": "update_handler", "filename": "good.py",
                         "code": source + version_module(2), "id": "push"})
    pings = 0
    reply_task = asyncio.ensure_future(deployer.reply())
    while not reply_task.done():  # the agent keeps answering while the import test runs
        assert (await prober.call("ping"))["message"] == "pong"
        pings += 1
    reply = reply_task.result()
    assert pings >= 1
    assert reply["success"] is False and reply["code"] == "import_failed", reply
    assert reply["error"].startswith("Code validation failed: Import test failed: ")
    assert words in reply["error"]
    assert (await prober.call("version"))["version"] == 1
    assert (agent.store.handlers_dir / "good.py").read_text() == version_module(1)


@pytest.mark.parametrize("source, words", [
    ("COMMAND_HANDLERS = {'x': 42}\n", "is int, not a function"),
    ("def handle_two(a, b):\n    return {}\n", "exactly one argument"),
    ("def handle_x(d):\n    return {}\ndef self_test():\n    raise AssertionError('camera missing')\n", "camera missing"),
    ("def handle_get_status(d):\n    return {}\n", "built-in"),
])
async def test_runtime_test_failures_are_refused(start_agent, connect, source, words):
    client = await connect(await start_agent())
    reply = await deploy(client, "odd.py", source)
    assert reply["code"] == "validation_failed" and words in reply["error"], reply
    assert reply["error"].startswith("Code validation failed: Runtime test failed: ")


async def test_a_push_whose_command_another_module_offers_is_refused_naming_both(start_agent, connect):
    client = await connect(await start_agent())
    assert (await deploy(client, "first.py", "def handle_shared(d):\n    return {}\n"))["success"]
    reply = await deploy(client, "second.py", "def handle_shared(d):\n    return {}\n")
    assert reply["code"] == "validation_failed" and "first.py" in reply["error"] and "second.py" in reply["error"]


async def test_module_without_commands_deploys_with_a_warning(start_agent, connect):
    client = await connect(await start_agent())
    reply = await deploy(client, "helpers.py", "X = 1\n")
    assert reply["success"] is True and "defines no commands" in reply["validation"]["warnings"][0]


async def test_dry_run_checks_everything_and_changes_nothing(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    reply = await deploy(client, "ver.py", version_module(2) + "def handle_extra(d):\n    return {}\n", dry_run=True)
    assert reply["success"] is True and reply["dry_run"] is True
    assert reply["reload"]["commands"] == ["version", "extra"] and reply["backup_created"] is None
    assert (agent.store.handlers_dir / "ver.py").read_text() == version_module(1)
    assert (await client.call("extra"))["code"] == "unknown_command"
    assert (await client.call("list_backups"))["backups"] == []
    bad = await deploy(client, "ver.py", "import os\nos.system('x')\n", dry_run=True)
    assert bad["code"] == "validation_failed"


async def test_sha256_must_match_the_code(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    code = version_module(1)
    wrong = await deploy(client, "ver.py", code, sha256="0" * 64)
    assert wrong["code"] == "checksum_mismatch" and not (agent.store.handlers_dir / "ver.py").exists()
    right = await deploy(client, "ver.py", code, sha256=sha(code).upper())
    assert right["success"] is True


async def test_pushing_the_live_code_again_is_an_unchanged_no_op(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    first = await deploy(client, "ver.py", version_module(1))
    again = await deploy(client, "ver.py", version_module(1))
    assert again["success"] is True and again["unchanged"] is True and again["backup_created"] is None
    assert again["version"] == first["version"] and again["reload"]["commands"] == ["version"]
    assert (await client.call("list_backups"))["backups"] == []


async def test_rollback_restores_the_previous_version_and_can_itself_be_undone(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    await deploy(client, "ver.py", version_module(2))
    assert (await client.call("version"))["version"] == 2
    back = await client.call("rollback_handler", filename="ver.py")
    assert back["success"] is True and back["reload"]["commands"] == ["version"], back
    assert back["restored_from"].startswith("handlers_ver.py_") and back["backup_created"]
    assert back["message"].startswith("Handler ver.py rolled back to ")
    assert (await client.call("version"))["version"] == 1
    assert (agent.store.handlers_dir / "ver.py").read_text() == version_module(1)
    undo = await client.call("rollback_handler", filename="ver.py")
    assert undo["success"] is True and (await client.call("version"))["version"] == 2


async def test_rollback_to_a_named_backup(start_agent, connect):
    client = await connect(await start_agent())
    for n in (1, 2, 3):
        await deploy(client, "ver.py", version_module(n))
    backups = (await client.call("list_backups", filename="ver.py"))["backups"]
    oldest = backups[-1]
    assert oldest["sha256"] == sha(version_module(1))
    reply = await client.call("rollback_handler", filename="ver.py", backup=oldest["backup"])
    assert reply["success"] is True and (await client.call("version"))["version"] == 1
    missing = await client.call("rollback_handler", filename="ver.py", backup="handlers_ver.py_20000101_000000.backup")
    assert missing["code"] == "not_found"
    foreign = await client.call("rollback_handler", filename="ver.py", backup="handlers_other.py_20000101_000000.backup")
    assert foreign["code"] == "bad_request"


def held_version(flag: Path, n: int, fail: bool = False) -> str:
    """Version ``n`` of ver.py, whose import waits until ``flag`` exists (then fails, with ``fail``)."""
    return waits_for(flag) + ("raise RuntimeError('broken on purpose')\n" if fail else "") + version_module(n)


async def test_a_conditional_rollback_waits_for_a_running_push_and_undoes_only_that_version(start_agent, connect,
                                                                                          flag_dir):
    """``if_version`` + ``to_version``: how a controller undoes a push whose reply it never got."""
    client = await connect(await start_agent())
    await deploy(client, "ver.py", version_module(1))
    for fail in (False, True):
        flag = flag_dir / f"go-{fail}"
        pushed = held_version(flag, 2, fail)
        # Both requests in one write: the push takes the file's lock first, the undo queues behind it.
        await client.send_raw(
            (json.dumps({"command": "update_handler", "filename": "ver.py", "code": pushed, "id": "push"}) + "\n"
             + json.dumps({"command": "rollback_handler", "filename": "ver.py", "id": "undo",
                           "if_version": sha(pushed), "to_version": sha(version_module(1))}) + "\n").encode())
        flag.touch()
        push, undo = await client.reply(), await client.reply()
        assert (push["id"], undo["id"]) == ("push", "undo")
        if fail:  # the push was refused: nothing to undo, and the undo does not roll back further
            assert push["success"] is False and undo["success"] is True and undo["unchanged"] is True
            assert undo["version"] == sha(version_module(1)) and "nothing was changed" in undo["message"]
        else:  # the push landed first; the undo saw it and put version 1 back
            assert push["success"] is True and undo["success"] is True and not undo.get("unchanged")
            assert undo["previous_version"] == sha(pushed) and undo["version"] == sha(version_module(1))
        assert (await client.call("version"))["version"] == 1


async def test_conditional_rollback_and_delete_leave_another_version_alone(start_agent, connect):
    client = await connect(await start_agent())
    for n in (1, 2):
        await deploy(client, "ver.py", version_module(n))
    other = sha(version_module(3))
    for command in ("rollback_handler", "delete_handler"):
        reply = await client.call(command, filename="ver.py", if_version=other)
        assert reply["success"] is True and reply["unchanged"] is True and reply["type"] == "handler_unchanged"
        assert (await client.call("version"))["version"] == 2
    missing = await client.call("rollback_handler", filename="ver.py", to_version=other)
    assert missing["code"] == "not_found" and other[:12] in missing["error"]
    assert (await client.call("delete_handler", filename="ver.py", if_version=sha(version_module(2)).upper()))["success"]
    assert (await client.call("version"))["code"] == "unknown_command"
    for bad in ({"if_version": "abc"}, {"to_version": 5}, {"backup": "x", "to_version": other}):
        assert (await client.call("rollback_handler", filename="ver.py", **bad))["code"] == "bad_request"


async def test_rollback_without_a_backup_is_not_found(start_agent, connect):
    client = await connect(await start_agent())
    await deploy(client, "ver.py", version_module(1))
    reply = await client.call("rollback_handler", filename="ver.py")
    assert reply["code"] == "not_found" and "no backup" in reply["error"]


async def test_delete_unloads_commands_and_keeps_a_backup(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    reply = await client.call("delete_handler", filename="ver.py", backup=True)
    assert reply["success"] is True and reply["removed_commands"] == ["version"]
    assert not (agent.store.handlers_dir / "ver.py").exists()
    assert (agent.config.root / reply["backup_created"]).read_text() == version_module(1)
    assert (await client.call("version"))["code"] == "unknown_command"
    assert (await client.call("delete_handler", filename="ver.py"))["code"] == "not_found"
    # and it can be brought back
    restored = await client.call("rollback_handler", filename="ver.py")
    assert restored["success"] is True and (await client.call("version"))["version"] == 1


async def test_backups_are_listed_newest_first_and_pruned(start_agent, connect):
    client = await connect(await start_agent(keep_backups=3))
    for n in range(1, 7):
        await deploy(client, "ver.py", version_module(n))
    backups = (await client.call("list_backups", filename="ver.py"))["backups"]
    assert len(backups) == 3
    kept = [b["sha256"] for b in backups]
    assert kept == [sha(version_module(n)) for n in (5, 4, 3)]


async def test_update_log_records_every_change_newest_first(start_agent, connect):
    client = await connect(await start_agent())
    await deploy(client, "ver.py", version_module(1))
    await deploy(client, "ver.py", version_module(2))
    await client.call("rollback_handler", filename="ver.py")
    await client.call("delete_handler", filename="ver.py")
    entries = (await client.call("update_log"))["entries"]
    assert [e["action"] for e in entries] == ["delete", "rollback", "deploy", "deploy"]
    assert entries[-1]["version"] == sha(version_module(1))
    assert len((await client.call("update_log", limit=2))["entries"]) == 2
    assert (await client.call("update_log", limit=0))["code"] == "bad_request"


async def test_on_reload_hands_the_old_module_to_the_new_one(start_agent, connect):
    client = await connect(await start_agent())
    v1 = "STATE = {'count': 0}\ndef handle_bump(d):\n    STATE['count'] += 1\n    return dict(STATE)\n"
    v2 = v1 + "\ndef on_reload(previous):\n    STATE.update(previous.STATE)\n"
    await deploy(client, "counter.py", v1)
    for _ in range(3):
        await client.call("bump")
    reply = await deploy(client, "counter.py", v2)
    assert reply["success"] is True and reply["validation"]["warnings"] == []
    assert (await client.call("bump"))["count"] == 4


async def test_a_failing_on_reload_is_reported_as_a_warning(start_agent, connect):
    client = await connect(await start_agent())
    await deploy(client, "c.py", version_module(1))
    reply = await deploy(client, "c.py", version_module(2) + "def on_reload(previous):\n    raise ValueError('x')\n")
    assert reply["success"] is True
    assert any("on_reload() raised ValueError" in w for w in reply["validation"]["warnings"])


async def test_a_module_that_passes_isolation_but_fails_to_load_is_put_back(start_agent, connect):
    # The import-test child has one thread; the agent has several. This module can tell.
    sneaky = ("import threading\nif threading.active_count() > 1:\n    raise RuntimeError('only in the agent')\n"
              + version_module(2))
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    reply = await deploy(client, "ver.py", sneaky)
    assert reply["success"] is False and reply["rolled_back"] is True and reply["code"] == "load_failed"
    assert "only in the agent" in reply["error"]
    assert (agent.store.handlers_dir / "ver.py").read_text() == version_module(1)
    assert (await client.call("version"))["version"] == 1
    assert (await client.call("list_backups"))["backups"] == []


async def test_concurrent_deploys_of_one_file_are_serialised(start_agent, connect):
    agent = await start_agent()
    clients = [await connect(agent) for _ in range(5)]
    replies = await asyncio.gather(*(deploy(c, "ver.py", version_module(n)) for n, c in enumerate(clients, 1)))
    assert all(r["success"] for r in replies)
    # Each deploy saw the one before it: the previous versions form a chain with no gaps.
    previous = {r["previous_version"] for r in replies}
    versions = {r["version"] for r in replies}
    assert len(previous & versions) == 4 and None in previous
    assert len((await clients[0].call("list_backups"))["backups"]) == 4


async def test_bad_arguments_to_deploy_commands(start_agent, connect):
    client = await connect(await start_agent())
    assert (await client.call("update_handler", filename="x.py"))["code"] == "bad_request"
    assert (await client.call("update_handler", filename="x.py", code=5))["code"] == "bad_request"
    assert (await client.call("update_handler", filename="x.py", code="X=1\n", dry_run="yes"))["code"] == "bad_request"
    assert (await client.call("update_handler", filename="x.py", code="X=1\n", probation="long"))["code"] == "bad_request"
    assert (await client.call("rollback_handler"))["code"] == "bad_request"
    assert (await client.call("list_backups", filename="../x.py"))["code"] == "bad_request"


async def test_concurrent_deploys_of_different_files_all_succeed(start_agent, connect):
    # Different files deploy in parallel worker threads. (This is where CPython's
    # non-thread-safe ast.parse once failed under load; see checks._PARSE_LOCK.)
    agent = await start_agent()
    clients = [await connect(agent) for _ in range(12)]
    big = "\n".join(f"def f{i}(x):\n    return [(a, b) for a in range(x) for b in {{i: x}}]" for i in range(300))
    replies = await asyncio.gather(*(
        deploy(c, f"mod{n}.py", big + f"\ndef handle_cmd{n}(d):\n    return {{}}\n") for n, c in enumerate(clients)))
    assert all(r["success"] for r in replies), [r.get("error") for r in replies if not r["success"]]


# A device whose storage refuses writes (a full SD card, or one that turned read-only)

DISK_LIMIT = 64 * 1024  # the largest file the agent process below may write


def small_disk() -> None:
    """In the agent's process before it starts: the kernel refuses writes past DISK_LIMIT (EFBIG)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT, DISK_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process


async def test_a_push_the_disk_refuses_changes_nothing_and_says_why(tmp_path, spawn_agent):
    root = tmp_path / "device"
    (root / "handlers").mkdir(parents=True)
    # Placed before the agent ran, as if written long ago.
    (root / "handlers" / "big.py").write_text("def handle_big(data):\n    return {}\n" + "#" * DISK_LIMIT + "\n")
    client = await Client.connect(spawn_agent(root=root, preexec_fn=small_disk).address)
    try:
        await deploy(client, "ver.py", version_module(1))
        reply = await deploy(client, "ver.py", version_module(2) + "#" * DISK_LIMIT + "\n")
        assert reply["code"] == "storage_error", reply
        assert "File too large" in reply["error"] and "nothing was changed" in reply["error"]
        assert (await client.call("version"))["version"] == 1
        assert (root / "handlers" / "ver.py").read_text() == version_module(1)
        assert (await client.call("list_backups", filename="ver.py"))["backups"] == []  # no stray copy left
        # A delete that cannot make its backup leaves the file and its commands alone.
        refused = await client.call("delete_handler", filename="big.py", backup=True)
        assert refused["code"] == "storage_error" and "its commands still run" in refused["error"]
        assert (await client.call("big"))["success"] is True and (root / "handlers" / "big.py").exists()
    finally:
        await client.close()


async def test_a_deploy_that_landed_but_could_not_be_logged_says_both(tmp_path, spawn_agent):
    root = tmp_path / "device"
    (root / ".state").mkdir(parents=True)
    (root / ".state" / "update_log.jsonl").write_text("#" * (DISK_LIMIT - 10) + "\n")  # one line short of full
    client = await Client.connect(spawn_agent(root=root, preexec_fn=small_disk).address)
    try:
        reply = await deploy(client, "ver.py", version_module(1))
        assert reply["success"] is True, reply
        assert reply["validation"]["warnings"] == [
            "the change was made, but writing the update log failed: File too large"]
        assert (await client.call("version"))["version"] == 1
    finally:
        await client.close()


async def test_a_push_past_the_handler_file_cap_is_a_storage_error_that_changes_nothing(start_agent, connect):
    agent = await start_agent(max_handler_files=1)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    reply = await deploy(client, "other.py", "def handle_other(data):\n    return {}\n")
    assert reply["code"] == "storage_error" and "--max-handler-files 1" in reply["error"]
    assert [p.name for p in agent.store.handlers_dir.iterdir()] == ["ver.py"]
    assert (await client.call("other"))["code"] == "unknown_command"
    assert (await client.call("update_log"))["entries"][0]["file"] == "ver.py"
