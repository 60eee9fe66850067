"""Handler modules at runtime: loading, clashes, calls, misbehaviour, time limits, stats, auth."""

import asyncio
import shutil

import pytest

from conftest import scripted, wait_until


async def test_modules_load_at_start_from_both_export_styles(start_agent, connect):
    agent = await start_agent(handlers={"basic": scripted("basic"), "_private": "raise SystemExit"})
    client = await connect(agent)
    assert (await client.call("echo", value=1))["echo"] == {"value": 1}
    assert (await client.call("add", a=2, b=3))["sum"] == 5  # COMMAND_HANDLERS key "Add", matched case-insensitively
    assert (await client.call("async_echo", value="v"))["async"] is True
    commands = await client.call("list_commands")
    assert {"echo", "add", "async_echo", "ping", "update_handler"} <= set(commands["commands"])
    assert commands["handlers"]["add"] == "basic.py"
    status = await client.call("get_status")
    (module,) = status["modules"]
    assert module["file"] == "basic.py" and len(module["sha256"]) == 64 and "add" in module["commands"]
    assert status["deploy_features"] == ["if_version", "to_version", "force", "release", "signature"]  # what a controller may rely on
    disk = status["disk"]
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    assert abs(disk["free_bytes"] - shutil.disk_usage(agent.config.root).free) < 64 * 1024 * 1024


async def test_a_module_that_fails_to_load_is_reported_and_the_rest_still_load(start_agent, connect):
    agent = await start_agent(handlers={
        "basic": scripted("basic"),
        "raises_at_import": scripted("raises_at_import"),
        "exits_at_import": "import sys\nsys.exit(1)\n",
        # Loaded in-process, this would end the agent (and this test run): startup imports
        # every file in the isolated import test first.
        "kills_at_import": "import os\nos._exit(3)\n",
        "bad_syntax": "def handle_x(:\n",
    })
    client = await connect(agent)
    assert (await client.call("echo"))["success"] is True
    failed = {f["file"]: f["error"] for f in (await client.call("get_status"))["failed_modules"]}
    assert set(failed) == {"raises_at_import.py", "exits_at_import.py", "kills_at_import.py", "bad_syntax.py"}
    assert "exit status 3" in failed["kills_at_import.py"]
    assert "no config file" in failed["raises_at_import.py"]
    assert "sys.exit" in failed["exits_at_import.py"]


async def test_two_modules_offering_one_command_is_an_error_naming_both(start_agent, connect):
    agent = await start_agent(handlers={"clash_a": scripted("clash_a"), "clash_b": scripted("clash_b")})
    client = await connect(agent)
    (failed,) = (await client.call("get_status"))["failed_modules"]
    assert failed["file"] == "clash_b.py"
    assert "clash_a.py" in failed["error"] and "clash_b.py" in failed["error"] and "'shared'" in failed["error"]
    assert (await client.call("shared"))["from"] == "a"


async def test_a_module_redefining_a_builtin_is_an_error_and_ping_stays_the_agents(start_agent, connect):
    agent = await start_agent(handlers={"redefines_ping": scripted("redefines_ping")})
    client = await connect(agent)
    (failed,) = (await client.call("get_status"))["failed_modules"]
    assert "redefines_ping.py" in failed["error"] and "built-in" in failed["error"] and "'ping'" in failed["error"]
    assert (await client.call("ping"))["message"] == "pong"


@pytest.mark.parametrize(
    "command, code, words",
    [
        ("boom", "handler_error", "ValueError: the sensor is on fire"),
        ("async_boom", "handler_error", "KeyError"),
        ("exit", "handler_error", "SystemExit"),
        ("async_exit", "handler_error", "SystemExit"),
        ("keyboard", "handler_error", "KeyboardInterrupt"),
        ("not_dict", "handler_error", "returned list, expected a dict"),
        ("not_json", "handler_error", "not JSON-serialisable"),
        ("nan", "handler_error", "not JSON-serialisable"),
    ],
)
async def test_misbehaving_handlers_become_clear_errors_and_the_agent_lives(start_agent, connect, command, code, words):
    agent = await start_agent(handlers={"crash": scripted("crash")})
    client = await connect(agent)
    reply = await client.call(command, id=1)
    assert reply["success"] is False and reply["code"] == code and reply["id"] == 1
    assert words in reply["error"]
    assert "Traceback" not in reply["error"]
    assert (await client.call("ping"))["message"] == "pong"


async def test_handler_success_false_is_passed_through(start_agent, connect):
    client = await connect(await start_agent(handlers={"basic": scripted("basic")}))
    reply = await client.call("fails_politely")
    assert reply["success"] is False and reply["error"] == "no camera attached"


async def test_handlers_never_see_the_token(start_agent, connect):
    client = await connect(await start_agent(handlers={"basic": scripted("basic")}, token="s3cret"))
    reply = await client.call("echo", token="s3cret", value=1)
    assert reply["echo"] == {"value": 1}


