"""Loads that hang: undone, counted as stuck, never in the way of the agent's own commands."""

from conftest import Client, sha, wait_until
from test_activation import GUARD
from test_deploy import deploy, version_module

OWN_COMMAND_BOUND = 1.0  # seconds: the agent's own commands answer within this while threads hang


def hangs_until(flag, n: int) -> str:
    """A module that loads fine in the import test and blocks on its real load until ``flag`` exists."""
    return (GUARD + "import os, time\nif REAL:\n"
            f"    while not os.path.exists({str(flag)!r}):\n        time.sleep(0.01)\n"
            f"def handle_h{n}(data):\n    return {{}}\n")


def blocks_until(flag) -> str:
    return (f"import os, time\ndef handle_block(data):\n"
            f"    while not os.path.exists({str(flag)!r}):\n        time.sleep(0.01)\n    return {{}}\n")


async def test_the_agents_own_commands_answer_while_loads_and_handlers_hang(start_agent, connect, flag_dir):
    flag = flag_dir / "release"
    agent = await start_agent(import_timeout=0.5, handler_threads=2, handler_timeout=0.5)
    client = await connect(agent)
    try:
        await deploy(client, "ver.py", version_module(1))
        await deploy(client, "ver.py", version_module(2))
        await deploy(client, "stuck.py", blocks_until(flag))
        for _ in range(2):  # every handler thread stuck
            assert (await client.call("block"))["code"] == "timeout"
        for n in range(5):  # more hung loads than the agent has worker threads
            reply = await deploy(client, f"hang{n}.py", hangs_until(flag, n))
            assert reply["code"] == "load_failed" and reply["quarantined"] is True
        other = await connect(agent)
        for command, fields in (("ping", {}), ("get_status", {}), ("list_backups", {"filename": "ver.py"}),
                                ("rollback_handler", {"filename": "ver.py"})):
            reply = await other.call(command, reply_timeout=OWN_COMMAND_BOUND, **fields)
            assert reply["success"] is True, reply
        assert (await other.call("version"))["code"] == "busy"  # handler calls wait for a free thread
        stuck = (await other.call("get_status"))["stuck_threads"]
        assert stuck == {"handler_calls": 2, "loads": 5, "limit": 8, "over_limit": False}
        assert agent.registry.modules["ver"].sha256 == sha(version_module(1))
    finally:
        flag.touch()
    await wait_until(lambda: agent.loader.stuck == 0 and agent.dispatcher.stuck_calls == 0, what="threads to return")
    assert list((agent.config.root / ".state" / "activating").iterdir()) == []  # each record went with its thread


async def test_past_the_stuck_limit_a_supervised_agent_exits_to_be_restarted_clean(tmp_path, spawn_agent, flag_dir):
    root = tmp_path / "device"
    options = ("--supervised", "--max-stuck-threads", "1", "--import-timeout", "0.5")
    agent = spawn_agent(*options, root=root)
    client = await Client.connect(agent.address)
    try:
        assert (await deploy(client, "h0.py", hangs_until(flag_dir / "never", 0)))["quarantined"] is True
        await client.send({"command": "update_handler", "filename": "h1.py", "code": hangs_until(flag_dir / "never", 1)})
        try:
            await client.reply()  # answered before the exit, or not at all
        except ConnectionError:
            pass
    finally:
        await client.close()
    assert agent.proc.wait(timeout=30) == 75
    client = await Client.connect(spawn_agent(*options, root=root).address)
    try:
        status = await client.call("get_status")
        assert {entry["file"] for entry in status["quarantine"]} == {"h0.py", "h1.py"}
        assert status["modules"] == [] and status["stuck_threads"]["loads"] == 0
    finally:
        await client.close()


async def test_past_the_limit_an_unsupervised_agent_says_so_and_keeps_serving(start_agent, connect, flag_dir):
    flag = flag_dir / "release"
    agent = await start_agent(import_timeout=0.5, max_stuck_threads=1)
    client = await connect(agent)
    try:
        for n in range(2):
            await deploy(client, f"hang{n}.py", hangs_until(flag, n))
        assert (await client.call("get_status"))["stuck_threads"]["over_limit"] is True
        assert not agent.restart_needed.is_set()
        assert (await client.call("ping"))["success"] is True
    finally:
        flag.touch()
    await wait_until(lambda: agent.loader.stuck == 0, what="the loads to return")
