"""The fleet library over real local agents: inventory, send/send_all, rollouts, drift."""

import asyncio
import json

import pytest

from conftest import scripted, sha, wait_until, waits_for
from fleet import ConfigError, Device, Fleet, RolloutPlan, Status, deploy, load_inventory, parse_inventory
from fleet.errors import CommandTimeout, DeviceUnreachable
from fleet.fleet import attempt
from fleet.results import DeviceResult
from fleet.local import free_port
from fleet.status_view import drifted, standings
from fleet.status_view import status_table as render_status
from fleet.tables import rollout_table

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = "VERSION = 2\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
CLASH = "def handle_version(data):\n    return {'version': 'old'}\n"


def device_for(agent, device_id: str, **kw) -> Device:
    return Device(id=device_id, host=agent.address[0], port=agent.address[1], **kw)


def write_handler(tmp_path, code: str, name: str = "ver.py"):
    path = tmp_path / name
    path.write_text(code)
    return path


# devices.json


def test_the_project_devices_json_loads_and_points_at_loopback():
    from fleet.cli import REPO_DEVICES

    inventory = load_inventory(REPO_DEVICES)
    assert inventory.devices and all(d.host == "127.0.0.1" for d in inventory.devices)


@pytest.mark.parametrize("document, words", [
    ('{"raspberryPiDevices": [', "not valid JSON"),
    ("[]", "top level must be an object"),
    ('{"devices": []}', '"raspberryPiDevices" must be a list'),
    ('{"raspberryPiDevices": [{"host": "1.2.3.4"}]}', "raspberryPiDevices[0]: missing required field 'id'"),
    ('{"raspberryPiDevices": [{"id": "a"}]}', "raspberryPiDevices[0] (a): missing required field 'host'"),
    ('{"raspberryPiDevices": [{"id": "a", "host": "h"}, {"id": "a", "host": "g"}]}',
     "raspberryPiDevices[1] (a): duplicate id 'a' (also raspberryPiDevices[0])"),
    ('{"raspberryPiDevices": [{"id": "a", "host": "h", "port": 70000}]}', "(a): 'port' must be a whole number"),
    ('{"raspberryPiDevices": [{"id": "a", "host": "h", "port": "3000"}]}', "'port' must be a whole number"),
    ('{"raspberryPiDevices": [{"id": "a", "host": "h", "port": true}]}', "'port' must be a whole number"),
    ('{"raspberryPiDevices": [{"id": "a", "host": "h", "prot": 1}]}', "unknown field(s) prot (known: broker, ca, cert, crl, description, host, id, key, name, port,"),
    ('{"raspberryPiDevices": [{"id": "a", "transport": "udp"}]}', "'transport' must be \"tcp\""),
    ('{"raspberryPiDevices": [{"id": "a", "transport": "mqtt"}]}', "'broker' must name the broker"),
    ('{"raspberryPiDevices": [{"id": "a", "transport": "mqtt", "broker": "tcp://b"}]}', "give mqtts://HOST"),
    ('{"raspberryPiDevices": [{"id": "a", "transport": "mqtt", "broker": "mqtts://b"}]}', "with TLS, 'ca' must name"),
    ('{"raspberryPiDevices": [{"id": "a", "port": 3000}]}', "missing required field 'host'"),
    ('{"raspberryPiDevices": [{"id": "a", "host": "h", "tags": "cams"}]}', "field 'tags' must be a list"),
    ('{"raspberryPiDevices": [{"id": "a b", "host": "h"}]}', "'id' must be 1-64 letters"),
    ('{"raspberryPiDevices": [{"id": "a", "host": ""}]}', "'host' must be"),
    ('{"defaults": {"timeout": -1}, "raspberryPiDevices": []}', "defaults.timeout must be a positive"),
])
def test_a_bad_devices_json_is_refused_naming_file_entry_and_field(tmp_path, document, words):
    path = tmp_path / "devices.json"
    path.write_text(document)
    with pytest.raises(ConfigError) as caught:
        load_inventory(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_tokens_come_from_the_entry_or_the_environment_and_are_never_shown():
    inventory = parse_inventory({
        "defaults": {"token_env": "FLEET_T"},
        "raspberryPiDevices": [{"id": "a", "host": "h", "token": "inline"}, {"id": "b", "host": "h"},
                               {"id": "c", "host": "h", "token_env": "OTHER"}],
    }, environ={"FLEET_T": "from-env", "OTHER": "other"})
    assert [d.token for d in inventory.devices] == ["inline", "from-env", "other"]
    assert "inline" not in repr(inventory.devices[0])


def test_selection_by_id_and_tag():
    inventory = parse_inventory({"raspberryPiDevices": [
        {"id": "a", "host": "h", "tags": ["cams"]}, {"id": "b", "host": "h", "tags": ["sensors"]},
        {"id": "c", "host": "h", "tags": ["cams"]}]})
    assert [d.id for d in inventory.select(tags=["cams"])] == ["a", "c"]
    assert [d.id for d in inventory.select(only=["c", "a"])] == ["a", "c"]
    with pytest.raises(ConfigError, match="no device 'z'"):
        inventory.select(only=["z"])
    with pytest.raises(ConfigError, match="no device has tag"):
        inventory.select(tags=["nope"])


# send / send_all


async def test_send_returns_the_reply_matched_by_id(start_agent):
    agent = await start_agent(handlers={"basic": scripted("basic")})
    async with Fleet([device_for(agent, "a")]) as fleet:
        replies = await asyncio.gather(*(fleet.send("a", {"command": "add", "a": i, "b": 1}) for i in range(20)))
        assert [r["sum"] for r in replies] == [i + 1 for i in range(20)]
        refused = await fleet.send("a", {"command": "nope"})  # a refusal is a reply, not an exception
        assert refused["success"] is False and refused["code"] == "unknown_command"
        assert fleet.connection_status()["a"]["connected"] is True


async def test_only_a_reply_with_our_exact_integer_id_answers_a_request():
    """A device that echoes the id as "1", 1.0 or true must not answer request 1: those go to on_message."""
    async def answer(reader, writer):
        while line := await reader.readline():
            request_id = json.loads(line)["id"]
            for wrong in (str(request_id), float(request_id), True):
                writer.write(json.dumps({"id": wrong, "which": "wrong"}).encode() + b"\n")
            writer.write(json.dumps({"id": request_id, "which": "right"}).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    unmatched = []
    try:
        device = Device(id="odd", host="127.0.0.1", port=server.sockets[0].getsockname()[1])
        async with Fleet([device], on_message=lambda device_id, reply: unmatched.append(reply["id"])) as fleet:
            reply = await fleet.send("odd", {"command": "ping"})
            assert reply["which"] == "right" and type(reply["id"]) is int
            assert len(unmatched) == 3 and {type(i) for i in unmatched} == {str, float, bool}
    finally:
        server.close()
        await server.wait_closed()


async def test_no_more_requests_in_flight_than_the_concurrency_limit():
    """Counted at the receiving end: a server playing five devices that answers on the next loop turn.

    Everything the controller writes in one go is readable at once, so an
    unlimited controller would show all five requests outstanding together.
    """
    loop = asyncio.get_running_loop()
    outstanding, most = 0, 0

    async def answer(reader, writer):
        nonlocal outstanding, most
        while line := await reader.readline():
            outstanding += 1
            most = max(most, outstanding)

            def reply(request_id=json.loads(line)["id"]):
                nonlocal outstanding
                outstanding -= 1
                writer.write(json.dumps({"id": request_id, "success": True}).encode() + b"\n")
            loop.call_soon(reply)
        writer.close()

    servers = [await asyncio.start_server(answer, "127.0.0.1", 0) for _ in range(5)]
    devices = [Device(id=f"d{i}", host="127.0.0.1", port=server.sockets[0].getsockname()[1])
               for i, server in enumerate(servers)]
    try:
        for limit in (2, 5):
            async with Fleet(devices, concurrency=limit) as fleet:
                await fleet.connect()
                most = 0
                results = await fleet.send_all({"command": "ping"})
                assert all(r.status is Status.OK for r in results.values()) and most == limit
                most = 0
                results = await fleet.run_each([d.id for d in devices],
                                               lambda device_id: attempt(fleet.send(device_id, {"command": "ping"}), device_id))
                assert all(r.status is Status.OK for r in results.values()) and most == limit
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_time_limits_of_answered_requests_are_not_kept_until_they_expire(start_agent):
    agent = await start_agent()
    async with Fleet([device_for(agent, "a")], request_timeout=600) as fleet:
        for _ in range(50):
            await fleet.send_all({"command": "ping"})
            await fleet.send("a", {"command": "ping"})
        queue = fleet._deadlines._queues[600]
        assert len(queue._queue) <= 1  # only the newest, answered or not: nothing piles up for 600 s


async def test_a_cancelled_send_all_sends_nothing_more():
    """Cancelled while the first device holds its reply: when that reply comes, the rest are not sent."""
    seen = {}
    first_arrived, release = asyncio.Event(), asyncio.Event()

    def serve(name):
        async def answer(reader, writer):
            while line := await reader.readline():
                request = json.loads(line)
                seen.setdefault(name, []).append(request["command"])
                if request["command"] == "hold":
                    first_arrived.set()
                    await release.wait()
                writer.write(json.dumps({"id": request["id"], "success": True}).encode() + b"\n")
                await writer.drain()
            writer.close()
        return answer

    servers = [await asyncio.start_server(serve(f"d{i}"), "127.0.0.1", 0) for i in range(3)]
    devices = [Device(id=f"d{i}", host="127.0.0.1", port=server.sockets[0].getsockname()[1])
               for i, server in enumerate(servers)]
    try:
        async with Fleet(devices, concurrency=1) as fleet:
            await fleet.connect()
            fan_out = asyncio.ensure_future(fleet.send_all({"command": "hold"}))
            await first_arrived.wait()
            fan_out.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fan_out
            release.set()
            # Replies come in order on each connection: once these pings are answered, the held reply
            # was handled, and anything it launched would have reached d1 before this ping.
            await fleet.send("d0", {"command": "ping"})
            await fleet.send("d1", {"command": "ping"})
            assert seen == {"d0": ["hold", "ping"], "d1": ["ping"]}
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_send_all_with_one_device_down_and_one_too_slow(start_agent):
    fast = await start_agent(handlers={"blocking": scripted("blocking")})
    slow = await start_agent(handlers={"blocking": scripted("blocking")})
    down = Device(id="down", host="127.0.0.1", port=free_port())
    module = slow.registry.modules["blocking"].module
    async with Fleet([device_for(fast, "fast"), device_for(slow, "slow"), down], connect_timeout=2) as fleet:
        await fleet.send("slow", {"command": "reset"})
        # The slow device is busy with a blocking call; ping still answers, "block" does not in time.
        blocker = asyncio.ensure_future(fleet.send("slow", {"command": "block"}, timeout=30))
        await asyncio.get_running_loop().run_in_executor(None, module.ENTERED.acquire)
        await fleet.send("fast", {"command": "release"})  # the fast device's own RELEASE: it answers at once
        results = await fleet.send_all({"command": "block"}, timeout=0.5)
        assert results["fast"].status is Status.OK
        assert results["slow"].status is Status.TIMEOUT and "0.5 s" in results["slow"].error
        assert results["down"].status is Status.UNREACHABLE and "refused" in results["down"].error
        with pytest.raises(DeviceUnreachable):
            await fleet.send("down", {"command": "ping"})
        with pytest.raises(CommandTimeout):
            await fleet.send("slow", {"command": "block"}, timeout=0.2)
        module.RELEASE.set()
        assert (await blocker)["released"] is True


async def test_a_device_that_answers_something_else_is_failed_and_named(start_agent):
    """Another service on the agent's port: a FAILED result that quotes it; the other devices are unharmed."""
    async def not_an_agent(reader, writer):
        await reader.readline()
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    agent = await start_agent()
    server = await asyncio.start_server(not_an_agent, "127.0.0.1", 0)
    try:
        other = Device(id="web", host="127.0.0.1", port=server.sockets[0].getsockname()[1])
        async with Fleet([device_for(agent, "pi"), other]) as fleet:
            results = await fleet.send_all({"command": "ping"})
    finally:
        server.close()
        await server.wait_closed()
    assert results["pi"].status is Status.OK
    assert results["web"].status is Status.FAILED
    assert "'HTTP/1.1 400 Bad Request', which is not a JSON object" in results["web"].error
    assert "something other than pi-agent" in results["web"].error


async def test_a_request_after_the_agent_restarted_reconnects(tmp_path, spawn_agent):
    proc = spawn_agent(root=tmp_path / "dev")
    device = Device(id="a", host="127.0.0.1", port=proc.address[1])
    async with Fleet([device], keepalive=False) as fleet:
        assert (await fleet.send("a", {"command": "ping"}))["message"] == "pong"
        proc.kill()
        with pytest.raises(DeviceUnreachable):
            await fleet.send("a", {"command": "ping"})
        again = spawn_agent("--port", str(proc.address[1]), root=tmp_path / "dev")
        assert again.address[1] == proc.address[1]
        assert (await fleet.send("a", {"command": "ping"}))["message"] == "pong"


async def test_keepalive_reconnects_by_itself_after_a_restart(tmp_path, spawn_agent):
    proc = spawn_agent(root=tmp_path / "dev")
    device = Device(id="a", host="127.0.0.1", port=proc.address[1])
    fleet = Fleet([device], keepalive=True)
    try:
        await fleet.connect()
        proc.kill()
        await wait_until(lambda: not fleet.connection_status()["a"]["connected"], what="the drop to be seen")
        spawn_agent("--port", str(proc.address[1]), root=tmp_path / "dev")
        await wait_until(lambda: fleet.connection_status()["a"]["reconnects"] >= 1, timeout=30, what="a reconnect")
        assert fleet.connection_status()["a"]["connected"] is True
    finally:
        await fleet.close()


async def test_a_token_is_added_to_every_request(start_agent):
    agent = await start_agent(token="s3cret")
    async with Fleet([device_for(agent, "ok", token="s3cret"), device_for(agent, "bad", token="wrong")]) as fleet:
        results = await fleet.send_all({"command": "ping"})
        assert results["ok"].status is Status.OK
        assert results["bad"].status is Status.FAILED and results["bad"].code == "unauthorized"


# Rollouts


async def three_agents(start_agent, **kw):
    return [await start_agent(**kw) for _ in range(3)]


async def test_rollout_deploys_everywhere_and_a_rerun_skips_up_to_date_devices(start_agent, tmp_path):
    agents = await three_agents(start_agent)
    path = write_handler(tmp_path, V1)
    async with Fleet([device_for(a, f"d{i}") for i, a in enumerate(agents)]) as fleet:
        seen = []
        report = await deploy(fleet, path, plan=RolloutPlan(canary=1, batch=1, verify="version"),
                              on_result=seen.append)
        assert report.ok and report.waves == [["d0"], ["d1"], ["d2"]]
        assert [r.device_id for r in seen] == ["d0", "d1", "d2"]  # one line per device as it finishes
        for result in report.results.values():
            assert result.status is Status.OK and result.new_version == sha(V1) and result.commands == ["version"]
            assert result.old_version is None and "verify version ok" in result.note
        again = await deploy(fleet, path)
        assert again.ok and {r.status for r in again.results.values()} == {Status.SKIPPED}


async def test_a_failing_canary_halts_the_rollout_before_other_devices_change(start_agent, tmp_path):
    canary = await start_agent(handlers={"old": CLASH})
    others = [await start_agent(), await start_agent()]
    devices = [device_for(canary, "canary")] + [device_for(a, f"d{i}") for i, a in enumerate(others)]
    async with Fleet(devices) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan(canary=1, batch=10))
    assert report.halted and "1 device(s) failed" in report.halt_reason and not report.ok
    assert report.results["canary"].status is Status.FAILED
    assert "offered by both old.py and ver.py" in report.results["canary"].error
    for device_id in ("d0", "d1"):
        assert report.results[device_id].status is Status.SKIPPED and "halted" in report.results[device_id].note
    for agent in others:
        assert not (agent.store.handlers_dir / "ver.py").exists()


async def test_rollback_on_failure_restores_what_every_changed_device_ran_before(start_agent, tmp_path):
    agents = [await start_agent(handlers={"ver": V1}), await start_agent(), await start_agent(handlers={"old": CLASH})]
    devices = [device_for(a, f"d{i}") for i, a in enumerate(agents)]
    async with Fleet(devices) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V2),
                              plan=RolloutPlan(canary=1, batch=1, rollback_on_failure=True))
        assert report.halted
        assert report.results["d0"].status is Status.ROLLED_BACK and report.results["d0"].new_version == sha(V1)
        assert report.results["d1"].status is Status.ROLLED_BACK  # it had no ver.py: the new file is removed
        assert report.results["d2"].status is Status.FAILED
        assert (await fleet.send("d0", {"command": "version"}))["version"] == 1
        assert (await fleet.send("d1", {"command": "version"}))["code"] == "unknown_command"
    assert (agents[0].store.handlers_dir / "ver.py").read_text() == V1
    assert not (agents[1].store.handlers_dir / "ver.py").exists()


