"""Desired state through a real Mosquitto: devices behind NAT catch up with no controller running."""

import asyncio
import json

import aiomqtt

from conftest import sha, wait_until
from fleet import Device, Fleet, RolloutPlan, Status
from fleet.converge import deploy_targets, run_recorded
from fleet.fileset import HandlerFile
from fleet.inventory import BrokerRoute
from fleet.state import StateStore

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
CAM = "def handle_cam(data):\n    return {'cam': 1}\n"
BROKEN = "import no_such_module_for_pifleet\n\ndef handle_zz(data):\n    return {}\n"


def via(broker, device_id):
    return Device(id=device_id, host="", broker=BrokerRoute(broker.plain_url))


async def deploy(fleet, store, files, ids):
    targets = deploy_targets(store, ids, [HandlerFile.of(name, code) for name, code in files.items()],
                             message="test", author="test")
    return await run_recorded(fleet, store, "deploy", targets, RolloutPlan(batch=10))


async def reported(broker, device_id, release):
    """The device's report on ``release``: the retained one, or the first to come (a client of the test's own)."""
    async def first():
        async with aiomqtt.Client("127.0.0.1", broker.plain_port) as client:
            await client.subscribe(f"pifleet/{device_id}/reported", qos=1)
            async for message in client.messages:
                report = json.loads(message.payload)
                if report["release"] == release:
                    return report

    return await asyncio.wait_for(first(), 60)  # a bound, for a loaded machine: the report usually comes at once


async def pushes(agent, filename):
    log = (await agent.dispatcher.handle(_request({"command": "update_log", "limit": 50}), authorized=True))
    return [e for e in json.loads(log)["entries"] if e.get("file") == filename and e.get("action") == "deploy"]


def _request(message):
    from agent.protocol import parse_request

    return parse_request(json.dumps(message).encode())


async def test_a_device_offline_at_deploy_time_converges_when_it_connects_with_no_controller_running(
        start_agent, broker, tmp_path):
    online = await start_agent(broker=broker.plain_url, device_id="m6")
    with StateStore(tmp_path / "state.db") as store:
        async with Fleet([via(broker, "m6"), via(broker, "m7")]) as fleet:
            report = await deploy(fleet, store, {"ver.py": V1, "cam.py": CAM}, ["m6", "m7"])
        assert report.results["m6"].status is Status.OK and report.results["m7"].status is Status.UNREACHABLE
        assert report.desired_problems == {}
    # The controller is gone. m7 comes online and finds its release at the broker.
    late = await start_agent(broker=broker.plain_url, device_id="m7")
    await wait_until(lambda: late.desired.applied == 1, what="m7 to apply its desired release")
    assert {name: m.sha256 for name, m in late.registry.modules.items()} == {"ver": sha(V1), "cam": sha(CAM)}
    release = report.releases[0]
    report7 = await reported(broker, "m7", release)
    assert report7["state"] == "current" and report7["files"] == {"cam.py": sha(CAM), "ver.py": sha(V1)}
    # m6 was pushed during the deploy: the desired release changed nothing there, nothing was applied twice
    assert (await reported(broker, "m6", release))["state"] == "current"
    assert online.desired.applied == 0 and len(await pushes(online, "ver.py")) == 1


async def test_a_release_that_fails_on_the_device_leaves_it_on_its_previous_release_and_says_why(
        start_agent, broker, tmp_path):
    with StateStore(tmp_path / "state.db") as store:
        async with Fleet([via(broker, "m8")]) as fleet:
            await deploy(fleet, store, {"ver.py": V1}, ["m8"])  # m8 is not running yet: the release waits
            agent = await start_agent(broker=broker.plain_url, device_id="m8")
            await wait_until(lambda: agent.desired.applied == 1, what="release 1")
            agent_files = dict(agent.registry.modules)
            await agent.close()
            second = await deploy(fleet, store, {"cam.py": CAM, "zz.py": BROKEN}, ["m8"])  # cam.py lands, zz.py fails
    again = await start_agent(broker=broker.plain_url, device_id="m8", root=agent.config.root)
    report = await reported(broker, "m8", second.releases[0])
    assert report["state"] == "failed" and report["file"] == "zz.py" and report["code"] == "validation_failed"
    assert "no_such_module_for_pifleet" in report["error"]
    assert set(again.registry.modules) == set(agent_files) == {"ver"}  # cam.py was put back: release 1, whole


