"""Provisioning devices: the inventory keeps its form, each device gets its own token, and agents started
from the provisioned folders are reached with theirs."""

import json
import shutil
import socket

from conftest import REPO
from fleet.cli import main
from fleet.local import free_port


def test_two_provisioned_devices_are_reached_each_with_its_own_token(tmp_path, agents, capsys, monkeypatch):
    inventory = tmp_path / "devices.json"
    shutil.copy(REPO / "devices.json", inventory)
    original = inventory.read_text()
    monkeypatch.chdir(tmp_path)
    ports = {}
    for device_id in ("pit", "paddock"):
        ports[device_id] = free_port()
        assert main(["-d", str(inventory), "provision", device_id, "--host", "127.0.0.1", "--port",
                     str(ports[device_id]), "--type", "camera", "--tag", "cams", "--json"]) == 0
        made = json.loads(capsys.readouterr()[0])
        assert made["files"] == ["install.sh", "token"] and not made["tls"]
    text = inventory.read_text()
    assert text.startswith(original[:original.rindex("}", 0, original.rindex("]"))])  # the old entries untouched
    entries = json.loads(text)["raspberryPiDevices"]
    assert [e["id"] for e in entries][-2:] == ["pit", "paddock"]
    tokens = {d: (tmp_path / "provisioned" / d / "token").read_text().strip() for d in ports}
    assert len(set(tokens.values())) == 2 and all(len(t) >= 40 for t in tokens.values())
    assert (tmp_path / ".pifleet" / "tokens" / "pit").stat().st_mode & 0o777 == 0o600

    for device_id, port in ports.items():  # each Pi starts from its own folder
        agents.start(device_id, extra=["--port", str(port), "--token-file",
                                       str(tmp_path / "provisioned" / device_id / "token")])
    assert main(["-d", str(inventory), "status", "--only", "pit,paddock", "--json"]) == 0
    assert [d["reachable"] for d in json.loads(capsys.readouterr()[0])["devices"]] == [True, True]

    with socket.create_connection(("127.0.0.1", ports["paddock"])) as sock:  # pit's token does not open paddock
        sock.sendall(json.dumps({"command": "ping", "token": tokens["pit"]}).encode() + b"\n")
        assert json.loads(sock.makefile().readline())["code"] == "unauthorized"


def test_with_a_fleet_ca_the_folder_holds_the_devices_certificate(tmp_path, capsys):
    inventory = tmp_path / "devices.json"
    inventory.write_text('{"raspberryPiDevices": []}\n')
    assert main(["-d", str(inventory), "ca", "init"]) == 0
    capsys.readouterr()
    assert main(["-d", str(inventory), "provision", "gate", "--host", "10.0.0.7", "--out", str(tmp_path / "usb"),
                 "--tarball", "--json"]) == 0
    made = json.loads(capsys.readouterr()[0])
    assert made["tls"] and made["files"] == ["ca.crt", "crl.pem", "device.crt", "device.key", "install.sh", "token"]
    assert "--tls-cert /etc/pi-agent/device.crt" in (tmp_path / "usb" / "gate" / "install.sh").read_text()
    assert (tmp_path / "usb" / "gate.tar.gz").exists()
    assert main(["-d", str(inventory), "provision", "gate", "--host", "10.0.0.8"]) == 2  # the id is taken
    assert "there is a device 'gate' already" in capsys.readouterr()[1]


def test_the_projects_sample_inventory_is_not_provisioned_into(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLEET_DEVICES", raising=False)
    assert main(["provision", "x", "--host", "10.0.0.1"]) == 2
    assert "this is the project's sample" in capsys.readouterr()[1]


def test_a_device_behind_nat_is_provisioned_to_connect_out_to_the_broker(tmp_path, capsys):
    inventory = tmp_path / "devices.json"
    inventory.write_text('{"defaults": {"ca": "ca.crt", "cert": "laptop.crt", "key": "laptop.key"},\n'
                         ' "raspberryPiDevices": []}\n')
    url = "mqtts://broker.example.com:8883"
    out = ["--out", str(tmp_path / "usb")]
    assert main(["-d", str(inventory), "provision", "van", "--broker", url, *out]) == 2  # no CA: no identity
    assert "`fleet ca init` first" in capsys.readouterr()[1]
    assert not (tmp_path / "usb").exists() and not (tmp_path / ".pifleet" / "tokens").exists()  # nothing written
    assert main(["-d", str(inventory), "ca", "init"]) == 0
    capsys.readouterr()
    assert main(["-d", str(inventory), "provision", "van", "--broker", url, "--out", str(tmp_path / "usb"),
                 "--json"]) == 0
    made = json.loads(capsys.readouterr()[0])
    assert made["tls"] and "device.crt" in made["files"]
    (entry,) = json.loads(inventory.read_text())["raspberryPiDevices"]
    assert {k: entry[k] for k in ("id", "transport", "broker")} == {"id": "van", "transport": "mqtt", "broker": url}
    install = (tmp_path / "usb" / "van" / "install.sh").read_text()
    assert f"--no-listen --broker {url} --device-id van --token-file /etc/pi-agent/token --tls-cert" in install
    assert main(["-d", str(inventory), "provision", "bus", "--host", "10.0.0.9", "--broker", url, *out]) == 2
    assert "one of them" in capsys.readouterr()[1]