async def test_a_changed_device_that_cannot_be_rolled_back_is_failed_and_says_so(tmp_path, spawn_agent):
    (tmp_path / "d1" / "handlers").mkdir(parents=True)
    (tmp_path / "d1" / "handlers" / "old.py").write_text(CLASH)  # d1 refuses the push: the rollout halts
    procs = [spawn_agent(root=tmp_path / f"d{i}") for i in range(2)]
    devices = [Device(id=f"d{i}", host="127.0.0.1", port=p.address[1]) for i, p in enumerate(procs)]

    def kill_d0_once_changed(result):
        if result.device_id == "d0" and result.status is Status.OK:
            procs[0].kill()

    async with Fleet(devices, connect_timeout=2) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1), on_result=kill_d0_once_changed,
                              plan=RolloutPlan(canary=1, batch=1, rollback_on_failure=True))
    d0 = report.results["d0"]
    assert report.halted and d0.status is Status.FAILED and d0.code == "rollback_failed"
    assert d0.error.startswith(f"rollback failed, still on {sha(V1)[:8]}: ") and d0.new_version == sha(V1)
    row = next(line for line in rollout_table(list(report.results.values())).splitlines() if line.startswith("d0"))
    assert "FAILED" in row and "rollback failed" in row


@pytest.mark.parametrize("lands", [True, False])
async def test_a_push_that_timed_out_is_checked_and_undone_if_it_landed_after_all(start_agent, tmp_path, flag_dir,
                                                                                   lands):
    """The push is answered only after the rollout gave up on it: the undo queues behind it on the device."""
    flag = flag_dir / "go"
    slow = waits_for(flag) + ("" if lands else "raise RuntimeError('broken on purpose')\n") + V2
    agent = await start_agent(handlers={"ver": V1})

    def release_once_timed_out(result):
        if result.status is Status.TIMEOUT and not flag.exists():  # (called again with the undo's outcome)
            assert "may still complete" in result.note
            flag.touch()

    async with Fleet([device_for(agent, "d0")], request_timeout=30) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, slow), on_result=release_once_timed_out,
                              plan=RolloutPlan(timeout=0.5, rollback_on_failure=True))
        assert (await fleet.send("d0", {"command": "version"}))["version"] == 1
        log = (await fleet.send("d0", {"command": "update_log"}))["entries"]
    result = report.results["d0"]
    assert report.halted and flag.exists()
    table = rollout_table([result])
    row = table.splitlines()[2]
    assert row.startswith("d0") and len(row) <= 120
    # The table shows both, the detail cut short in its row and whole under the table.
    assert "d0: no reply to 'update_handler' within 0.5 s" in table and result.note in table.split("\n\n")[1]
    if lands:
        assert result.status is Status.ROLLED_BACK and result.note == f"the push had landed after all; rolled back to {sha(V1)[:8]}"
    else:
        assert result.status is Status.TIMEOUT and "checked: it still runs what it ran before" in result.note
    # Newest first: the undo, then the late push; neither when the push did not land. Oldest: the agent
    # adopting ver.py, which was in handlers/ before it first started.
    assert [e["action"] for e in log] == (["rollback", "deploy", "adopt"] if lands else ["adopt"])


