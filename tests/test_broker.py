"""The controller through a real Mosquitto: the same Fleet, rollouts and status, for devices behind NAT."""

import asyncio
import json
import ssl

import aiomqtt
import pytest

from conftest import sha, wait_until
from fleet import Device, Fleet, RolloutPlan, Status, deploy
from fleet.inventory import BrokerRoute
from fleet.tls import ClientTLS

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = V1.replace("VERSION = 1", "VERSION = 2")
BROKEN = "import no_such_module_for_pifleet\n" + V1  # fails its import test on the device


def via(broker, device_id: str, tls=None) -> Device:
    return Device(id=device_id, host="", broker=BrokerRoute(broker.tls_url if tls else broker.plain_url, tls))


def tcp(agent, device_id: str) -> Device:
    return Device(id=device_id, host=agent.address[0], port=agent.address[1])


async def test_ping_send_all_and_status_through_the_broker_with_offline_devices_named(start_agent, broker):
    await start_agent(broker=broker.plain_url, device_id="m0")
    devices = [via(broker, "m0"), via(broker, "never-started")]
    async with Fleet(devices) as fleet:
        assert (await fleet.send("m0", {"command": "ping"}))["message"] == "pong"
        results = await fleet.send_all({"command": "ping"})
        assert results["m0"].status is Status.OK
        assert results["never-started"].status is Status.UNREACHABLE
        assert "never seen at the broker" in results["never-started"].error
        statuses, _ = await fleet.status()
        assert statuses["m0"].status is Status.OK and statuses["m0"].reply["agent_version"]


async def test_a_device_that_went_away_is_offline_by_its_last_will(start_agent, broker):
    agent = await start_agent(broker=broker.plain_url, device_id="m1")
    async with Fleet([via(broker, "m1")]) as fleet:
        assert (await fleet.send_all({"command": "ping"}))["m1"].status is Status.OK
        await agent.close()
        await wait_until(lambda: not fleet.connected("m1"), what="the broker to say m1 is offline")
        result = (await fleet.send_all({"command": "ping"}))["m1"]
    assert result.status is Status.UNREACHABLE and "offline at the broker" in result.error


async def test_a_mixed_fleet_deploys_in_waves_and_halts_on_a_failure(start_agent, broker, tmp_path):
    behind_nat = [await start_agent(broker=broker.plain_url, device_id=f"m{n}") for n in (2, 3)]
    on_lan = [await start_agent() for _ in range(2)]
    devices = [via(broker, "m2"), tcp(on_lan[0], "lan0"), via(broker, "m3"), tcp(on_lan[1], "lan1")]
    async with Fleet(devices) as fleet:
        (tmp_path / "ver.py").write_text(V1)
        report = await deploy(fleet, tmp_path / "ver.py", plan=RolloutPlan(batch=2, verify="version"))
        assert report.ok and {r.new_version for r in report.results.values()} == {sha(V1)}
        (tmp_path / "ver.py").write_text(BROKEN)
        report = await deploy(fleet, tmp_path / "ver.py", plan=RolloutPlan(canary=1, batch=2))
        assert not report.ok and report.results["m2"].status is Status.FAILED  # the canary, through the broker
        assert all(report.results[d].status is Status.SKIPPED for d in ("lan0", "m3", "lan1"))
        answers = await fleet.send_all({"command": "version"})
    assert {r.reply["version"] for r in answers.values()} == {1}
    assert all(agent.registry.modules["ver"].sha256 == sha(V1) for agent in behind_nat + on_lan)


def identity(broker, issued) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(broker.pki.ca.cert_path))
    context.load_cert_chain(str(issued.cert), str(issued.key))
    return context


async def test_a_devices_identity_reads_no_other_devices_requests_and_cannot_answer_for_it(start_agent, broker):
    pki = broker.pki
    m4 = pki.devices["m4"]
    await start_agent(broker=broker.tls_url, device_id="m4", tls=_agent_files(m4, pki))
    controller = ClientTLS(pki.ca.cert_path, pki.controller.cert, pki.controller.key)
    unmatched = []
    async with Fleet([via(broker, "m4", controller)], on_message=lambda _d, m: unmatched.append(m)) as fleet, \
            aiomqtt.Client(
            "127.0.0.1", broker.tls_port, identifier="thief", tls_context=identity(broker, pki.devices["m5"])) as thief:
        seen = []
        await thief.subscribe([("pifleet/m4/#", 1), ("pifleet/m5/req", 1)])
        reader = asyncio.ensure_future(_collect(thief, seen))
        session = fleet._connections["m4"].session
        await fleet.connect("m4")
        # m5's identity answers for m4, before m4 does: the broker must drop it (it acknowledges it all the same)
        await thief.publish(f"pifleet/m4/reply/{session.name}", json.dumps(
            {"id": 1, "success": True, "type": "pong", "message": "forged"}), qos=1)
        reply = await fleet.send("m4", {"command": "ping"})
        assert reply["message"] == "pong"
        session.publish("pifleet/m5/req", b'{"marker": true}')  # m5 may read this: it comes after all the rest
        await wait_until(lambda: {"marker": True} in seen, what="the marker")
        reader.cancel()
    assert seen == [{"marker": True}]  # nothing of m4's: not its requests, nor its status, nor its replies
    assert unmatched == []  # and the forged reply never reached the controller


async def _collect(client, seen):
    async for message in client.messages:
        seen.append(json.loads(message.payload))


def _agent_files(issued, pki):
    from agent.tls import TLSFiles

    return TLSFiles(issued.cert, issued.key, issued.ca, pki.ca.crl_path)


async def test_a_watched_device_is_seen_coming_back_after_the_broker_restarts(start_agent, own_broker):
    await start_agent(broker=own_broker.plain_url, device_id="m5")
    came_online = []
    async with Fleet([via(own_broker, "m5")]) as fleet:
        fleet.watch(came_online.append, retry_every=0.5)
        await fleet.connect("m5")
        await asyncio.to_thread(own_broker.restart)
        # The controller connects again by itself, and hears from the broker that m5 is back
        await wait_until(lambda: len(came_online) >= 2 and fleet.connected("m5"), timeout=30,
                         what="m5 online again, as the broker tells the watching controller")
        assert (await fleet.send("m5", {"command": "ping"}))["message"] == "pong"
        assert fleet.connection_status()["m5"]["reconnects"] == len(came_online) - 1  # the first is no reconnection