async def test_sync_handler_past_its_time_limit_gets_timeout_and_is_counted_stuck(start_agent, connect):
    agent = await start_agent(handlers={"blocking": scripted("blocking")}, handler_timeout=0.3, handler_threads=2)
    module = agent.registry.modules["blocking"].module
    client = await connect(agent)
    try:
        reply = await client.call("block")
        assert reply["code"] == "timeout" and "0.3 s" in reply["error"]
        status = await client.call("get_status")
        assert status["stuck_handler_calls"] == 1 and status["stuck_handler_calls_total"] == 1
        assert (await client.call("block"))["code"] == "timeout"
        # Every handler thread is stuck now: handler calls are refused at once, built-ins still answer.
        busy = await client.call("block")
        assert busy["code"] == "busy" and "stuck" in busy["error"]
        assert (await client.call("ping"))["message"] == "pong"
        stats = (await client.call("handler_stats"))["stats"]["block"]
        assert stats["calls"] == 3 and stats["timeouts"] == 2 and stats["errors"] == 3
    finally:
        module.RELEASE.set()
    await wait_until(lambda: agent.dispatcher.stuck_calls == 0, what="stuck threads to return")
    module.RELEASE.clear()


async def test_async_handler_past_its_time_limit_is_cancelled(start_agent, connect):
    agent = await start_agent(handlers={"blocking": scripted("blocking")}, handler_timeout=0.3)
    client = await connect(agent)
    assert (await client.call("async_forever"))["code"] == "timeout"
    assert (await client.call("get_status"))["stuck_handler_calls"] == 0


async def test_request_timeout_field_lowers_the_limit_but_cannot_raise_it(start_agent, connect):
    agent = await start_agent(handlers={"blocking": scripted("blocking")}, handler_timeout=30)
    module = agent.registry.modules["blocking"].module
    client = await connect(agent)
    try:
        reply = await client.call("async_block", timeout=0.2)
        assert reply["code"] == "timeout" and "0.2 s" in reply["error"]
        for bad in (-1, 0, "soon", True):
            assert (await client.call("async_block", timeout=bad))["code"] == "bad_request"
    finally:
        module.RELEASE.set()


async def test_handler_stats_count_calls_errors_and_mean_time(start_agent, connect):
    client = await connect(await start_agent(handlers={"basic": scripted("basic"), "crash": scripted("crash")}))
    for _ in range(3):
        await client.call("echo")
    await client.call("boom")
    stats = (await client.call("handler_stats"))["stats"]
    assert stats["echo"]["calls"] == 3 and stats["echo"]["errors"] == 0 and stats["echo"]["mean_seconds"] >= 0
    assert stats["boom"]["errors"] == 1 and "sensor is on fire" in stats["boom"]["last_error"]
    only = (await client.call("handler_stats", name="ECHO"))["stats"]
    assert list(only) == ["echo"]


async def test_token_is_required_on_every_request_when_configured(start_agent, connect):
    agent = await start_agent(handlers={"basic": scripted("basic")}, token="correct horse")
    client = await connect(agent)
    for fields in ({}, {"token": "wrong"}, {"token": 123}, {"token": "correct hors"}):
        reply = await client.call("ping", id=1, **fields)
        assert reply["code"] == "unauthorized" and reply["id"] == 1 and "token" in reply["error"]
    denied = await client.call("update_handler", filename="x.py", code="def handle_x(d): return {}\n")
    assert denied["code"] == "unauthorized"
    assert not (agent.store.handlers_dir / "x.py").exists()
    assert (await client.call("echo", token="correct horse", value=2))["echo"] == {"value": 2}
    assert (await client.call("ping", token="correct horse"))["message"] == "pong"


async def test_reload_handler_loads_the_file_from_disk(start_agent, connect):
    agent = await start_agent(handlers={"basic": scripted("basic")})
    client = await connect(agent)
    path = agent.store.handlers_dir / "basic.py"
    path.write_text(path.read_text() + "\n\ndef handle_new_one(data):\n    return {'new': True}\n")
    reply = await client.call("reload_handler", filename="basic.py")
    assert reply["success"] is True and "new_one" in reply["reload"]["commands"]
    assert (await client.call("new_one"))["new"] is True
    missing = await client.call("reload_handler", filename="nope.py")
    assert missing["code"] == "not_found"


async def test_reload_of_a_broken_file_keeps_the_old_module(start_agent, connect):
    agent = await start_agent(handlers={"basic": scripted("basic")})
    client = await connect(agent)
    (agent.store.handlers_dir / "basic.py").write_text("def handle_echo(:\n")
    reply = await client.call("reload_handler", filename="basic.py")
    assert reply["success"] is False and "Syntax Error" in reply["error"]
    assert (await client.call("echo", value=3))["echo"] == {"value": 3}


async def test_many_slow_handler_calls_run_concurrently(start_agent, connect):
    agent = await start_agent(handlers={"blocking": scripted("blocking")}, handler_threads=8)
    module = agent.registry.modules["blocking"].module
    clients = [await connect(agent) for _ in range(8)]
    for c in clients:
        await c.send({"command": "block"})
    loop = asyncio.get_running_loop()
    for _ in range(8):  # all eight are inside the handler at once
        await loop.run_in_executor(None, module.ENTERED.acquire)
    module.RELEASE.set()
    replies = await asyncio.gather(*(c.reply() for c in clients))
    assert all(r["released"] for r in replies)