async def test_an_unanswered_dry_run_is_not_said_to_maybe_land(start_agent, tmp_path, flag_dir):
    flag = flag_dir / "go"
    slow = waits_for(flag) + V2
    agent = await start_agent(handlers={"ver": V1})
    async with Fleet([device_for(agent, "d0")]) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, slow), on_result=lambda result: flag.touch(),
                              plan=RolloutPlan(timeout=0.3, dry_run=True, rollback_on_failure=True))
    result = report.results["d0"]
    assert result.status is Status.TIMEOUT and result.note == ""


async def test_a_timed_out_push_to_an_agent_without_if_version_is_not_undone_blindly(tmp_path):
    """An older agent ignores if_version: an undo could roll it back past what it ran before, so none is sent."""
    received = []
    hung_up = asyncio.Event()

    async def older_agent(reader, writer):  # answers get_status without deploy_features; never answers the push
        try:
            while line := await reader.readline():
                request = json.loads(line)
                received.append(request["command"])
                if request["command"] == "get_status":
                    writer.write(json.dumps({"id": request["id"], "success": True, "modules": []}).encode() + b"\n")
                    await writer.drain()
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_server(older_agent, "127.0.0.1", 0)
    try:
        device = Device(id="old", host="127.0.0.1", port=server.sockets[0].getsockname()[1])
        async with Fleet([device]) as fleet:
            report = await deploy(fleet, write_handler(tmp_path, V1),
                                  plan=RolloutPlan(timeout=0.3, rollback_on_failure=True))
        await asyncio.wait_for(hung_up.wait(), 10)  # the controller closed; the stand-in saw it
    finally:
        server.close()
        await server.wait_closed()
    result = report.results["old"]
    assert report.halted and result.status is Status.TIMEOUT and "too old to check safely" in result.note
    assert received == ["get_status", "update_handler"]