async def test_a_broker_restart_in_the_middle_of_a_rollout_ends_with_every_device_converged_once(
        start_agent, own_broker, tmp_path):
    ids = [f"m{n}" for n in range(4)]
    agents = [await start_agent(broker=own_broker.plain_url, device_id=d) for d in ids]
    first_result = asyncio.Event()
    with StateStore(tmp_path / "state.db") as store:
        async with Fleet([via(own_broker, d) for d in ids], request_timeout=30) as fleet:
            targets = deploy_targets(store, ids, [HandlerFile.of("ver.py", V1)], message="test", author="test")
            rollout = asyncio.ensure_future(run_recorded(fleet, store, "deploy", targets,
                                                         RolloutPlan(canary=1, batch=1),
                                                         on_result=lambda result: first_result.set()))
            await first_result.wait()
            await asyncio.to_thread(own_broker.restart)  # the next waves go out while it is down, or just after
            report = await rollout
    assert not report.halted and not report.desired_problems, (report.halt_reason, report.desired_problems)
    for device_id, agent in zip(ids, agents):
        # Each device reports on release 1 once it has compared it with what it runs: pushed or converged
        assert (await reported(own_broker, device_id, report.releases[0]))["state"] == "current"
        assert agent.registry.modules["ver"].sha256 == sha(V1)
        assert len(await pushes(agent, "ver.py")) == 1  # pushed or converged, never both


async def test_rollback_to_a_release_and_of_one_file_through_the_broker(start_agent, broker, tmp_path):
    from fleet.converge import fileset_of

    agent = await start_agent(broker=broker.plain_url, device_id="m9")
    v2 = V1.replace("VERSION = 1", "VERSION = 2")
    with StateStore(tmp_path / "state.db") as store:
        async with Fleet([via(broker, "m9")]) as fleet:
            first = await deploy(fleet, store, {"ver.py": V1}, ["m9"])
            await deploy(fleet, store, {"ver.py": v2}, ["m9"])
            assert (await fleet.send("m9", {"command": "version"}))["version"] == 2
            undone = await fleet.send("m9", {"command": "rollback_handler", "filename": "ver.py"})  # one file
            assert undone["success"] is True and undone["version"] == sha(V1)
            await deploy(fleet, store, {"ver.py": v2}, ["m9"])
            back = await run_recorded(fleet, store, "rollback", {"m9": fileset_of(store, first.releases[0])},
                                      RolloutPlan())
            assert back.ok and (await fleet.send("m9", {"command": "version"}))["version"] == 1
    assert (await reported(broker, "m9", first.releases[0]))["state"] == "current"  # its desired release, too
    assert agent.registry.modules["ver"].sha256 == sha(V1)


async def test_status_tells_what_an_offline_device_last_reported_at_its_broker(start_agent, broker, tmp_path):
    from fleet.status_view import standings, status_table

    agent = await start_agent(broker=broker.plain_url, device_id="gone")
    devices = [via(broker, "gone")]
    with StateStore(tmp_path / "state.db") as store:
        async with Fleet(devices) as fleet:
            report = await deploy(fleet, store, {"ver.py": V1}, ["gone"])
            release = report.releases[0]
            await reported(broker, "gone", release)
            await agent.close()
            await wait_until(lambda: not fleet.connected("gone"), what="the broker to say it is offline")
            statuses, last = await fleet.status()
            reports = await fleet.last_reports(["gone"])
            places = standings(devices, statuses, store.desired(["gone"]), *store.release_index(), reports)
    assert statuses["gone"].status is Status.UNREACHABLE and reports["gone"]["state"] == "current"
    assert (places["gone"].state, places["gone"].desired_release, places["gone"].reported_release) == (
        "unreachable", release, release)
    assert f"gone: last reported release {release} (current, " in status_table(devices, statuses, last, places,
                                                                              reports=reports)


async def test_a_desired_release_the_broker_did_not_take_is_named_for_the_next_converge(own_broker, tmp_path):
    from fleet.broker_desired import leave_desired

    with StateStore(tmp_path / "state.db") as store:
        async with Fleet([via(own_broker, "late"), Device(id="lan", host="127.0.0.1", port=1)],
                         connect_timeout=1) as fleet:
            report = await deploy(fleet, store, {"ver.py": V1}, ["late", "lan"])  # both offline: waits for them
            assert report.desired_problems == {}
            own_broker.stop()
            problems = await leave_desired(fleet, store, ["late", "lan"])
    assert list(problems) == ["late"] and "cannot reach the broker" in problems["late"]  # lan: not a broker's
