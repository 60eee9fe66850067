"""What keeps a device alive without anyone touching it: probation, start-up integrity, kill -9."""

import asyncio
import hashlib
import json
import random

from conftest import Client, sha, wait_until
from test_deploy import DISK_LIMIT, deploy, small_disk, version_module

FLAKY_V2 = (
    "VERSION = 2\n"
    "def handle_version(data):\n"
    "    if data.get('polite'):\n"
    "        return {'success': False, 'error': 'declined'}\n"
    "    raise RuntimeError('bug that only shows up at runtime')\n"
)


async def test_probation_rolls_back_a_module_that_keeps_failing(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    reply = await deploy(client, "ver.py", FLAKY_V2, probation={"failures": 3, "calls": 20})
    assert reply["probation"]["rule"] == {"seconds": 600.0, "calls": 20, "failures": 3}
    for _ in range(4):  # success: false is an answer, not a failure
        assert (await client.call("version", polite=True))["error"] == "declined"
    for _ in range(3):
        assert (await client.call("version"))["code"] == "handler_error"
    await wait_until(lambda: agent.recovery.auto_rollbacks, what="the automatic rollback")
    assert (await client.call("version"))["version"] == 1
    status = await client.call("get_status")
    (rollback,) = status["auto_rollbacks"]
    assert rollback["outcome"] == "rolled_back" and "3 of 7 calls failed" in rollback["reason"]
    assert "bug that only shows up at runtime" in rollback["reason"]
    assert status["probation"] == []
    latest = (await client.call("update_log", limit=1))["entries"][0]
    assert latest["action"] == "auto_rollback" and "probation" in latest["reason"]
    assert latest["version"] == sha(version_module(1))


async def test_a_rollback_after_the_automatic_one_does_not_put_the_failing_code_back(start_agent, connect):
    # The operator sees errors and sends rollback_handler, not knowing the agent already rolled back.
    agent = await start_agent(probation_failures=2)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    await deploy(client, "ver.py", FLAKY_V2)
    for _ in range(2):
        await client.call("version")
    await wait_until(lambda: agent.recovery.auto_rollbacks, what="the automatic rollback")
    reply = await client.call("rollback_handler", filename="ver.py")
    assert reply["code"] == "not_found" and "probation rolled back" in reply["error"]
    assert sha(FLAKY_V2)[:12] in reply["error"]
    assert (await client.call("version"))["version"] == 1
    # Pushed again on purpose, it is a version like any other: a later rollback may return to it.
    await deploy(client, "ver.py", FLAKY_V2, probation=False)
    await deploy(client, "ver.py", version_module(3))
    await client.call("rollback_handler", filename="ver.py")
    assert agent.registry.modules["ver"].sha256 == sha(FLAKY_V2)


async def test_probation_false_leaves_a_failing_module_alone(start_agent, connect):
    agent = await start_agent(probation_failures=2)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    assert (await deploy(client, "ver.py", FLAKY_V2, probation=False))["probation"] is None
    for _ in range(5):
        assert (await client.call("version"))["code"] == "handler_error"
    assert agent.recovery.auto_rollbacks == []
    assert agent.registry.modules["ver"].sha256 == sha(FLAKY_V2)


async def test_probation_ends_after_enough_good_calls(start_agent, connect):
    agent = await start_agent(probation_calls=5, probation_failures=2)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    await deploy(client, "ver.py", FLAKY_V2)
    for _ in range(5):
        await client.call("version", polite=True)
    assert (await client.call("get_status"))["probation"] == []
    for _ in range(3):
        await client.call("version")
    assert agent.recovery.auto_rollbacks == []


async def test_a_new_module_that_fails_probation_is_unloaded(start_agent, connect):
    agent = await start_agent(probation_failures=2)
    client = await connect(agent)
    await deploy(client, "flaky.py", FLAKY_V2)
    for _ in range(2):
        await client.call("version")
    await wait_until(lambda: agent.recovery.auto_rollbacks, what="the automatic rollback")
    assert agent.recovery.auto_rollbacks[0]["outcome"] == "unloaded"
    assert (await client.call("version"))["code"] == "unknown_command"
    assert not (agent.store.handlers_dir / "flaky.py").exists()
    # Its backup is the version probation removed: a plain rollback must not bring it back.
    assert (await client.call("rollback_handler", filename="flaky.py"))["code"] == "not_found"
    assert not (agent.store.handlers_dir / "flaky.py").exists()


async def test_an_agent_that_cannot_write_its_restore_still_starts_and_says_so(tmp_path, spawn_agent):
    # A broken handler file and a good copy the storage refuses to write back (as on a card that
    # turned read-only): the agent must still come up, or nobody could reach the device to see why.
    root = tmp_path / "device"
    (root / "handlers").mkdir(parents=True)
    (root / ".state" / "good").mkdir(parents=True)
    (root / "handlers" / "ver.py").write_text("def handle_version(:\n")
    (root / ".state" / "good" / "ver.py").write_text(version_module(1) + "#" * DISK_LIMIT + "\n")
    client = await Client.connect(spawn_agent(root=root, preexec_fn=small_disk).address)
    try:
        assert (await client.call("version"))["version"] == 1  # the good copy runs
        (finding,) = (await client.call("get_status"))["integrity"]
        assert finding["status"] == "restored_in_memory"
        assert "writing it back to the file failed: File too large" in finding["detail"]
        assert (root / "handlers" / "ver.py").read_text() == "def handle_version(:\n"
    finally:
        await client.close()


async def test_a_hand_edited_handler_is_reported_at_start(start_agent, connect, tmp_path):
    root = tmp_path / "device"
    agent = await start_agent(root=root)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    await agent.close()
    (root / "handlers" / "ver.py").write_text(version_module(7))  # valid, but not what was deployed
    again = await start_agent(root=root)
    client = await connect(again)
    (issue,) = (await client.call("get_status"))["integrity"]
    assert issue["file"] == "ver.py" and issue["status"] == "modified"
    assert (await client.call("version"))["version"] == 7  # it still loads: reported, not overruled


async def test_a_corrupt_handler_is_replaced_by_its_last_good_copy_at_start(start_agent, connect, tmp_path):
    root = tmp_path / "device"
    agent = await start_agent(root=root)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    await agent.close()
    live = root / "handlers" / "ver.py"
    live.write_bytes(live.read_bytes()[:17])  # an SD card that lost the end of the file
    again = await start_agent(root=root)
    client = await connect(again)
    status = await client.call("get_status")
    (issue,) = status["integrity"]
    assert issue["status"] == "restored" and "last good copy" in issue["detail"]
    assert status["failed_modules"] == []
    assert (await client.call("version"))["version"] == 1
    assert live.read_text() == version_module(1)
    assert (await client.call("update_log", limit=1))["entries"][0]["action"] == "restore"


async def test_kill_9_during_deploys_never_leaves_a_truncated_file(tmp_path, spawn_agent):
    root = tmp_path / "device"
    rng = random.Random(1234)
    # Big enough that writing it takes a moment, so kills land mid-deploy too.
    versions = [version_module(n) + "\n# padding\n" + "X = 1\n" * 20000 for n in range(1, 6)]
    valid = {sha(v): v for v in versions}
    proc = spawn_agent(root=root)
    client = await Client.connect(proc.address)
    assert (await client.call("update_handler", filename="ver.py", code=versions[0]))["success"]
    await client.close()
    proc.kill()
    for attempt in range(8):
        proc = spawn_agent(root=root)
        client = await Client.connect(proc.address)
        status = await client.call("get_status")
        (module,) = status["modules"]
        assert module["sha256"] in valid, f"attempt {attempt}: live file is not a whole version"
        await client.call("update_log")  # the log is readable
        assert (await client.call("list_backups"))["success"] is True
        await client.send({"command": "update_handler", "filename": "ver.py", "code": versions[attempt % 4 + 1]})
        # Fault injection: kill at a random moment during the deploy (not synchronisation).
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        await client.close()
        on_disk = (root / "handlers" / "ver.py").read_bytes()
        assert hashlib.sha256(on_disk).hexdigest() in valid, f"attempt {attempt}: truncated handler file"
        for backup in (root / ".backups").iterdir():
            assert hashlib.sha256(backup.read_bytes()).hexdigest() in valid, backup.name
        for line in (root / ".state" / "update_log.jsonl").read_text().splitlines()[:-1]:
            json.loads(line)  # every line but a possibly torn last one is whole
    proc = spawn_agent(root=root)
    client = await Client.connect(proc.address)
    assert (await client.call("ping"))["message"] == "pong"
    (module,) = (await client.call("get_status"))["modules"]
    assert module["sha256"] in valid
    await client.close()


async def test_a_clients_bad_arguments_are_not_held_against_the_module(start_agent, connect):
    # A malformed 'timeout' is the client's mistake: it must not count as a handler failure,
    # neither in handler_stats nor towards probation's automatic rollback.
    agent = await start_agent(probation_failures=2)
    client = await connect(agent)
    await deploy(client, "ver.py", version_module(1))
    await deploy(client, "ver.py", version_module(2))
    for bad in ("soon", -1, 0):
        assert (await client.call("version", timeout=bad))["code"] == "bad_request"
    assert agent.recovery.auto_rollbacks == []
    assert (await client.call("version"))["version"] == 2
    stats = (await client.call("handler_stats"))["stats"]["version"]
    assert stats["calls"] == 1 and stats["errors"] == 0