async def test_a_connection_lost_with_a_request_unanswered_says_it_may_have_run():
    async def hang_up(reader, writer):
        await reader.readline()
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        device = Device(id="flaky", host="127.0.0.1", port=server.sockets[0].getsockname()[1])
        async with Fleet([device]) as fleet:
            result = (await fleet.send_all({"command": "ping"}))["flaky"]
    finally:
        server.close()
        await server.wait_closed()
    assert result.status is Status.UNREACHABLE and result.code == "connection_lost"
    assert "before it answered (it may or may not have run the request)" in result.error


async def test_failures_are_counted_over_the_whole_rollout_not_per_batch(start_agent, tmp_path):
    agents = [await start_agent(), await start_agent(handlers={"old": CLASH}), await start_agent(),
              await start_agent(handlers={"old": CLASH}), await start_agent()]
    async with Fleet([device_for(a, f"d{i}") for i, a in enumerate(agents)]) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1),
                              plan=RolloutPlan(canary=1, batch=2, max_failures=1))
    # Waves: [d0], [d1, d2], [d3, d4]: one failure per batch, but two in all: halt after the third wave.
    assert report.halt_reason == "2 device(s) failed, more than max-failures 1 allows"
    assert [report.results[d].status for d in ("d0", "d1", "d2", "d3", "d4")] == [
        Status.OK, Status.FAILED, Status.OK, Status.FAILED, Status.OK]


