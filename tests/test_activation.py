"""Crash-safe activation: whatever a module does when the agent loads it for real, the device comes back.

Each module here behaves during the isolated import test and misbehaves only
inside the agent (``REAL``: the agent's own modules are loaded), which is
what no check before the real load can see. The tests run real agent
processes and restart them as a supervisor would.
"""

import asyncio
import json

import pytest

from conftest import REPLY_TIMEOUT, Client, sha
from fleet.cli import main as fleet_main
from test_deploy import DISK_LIMIT, deploy, small_disk, version_module

GUARD = "import sys\nREAL = 'agent.app' in sys.modules  # never true in the import test's box\n"
KILLERS = {
    "os._exit": "import os\nif REAL:\n    os._exit(3)\n",
    "segfault": "import faulthandler\nif REAL:\n    faulthandler._sigsegv()\n",
    "SIGKILL": "import os, signal\nif REAL:\n    os.kill(os.getpid(), signal.SIGKILL)\n",
}
HANGS = "import time\nif REAL:\n    time.sleep(3600)\n"
UTF7 = "# -*- coding: utf_7 -*-\n" + version_module(2) + "#+AAo-import os; os._exit(9)\n"  # +AAo- is a newline


def killer(kind: str) -> str:
    return GUARD + KILLERS[kind] + version_module(2)


async def push_that_kills(agent, code: str, **fields) -> None:
    """Push ``code``; the agent dies before it can answer."""
    client = await Client.connect(agent.address)
    try:
        await client.send({"command": "update_handler", "filename": "ver.py", "code": code, **fields})
        with pytest.raises(ConnectionError):
            await client.reply()
    finally:
        await client.close()
    assert agent.proc.wait(timeout=REPLY_TIMEOUT) != 0


async def first_version(agent) -> None:
    client = await Client.connect(agent.address)
    try:
        assert (await deploy(client, "ver.py", version_module(1)))["success"] is True
    finally:
        await client.close()


@pytest.mark.parametrize("kind", KILLERS)
async def test_a_module_that_kills_the_agent_on_its_real_load_is_quarantined_after_one_restart(
        tmp_path, spawn_agent, kind):
    root = tmp_path / "device"
    first = spawn_agent(root=root)
    await first_version(first)
    await push_that_kills(first, killer(kind))
    again = spawn_agent(root=root)  # the supervisor's one restart
    client = await Client.connect(again.address)
    try:
        assert (await client.call("version"))["version"] == 1
        assert (root / "handlers" / "ver.py").read_text() == version_module(1)
        status = await client.call("get_status")
        (entry,) = status["quarantine"]
        assert entry["version"] == sha(killer(kind)) and "stopped while loading it" in entry["reason"]
        (finding,) = status["integrity"]
        assert finding["status"] == "quarantined" and sha(version_module(1))[:12] in finding["detail"]
        assert (root / ".state" / "quarantine" / f"ver.{sha(killer(kind))}.py").read_text() == killer(kind)
        refused = await deploy(client, "ver.py", killer(kind))
        assert refused["code"] == "quarantined" and '"force": true' in refused["error"]
        assert (await client.call("version"))["version"] == 1
        forced = await deploy(client, "ver.py", killer(kind), force=True, dry_run=True)
        assert forced["success"] is True and forced["dry_run"] is True  # checked again; still quarantined
        assert (await deploy(client, "ver.py", killer(kind)))["code"] == "quarantined"
        log = (await client.call("update_log", limit=1))["entries"][0]
        assert log["action"] == "quarantine" and log["version"] == sha(version_module(1))
    finally:
        await client.close()


async def test_every_push_of_a_killer_costs_one_restart_and_never_two(tmp_path, spawn_agent):
    root = tmp_path / "device"
    agent = spawn_agent(root=root)
    await first_version(agent)
    await push_that_kills(agent, killer("os._exit"))
    for _ in range(2):  # the operator insists, with force: each push costs exactly one restart
        agent = spawn_agent(root=root)
        client = await Client.connect(agent.address)
        try:
            assert (await client.call("version"))["version"] == 1
        finally:
            await client.close()
        await push_that_kills(agent, killer("os._exit"), force=True)
    client = await Client.connect(spawn_agent(root=root).address)
    try:
        assert (await client.call("version"))["version"] == 1
    finally:
        await client.close()


