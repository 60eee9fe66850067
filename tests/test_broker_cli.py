"""The whole path over the command line: a fleet CA, a broker configured from it, a mixed fleet deployed to."""

import asyncio
import json
import shutil
from pathlib import Path

from conftest import sha, until_online
from fleet import Fleet
from fleet.cli import main
from fleet.inventory import load_inventory
from mosquitto import Mosquitto, free_port

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"


def fleet(capsys, *argv):
    capsys.readouterr()
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr()[0])


def test_a_broker_configured_by_fleet_carries_a_tls_device_beside_a_tcp_one(tmp_path, agents, capsys, broker_pki):
    # (broker_pki: skips the test, saying why, where mosquitto is not installed)
    ca = ["ca", "--ca-dir", str(tmp_path / "ca")]
    assert fleet(capsys, *ca, "init")[0] == 0
    _, made = fleet(capsys, *ca, "issue-broker", "127.0.0.1", "--out", str(tmp_path / "broker-tls"))
    _, device = fleet(capsys, *ca, "issue", "nat0", "--out", str(tmp_path / "nat0"))
    _, laptop = fleet(capsys, *ca, "issue-controller", "laptop", "--out", str(tmp_path / "laptop"))
    tls_port, plain_port = free_port(), free_port()
    code, written = fleet(capsys, "broker", "--ca-dir", str(tmp_path / "ca"), "config", "--cert", made["cert"],
                          "--out", str(tmp_path / "staging"), "--installed-at", str(tmp_path / "broker"),
                          "--port", str(tls_port), "--host", "127.0.0.1", "--user", "root")
    assert code == 0 and sorted(Path(p).name for p in written["written"]) == [
        "acl", "broker.crt", "broker.key", "ca.crt", "crl.pem", "mosquitto.conf"]
    shutil.copytree(tmp_path / "staging", tmp_path / "broker")  # the folder, copied to the broker's machine
    broker = Mosquitto(tmp_path / "broker" / "mosquitto.conf", tls_port, None)
    broker.start()
    try:
        agents.start("nat0", extra=["--broker", f"mqtts://127.0.0.1:{tls_port}", "--device-id", "nat0",
                                    "--tls-cert", device["cert"], "--tls-key", device["key"], "--tls-ca", device["ca"]])
        lan = agents.start("lan0")
        devices = tmp_path / "devices.json"
        devices.write_text(json.dumps({"defaults": {"connect_timeout": 5}, "raspberryPiDevices": [
            {"id": "lan0", "host": "127.0.0.1", "port": lan.device.port},
            {"id": "nat0", "transport": "mqtt", "broker": f"mqtts://127.0.0.1:{tls_port}",
             "ca": laptop["ca"], "cert": laptop["cert"], "key": laptop["key"]}]}))
        wait_online(devices, "nat0")
        (tmp_path / "ver.py").write_text(V1)
        code, report = fleet(capsys, "-d", str(devices), "deploy", str(tmp_path / "ver.py"), "--batch", "1")
        assert code == 0, report
        assert {d["device"]: (d["status"], d["new_version"]) for d in report["devices"]} == {
            "lan0": ("OK", sha(V1)), "nat0": ("OK", sha(V1))}
        _, status = fleet(capsys, "-d", str(devices), "status")
        assert {d["device"]: d["state"] for d in status["devices"]} == {"lan0": "current", "nat0": "current"}
    finally:
        broker.stop()


def wait_online(devices, device_id):
    """Until the broker says the device is online (its agent connects to it in the background)."""
    async def online():
        inventory = load_inventory(devices)
        async with Fleet([inventory.get(device_id)]) as fleet:
            return await until_online(fleet, device_id)

    assert asyncio.run(online())["success"] is True