async def test_a_device_killed_mid_rollout_is_a_result_not_a_crash(tmp_path, spawn_agent):
    procs = [spawn_agent(root=tmp_path / f"d{i}") for i in range(3)]
    devices = [Device(id=f"d{i}", host="127.0.0.1", port=p.address[1]) for i, p in enumerate(procs)]

    def kill_d2_after_canary(result):
        if result.device_id == "d0":
            procs[2].kill()

    async with Fleet(devices, connect_timeout=2) as fleet:
        await fleet.connect()
        report = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan(canary=1, batch=1),
                              on_result=kill_d2_after_canary)
    assert report.results["d0"].status is Status.OK and report.results["d1"].status is Status.OK
    assert report.results["d2"].status is Status.UNREACHABLE
    assert not report.halted and not report.ok  # unreachable has its own limit, unlimited by default


async def test_devices_offline_at_the_start_are_reported_and_max_unreachable_halts(start_agent, tmp_path):
    agent = await start_agent()
    devices = [Device(id="off", host="127.0.0.1", port=free_port()), device_for(agent, "on")]
    async with Fleet(devices, connect_timeout=2) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan())
        assert report.results["off"].status is Status.UNREACHABLE and "offline at start" in report.results["off"].note
        assert report.results["on"].status is Status.OK
        strict = await deploy(fleet, write_handler(tmp_path, V2), plan=RolloutPlan(max_unreachable=0))
        assert strict.halted and strict.halt_reason == "1 device(s) unreachable, more than max-unreachable 0 allows"
        share = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan(max_unreachable="10%"))
        assert share.halt_reason == "1 device(s) unreachable, more than max-unreachable 10% (0 of 2 devices) allows"


