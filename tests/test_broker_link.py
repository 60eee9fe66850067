"""The agent through a real Mosquitto: requests and replies, birth and will, reconnecting."""

import asyncio
import json
import subprocess
import sys
import uuid

import aiomqtt
import pytest

from agent import __version__
from agent.config import AgentConfig, ConfigError
from agent.contract import listening_address
from conftest import REPO, until_online, wait_until
from fleet import Device, Fleet
from fleet.inventory import BrokerRoute

HELLO = "def handle_hello(data):\n    return {'hello': data.get('name', 'world')}\n"


class Watcher:
    """A plain MQTT client of the test's own: subscribes, publishes, and collects what arrives per topic."""

    def __init__(self, url_port: int) -> None:
        self.port = url_port
        self.received = {}

    async def __aenter__(self):
        self.client = aiomqtt.Client("127.0.0.1", self.port, identifier=f"watcher-{uuid.uuid4().hex[:8]}")
        await self.client.__aenter__()
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        async for message in self.client.messages:
            try:
                decoded = json.loads(message.payload)
            except ValueError:  # file contents other tests left at the broker (pifleet/blobs/...)
                continue
            self.received.setdefault(message.topic.value, []).append(decoded)

    async def latest(self, topic: str, predicate=lambda m: True):
        await wait_until(lambda: any(predicate(m) for m in self.received.get(topic, [])), what=topic)
        return [m for m in self.received[topic] if predicate(m)][-1]

    async def __aexit__(self, *exc):
        self._reader.cancel()
        await self.client.__aexit__(None, None, None)


async def test_an_agent_serves_requests_through_the_broker_and_says_when_it_is_online(start_agent, broker):
    agent = await start_agent(handlers={"hello": HELLO}, broker=broker.plain_url, device_id="m0")
    async with Watcher(broker.plain_port) as watcher:
        await watcher.client.subscribe("pifleet/m0/#", qos=1)
        status = await watcher.latest("pifleet/m0/status", lambda m: m["online"])
        assert (status["agent_version"], status["started_at"]) == (__version__, agent.started_at)
        reply_to = "pifleet/m0/reply/test"
        await watcher.client.publish("pifleet/m0/req", json.dumps(
            {"command": "hello", "name": "broker", "id": 7, "reply_to": reply_to}), qos=1)
        reply = await watcher.latest(reply_to)
        assert reply["id"] == 7 and reply["hello"] == "broker" and reply["success"] is True
        await agent.close()
        assert (await watcher.latest("pifleet/m0/status", lambda m: not m["online"]))["device_id"] == "m0"


async def test_a_request_whose_reply_would_leave_the_devices_tree_is_not_run(start_agent, broker, caplog):
    agent = await start_agent(handlers={"hello": HELLO}, broker=broker.plain_url, device_id="m1")
    await asyncio.wait_for(agent.broker_link.connected.wait(), 10)
    async with Watcher(broker.plain_port) as watcher:
        await watcher.client.subscribe("pifleet/+/reply/#", qos=1)
        for reply_to in ("pifleet/m2/reply/x", "pifleet/m1/reply/#", None):
            await watcher.client.publish("pifleet/m1/req", json.dumps(
                {"command": "hello", "id": 1, **({"reply_to": reply_to} if reply_to else {})}), qos=1)
        await watcher.client.publish("pifleet/m1/req", json.dumps(
            {"command": "ping", "id": 2, "reply_to": "pifleet/m1/reply/x"}), qos=1)
        assert (await watcher.latest("pifleet/m1/reply/x"))["id"] == 2  # requests are served in order
        assert [m["id"] for m in watcher.received["pifleet/m1/reply/x"]] == [2]
        assert "pifleet/m2/reply/x" not in watcher.received
    assert sum("without a usable 'reply_to'" in m for m in caplog.messages) == 3


async def test_an_agent_comes_back_after_the_broker_restarts(start_agent, own_broker):
    agent = await start_agent(broker=own_broker.plain_url, device_id="m3")
    link = agent.broker_link
    await asyncio.wait_for(link.connected.wait(), 10)
    own_broker.restart()
    await wait_until(lambda: link.connections == 2, timeout=30, what="the agent to reconnect")
    async with Watcher(own_broker.plain_port) as watcher:
        await watcher.client.subscribe("pifleet/m3/#", qos=1)
        await watcher.client.publish("pifleet/m3/req", json.dumps(
            {"command": "ping", "id": 3, "reply_to": "pifleet/m3/reply/t"}), qos=1)
        assert (await watcher.latest("pifleet/m3/reply/t"))["message"] == "pong"


@pytest.mark.parametrize("options, words", [
    ({"broker": "mqtt://127.0.0.1:1883"}, "--device-id"),
    ({"broker": "mqtt://127.0.0.1:1883", "device_id": "a/b"}, "--device-id"),
    ({"broker": "http://broker", "device_id": "d"}, "mqtts://"),
    ({"broker": "mqtt://broker.example.com", "device_id": "d"}, "refusing plain MQTT"),
    ({"broker": "mqtts://broker.example.com", "device_id": "d"}, "--tls-cert"),
    ({"device_id": "d"}, "give --broker too"),
])
def test_bad_broker_settings_are_refused_with_the_reason(tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        AgentConfig(root=tmp_path, **options)


async def test_an_agent_with_no_tcp_listener_is_reached_through_the_broker_alone(tmp_path, broker):
    agent = subprocess.Popen([sys.executable, "-m", "agent", "--root", str(tmp_path / "root"), "--no-listen",
                              "--broker", broker.plain_url, "--device-id", "quiet"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = agent.stdout.readline()
        assert f"listening on broker {broker.plain_url} as quiet" in line and listening_address(line) is None
        async with Fleet([Device(id="quiet", host="", broker=BrokerRoute(broker.plain_url))]) as fleet:
            status = await until_online(fleet, "quiet")
        assert status["success"] is True
    finally:
        agent.terminate()
        assert agent.wait(timeout=20) == 0
        agent.stdout.close()


def test_no_listen_without_a_broker_is_refused(tmp_path):
    run = subprocess.run([sys.executable, "-m", "agent", "--root", str(tmp_path), "--no-listen"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--no-listen leaves the agent no way to be reached" in run.stderr


def test_the_agent_refuses_to_start_with_a_broker_without_its_mqtt_client(tmp_path):
    hide = "import sys; sys.modules['paho'] = None; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", hide, "--root", str(tmp_path), "--broker", "mqtt://127.0.0.1:1883",
                          "--device-id", "d"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "sudo apt install python3-paho-mqtt" in run.stderr, run.stderr


async def test_a_bad_or_too_large_request_through_the_broker_gets_its_refusal(start_agent, broker):
    await start_agent(broker=broker.plain_url, device_id="m2", max_line_bytes=1024)
    reply_to = "pifleet/m2/reply/refusals"
    async with Watcher(broker.plain_port) as watcher:
        await watcher.client.subscribe(reply_to, qos=1)
        await watcher.client.publish("pifleet/m2/req", json.dumps({"id": 1, "reply_to": reply_to}), qos=1)
        await watcher.client.publish("pifleet/m2/req", json.dumps(
            {"id": 2, "command": "ping", "reply_to": reply_to, "padding": "x" * 2000}), qos=1)
        await watcher.latest(reply_to, lambda m: m["id"] == 2)
    assert [(m["id"], m["code"]) for m in watcher.received[reply_to]] == [(1, "bad_request"), (2, "too_large")]