async def test_a_new_module_that_kills_the_agent_is_left_out_after_the_restart(tmp_path, spawn_agent):
    root = tmp_path / "device"
    await push_that_kills(spawn_agent(root=root), killer("SIGKILL"))
    client = await Client.connect(spawn_agent(root=root).address)
    try:
        assert (await client.call("version"))["code"] == "unknown_command"
        assert not (root / "handlers" / "ver.py").exists()
        status = await client.call("get_status")
        assert "left out" in status["integrity"][0]["detail"] and status["quarantine"][0]["file"] == "ver.py"
    finally:
        await client.close()


async def test_a_module_that_hangs_on_its_real_load_is_undone_and_quarantined(tmp_path, spawn_agent):
    root = tmp_path / "device"
    agent = spawn_agent("--import-timeout", "1", root=root)
    client = await Client.connect(agent.address)
    try:
        await deploy(client, "ver.py", version_module(1))
        hangs = GUARD + HANGS + version_module(2)
        reply = await deploy(client, "ver.py", hangs)
        assert reply["code"] == "load_failed" and reply["rolled_back"] is True and reply["quarantined"] is True
        assert "did not finish loading within 1 s" in reply["error"] and "previous version is still live" in reply["error"]
        assert (await client.call("version"))["version"] == 1
        status = await client.call("get_status")
        assert status["stuck_threads"]["loads"] == 1 and status["quarantine"][0]["version"] == sha(hangs)
        assert (await deploy(client, "ver.py", hangs))["code"] == "quarantined"
    finally:
        await client.close()
    assert agent.terminate() == 0  # the stuck thread does not keep the agent from stopping
    client = await Client.connect(spawn_agent("--import-timeout", "1", root=root).address)
    try:
        assert (await client.call("version"))["version"] == 1
        assert (await deploy(client, "ver.py", hangs))["code"] == "quarantined"
    finally:
        await client.close()


async def test_a_coding_declaration_other_than_utf8_is_refused_and_never_loaded(tmp_path, spawn_agent):
    root = tmp_path / "device"
    agent = spawn_agent(root=root)
    client = await Client.connect(agent.address)
    try:
        await deploy(client, "ver.py", version_module(1))
        reply = await deploy(client, "ver.py", UTF7)
        assert reply["code"] == "validation_failed" and "declares the encoding 'utf_7'" in reply["error"]
        assert (await client.call("version"))["version"] == 1
    finally:
        await client.close()
    agent.terminate()
    (root / "handlers" / "ver.py").write_text(UTF7)  # copied onto the card by hand
    client = await Client.connect(spawn_agent(root=root).address)
    try:
        assert (await client.call("version"))["version"] == 1  # its last good copy is back
        (finding,) = (await client.call("get_status"))["integrity"]
        assert finding["status"] == "restored" and "utf_7" in finding["detail"]
    finally:
        await client.close()


def test_fleet_status_lists_the_quarantine_under_the_table(tmp_path, spawn_agent, capsys):
    root = tmp_path / "device"
    agent = spawn_agent(root=root)

    async def kill_it():
        await first_version(agent)
        await push_that_kills(agent, killer("os._exit"))

    asyncio.run(kill_it())
    again = spawn_agent(root=root)
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"raspberryPiDevices": [
        {"id": "cam1", "host": "127.0.0.1", "port": again.address[1]}]}))
    assert fleet_main(["-d", str(devices), "status"]) == 0
    out, _ = capsys.readouterr()
    assert f"ver.py at {sha(killer('os._exit'))[:12]} quarantined" in out
    assert "the agent stopped while loading it" in out


async def test_a_version_that_cannot_be_quarantined_is_still_not_loaded_again(tmp_path, spawn_agent):
    """The card refuses every write, so recovery cannot move the killer aside: it must still not load it."""
    root = tmp_path / "device"
    (root / "handlers").mkdir(parents=True)
    (root / ".state" / "activating").mkdir(parents=True)
    code = killer("os._exit") + "#" * DISK_LIMIT + "\n"  # too big for the card to copy into quarantine
    (root / "handlers" / "ver.py").write_text(code)
    record = {"name": "ver", "version": sha(code), "fallback_version": None, "action": "deploy", "started_at": 1.0}
    (root / ".state" / "activating" / f"ver.{sha(code)[:12]}.json").write_text(json.dumps(record))
    client = await Client.connect(spawn_agent(root=root, preexec_fn=small_disk).address)  # it starts
    try:
        assert (await client.call("version"))["code"] == "unknown_command"
        (finding,) = (await client.call("get_status"))["integrity"]
        assert finding["status"] == "quarantine_failed" and "not loaded" in finding["detail"]
    finally:
        await client.close()