async def test_a_failing_verify_command_fails_the_device(start_agent, tmp_path):
    agent = await start_agent(handlers={"crash": scripted("crash")})
    async with Fleet([device_for(agent, "a")]) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan(verify="boom"))
    result = report.results["a"]
    assert result.status is Status.FAILED and "verify boom failed" in result.error and result.changed


async def test_dry_run_changes_nothing(start_agent, tmp_path):
    agent = await start_agent()
    async with Fleet([device_for(agent, "a")]) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan(dry_run=True))
    assert report.ok and "dry run" in report.results["a"].note
    assert not (agent.store.handlers_dir / "ver.py").exists()


TWO = V1 + "\ndef handle_extra(data):\n    return {}\n"


async def test_a_push_that_drops_commands_says_which_before_and_after_it_lands(start_agent, tmp_path):
    agents = [await start_agent(handlers={"ver": TWO}), await start_agent(handlers={"ver": TWO})]
    devices = [device_for(a, f"d{i}") for i, a in enumerate(agents)]
    async with Fleet(devices) as fleet:
        preview = await deploy(fleet, write_handler(tmp_path, V1), plan=RolloutPlan(dry_run=True))
        assert [r.removed_commands for r in preview.results.values()] == [["extra"], ["extra"]]
        assert "would drop extra" in rollout_table(list(preview.results.values())).splitlines()[2]
        report = await deploy(fleet, write_handler(tmp_path, V1))
    assert report.ok and report.results["d0"].as_dict()["removed_commands"] == ["extra"]
    text = rollout_table(list(report.results.values()))
    assert "deployed; drops extra" in text.splitlines()[2]
    # Listed once, with the devices, under the table: on a big fleet a column of "deployed" hides it.
    assert "new version drops (calls to them will get unknown_command):\n  extra: d0, d1" in text


async def test_the_agents_check_warnings_show_in_the_rollout_table(start_agent, tmp_path):
    agents = [await start_agent(handlers={"ver": V1}) for _ in range(7)]
    devices = [device_for(a, f"d{i}") for i, a in enumerate(agents)]
    async with Fleet(devices) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, "# emptied by mistake\n"), plan=RolloutPlan(batch=10))
    assert report.ok  # a warning does not stop a push: it has to be seen instead
    text = rollout_table(list(report.results.values()))
    assert all("drops version; 1 check warning" in row for row in text.splitlines()[2:9])
    assert ("Warnings from the agents' checks (they did not stop the push):\n"
            "  the module defines no commands (no COMMAND_HANDLERS and no handle_<name> functions): "
            "d0, d1, d2, d3, d4 and 2 more") in text


async def test_a_device_put_back_no_longer_counts_as_dropping_commands(start_agent, tmp_path):
    agents = [await start_agent(handlers={"ver": TWO}), await start_agent(handlers={"old": CLASH})]
    devices = [device_for(a, f"d{i}") for i, a in enumerate(agents)]
    async with Fleet(devices) as fleet:
        report = await deploy(fleet, write_handler(tmp_path, V1),
                              plan=RolloutPlan(canary=1, batch=1, rollback_on_failure=True))
    assert report.results["d0"].status is Status.ROLLED_BACK and report.results["d0"].removed_commands == ()
    assert "drops" not in rollout_table(list(report.results.values()))


def status_table(devices, statuses, last, wide=True):
    """The status table of a fleet with no state file (no desired releases)."""
    return render_status(devices, statuses, last, standings(devices, statuses, {}, {}, {}), wide=wide)


async def test_status_table_shows_drift(start_agent):
    agents = [await start_agent(handlers={"ver": V1}), await start_agent(handlers={"ver": V1}),
              await start_agent(handlers={"ver": V2})]
    devices = [device_for(a, f"d{i}") for i, a in enumerate(agents)]
    async with Fleet(devices) as fleet:
        statuses = await fleet.send_all({"command": "get_status"})
    assert drifted(devices, statuses) == {"d2": ["ver.py"]}
    table = status_table(devices, statuses, {})
    row = next(line for line in table.splitlines() if line.startswith("d2"))
    assert f"{sha(V2)[:8]} *" in row
    assert f"{sha(V1)[:8]} *" not in table and "differs from most devices of the same type" in table
    assert "d2: * ver.py drifts from what most devices run" in table


async def test_a_handler_that_failed_to_load_shows_in_the_status_table(start_agent):
    broken = await start_agent(handlers={"ver": V1, "bad": "raise RuntimeError('no camera')\n"})
    devices = [device_for(broken, "d0")]
    async with Fleet(devices) as fleet:
        statuses = await fleet.send_all({"command": "get_status"})
    header, _, row = status_table(devices, statuses, {}).splitlines()[:3]
    assert header.split()[9:11] == ["bad.py", "ver.py"] and "LOAD FAILED" in row and sha(V1)[:8] in row


async def test_what_an_agent_found_by_itself_shows_under_the_status_table(start_agent, tmp_path):
    edited = tmp_path / "edited"
    (edited / ".state" / "good").mkdir(parents=True)
    (edited / ".state" / "good" / "ver.py").write_text(V1)
    hand_edited = await start_agent(root=edited, handlers={"ver": V2})
    flaky = await start_agent(probation_failures=2)
    devices = [device_for(hand_edited, "d0"), device_for(flaky, "d1")]
    async with Fleet(devices) as fleet:
        await fleet.send("d1", {"command": "update_handler", "filename": "ver.py", "code": scripted("crash")})
        for _ in range(2):
            await fleet.send("d1", {"command": "boom"})
        await wait_until(lambda: flaky.recovery.auto_rollbacks, what="the automatic rollback")
        statuses, last = await fleet.status()
    notes = [line for line in status_table(devices, statuses, last).split("\n\n", 1)[1].splitlines()
             if "drift" not in line]
    assert notes[0].startswith("d0: handlers/ver.py differs from the version last deployed through the agent")
    assert notes[1].startswith("d1: ver.py was rolled back automatically 0s ago: probation: 2 of 2 calls failed")


def test_nearly_full_storage_is_called_out_under_the_status_table():
    # Rendering only: a real agent's disk cannot be filled for a test. The agent's side of it,
    # get_status["disk"], is checked over a socket in test_runtime.py.
    devices = [Device(id=f"d{i}", host="127.0.0.1", port=3000 + i) for i in range(2)]
    gib = 1024 ** 3
    statuses = {
        "d0": DeviceResult("d0", Status.OK, reply={"disk": {"free_bytes": gib // 2, "total_bytes": 8 * gib}}),
        "d1": DeviceResult("d1", Status.OK, reply={"disk": {"free_bytes": 4 * gib, "total_bytes": 8 * gib}}),
    }
    notes = status_table(devices, statuses, {}).split("\n\n", 1)[1].splitlines()
    assert notes == ["d0: only 512 MiB free of 8.0 GiB (6%) on the agent's storage: "
                     "deploys (and recordings) fail once it is full"]


async def test_an_even_split_marks_every_side(start_agent):
    agents = [await start_agent(handlers={"ver": V1}), await start_agent(handlers={"ver": V2})]
    devices = [device_for(a, f"d{i}") for i, a in enumerate(agents)]
    async with Fleet(devices) as fleet:
        statuses = await fleet.send_all({"command": "get_status"})
    assert drifted(devices, statuses) == {"d0": ["ver.py"], "d1": ["ver.py"]}


async def test_drift_counts_missing_and_extra_files_among_devices_of_one_type(start_agent):
    """A camera that refused a push (old file kept, new one missing) stands out; a sensor does not."""
    cams = [await start_agent(handlers={"ver": V1}), await start_agent(handlers={"ver": V1}),
            await start_agent(handlers={"old": CLASH})]
    sensor = await start_agent(handlers={"probe": V2.replace("handle_version", "handle_probe")})
    devices = [device_for(a, f"cam{i}", type="camera") for i, a in enumerate(cams)]
    devices.append(device_for(sensor, "sensor", type="sensor"))
    async with Fleet(devices) as fleet:
        statuses = await fleet.send_all({"command": "get_status"})
    assert drifted(devices, statuses) == {"cam2": ["old.py", "ver.py"]}
    table = status_table(devices, statuses, {})
    rows = {line.split()[0]: line for line in table.split("\n\n")[0].splitlines()[2:len(devices) + 2]}
    assert "- *" in rows["cam2"] and f"{sha(CLASH)[:8]} *" in rows["cam2"]
    assert "*" not in rows["cam0"] and "*" not in rows["sensor"]


def test_amounts_parse_counts_and_percentages():
    from fleet.rollout import Amount

    assert Amount.parse("25%", "batch").of(10) == 2 and Amount.parse("10", "batch").of(99) == 10
    assert Amount.parse(3, "batch").of(1) == 3
    assert Amount.parse("10%", "x").describe(25) == "10% (2 of 25 devices)" and Amount.parse("0", "x").describe(25) == "0"
    for bad in ("x", "-1", "120%", "1.5"):
        with pytest.raises(ConfigError):
            Amount.parse(bad, "batch")
    with pytest.raises(ConfigError):
        RolloutPlan(batch="0")
    assert str(RolloutPlan().batch) == "25%" and str(RolloutPlan(max_failures="3").max_failures) == "3"


async def test_an_idle_controller_connection_authenticates_before_the_agent_closes_strangers(start_agent):
    agent = await start_agent(token="t0k", unauthenticated_timeout=4.0)
    device = Device(id="d0", host="127.0.0.1", port=agent.address[1], token="t0k")
    async with Fleet([device], keepalive=True) as fleet:  # a long-lived controller, idle after connecting
        await fleet.connect()
        connection = fleet._connection("d0")
        await wait_until(lambda: connection.last_reply_at is not None, what="the first heartbeat")
        server_side = next(iter(agent.server.connections))
        assert server_side.state.authenticated  # well before the agent's 4 s for strangers
        assert connection.connected
