"""Mutual TLS over real sockets: the fleet CA's certificates, the agent's checks, and the controller's."""

import json
import os
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError
from conftest import sha
from fleet import Device, Fleet, RolloutPlan, Status, deploy
from fleet.tls import ClientTLS

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = V1.replace("VERSION = 1", "VERSION = 2")
MARK = ("import os\n\ndef handle_mark(data):\n    open(os.path.join(os.path.dirname(__file__), '..', 'marked'), 'w')"
        ".close()\n    return {}\n")


def tls_device(agent, device_id, tls):
    return Device(id=device_id, host=agent.address[0], port=agent.address[1], tls=tls)


async def test_a_controller_with_the_fleets_certificate_pings_deploys_rolls_back_and_reads_status(
        start_agent, pki, tmp_path):
    agent = await start_agent(tls=pki.agent_files("d0"))
    async with Fleet([tls_device(agent, "d0", pki.client())]) as fleet:
        assert (await fleet.send("d0", {"command": "ping"}))["success"] is True
        for code in (V1, V2):
            (tmp_path / "ver.py").write_text(code)
            report = await deploy(fleet, tmp_path / "ver.py", plan=RolloutPlan(verify="version"))
            assert report.ok and report.results["d0"].new_version == sha(code)
        rolled = await fleet.send("d0", {"command": "rollback_handler", "filename": "ver.py"})
        assert rolled["success"] is True and rolled["version"] == sha(V1)
        statuses, _ = await fleet.status()
        assert statuses["d0"].status is Status.OK and statuses["d0"].reply["modules"][0]["sha256"] == sha(V1)


@pytest.mark.parametrize("who, words", [
    ("stranger", "refused this controller's certificate: it was not issued by the fleet CA in"),
    ("expired", "refused this controller's certificate: it expired on"),
    ("lost", "refused this controller's certificate: it may have been revoked"),
])
async def test_refused_controller_certificates_run_nothing_and_say_why(start_agent, pki, who, words):
    agent = await start_agent(handlers={"mark": MARK}, tls=pki.agent_files("d0"))
    if who == "lost":
        assert pki.ca.revoke("lost-laptop")  # after the agent started: it re-reads its list
    issued = getattr(pki, who)
    client = ClientTLS(pki.ca.cert_path, issued.cert, issued.key)
    async with Fleet([tls_device(agent, "d0", client)]) as fleet:
        result = (await fleet.send_all({"command": "mark"}))["d0"]
    assert result.status is Status.FAILED and result.code == "tls_failed", result
    assert words in result.error, result.error
    assert not (agent.config.root / "marked").exists()


async def test_a_plain_connection_to_a_tls_agent_runs_nothing_and_says_to_set_tls(start_agent, pki):
    agent = await start_agent(handlers={"mark": MARK}, tls=pki.agent_files("d0"))
    async with Fleet([Device(id="d0", host=agent.address[0], port=agent.address[1])]) as fleet:
        result = (await fleet.send_all({"command": "mark"}))["d0"]
    assert result.status is not Status.OK and '"tls": true' in result.error, result
    assert not (agent.config.root / "marked").exists()


async def test_an_agent_with_another_devices_certificate_is_not_sent_anything(start_agent, pki):
    impostor = await start_agent(handlers={"mark": MARK}, tls=pki.agent_files("d1"))
    async with Fleet([tls_device(impostor, "d0", pki.client())]) as fleet:
        result = (await fleet.send_all({"command": "mark"}))["d0"]
    assert result.status is Status.FAILED and result.code == "wrong_device"
    assert "presented a certificate for d1, not d0" in result.error
    assert not (impostor.config.root / "marked").exists()


async def test_a_tls_agent_refuses_a_controller_certificate_revoked_while_it_runs(start_agent, pki):
    agent = await start_agent(tls=pki.agent_files("d0"))
    device = tls_device(agent, "d0", pki.client(pki.lost))
    async with Fleet([device]) as fleet:
        assert (await fleet.send_all({"command": "ping"}))["d0"].status is Status.OK
    pki.ca.revoke("lost-laptop")
    async with Fleet([device]) as fleet:  # a new connection: the agent has re-read its revocation list
        assert (await fleet.send_all({"command": "ping"}))["d0"].code == "tls_failed"
    async with Fleet([tls_device(agent, "d0", pki.client())]) as fleet:  # the others still get in
        assert (await fleet.send_all({"command": "ping"}))["d0"].status is Status.OK


def test_tls_lets_an_agent_listen_beyond_loopback_without_a_token(tmp_path, pki):
    AgentConfig(root=tmp_path, host="0.0.0.0", tls=pki.agent_files("d0"))
    with pytest.raises(ConfigError, match="without a token or TLS"):
        AgentConfig(root=tmp_path, host="0.0.0.0")


async def test_with_tls_and_a_token_both_are_checked(start_agent, pki):
    agent = await start_agent(tls=pki.agent_files("d0"), token="s3cret")
    async with Fleet([tls_device(agent, "d0", pki.client())]) as fleet:
        assert (await fleet.send_all({"command": "ping"}))["d0"].code == "unauthorized"
    with_token = Device(id="d0", host=agent.address[0], port=agent.address[1], tls=pki.client(), token="s3cret")
    async with Fleet([with_token]) as fleet:
        assert (await fleet.send_all({"command": "ping"}))["d0"].status is Status.OK


def test_the_agent_refuses_to_start_with_partial_or_unusable_tls_files(tmp_path, pki):
    from agent.cli import main

    issued = pki.devices["d0"]
    assert main(["--root", str(tmp_path / "a"), "--tls-cert", str(issued.cert)]) == 2
    assert main(["--root", str(tmp_path / "a"), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
                 "--tls-ca", str(tmp_path / "missing.crt")]) == 2


def test_the_ca_keeps_its_key_private_and_refuses_a_second_certificate_for_a_live_name(pki, tmp_path):
    assert os.stat(pki.ca.key_path).st_mode & 0o777 == 0o600
    assert os.stat(pki.devices["d0"].key).st_mode & 0o777 == 0o600
    from fleet.errors import ConfigError as FleetConfigError

    with pytest.raises(FleetConfigError, match="already has a device certificate"):
        pki.ca.issue("d0", tmp_path / "again")
    with pytest.raises(FleetConfigError, match="there is a CA"):
        pki.ca.init()


def test_the_inventory_names_tls_files_per_device_or_in_defaults_relative_to_itself(tmp_path):
    from fleet.errors import ConfigError as FleetConfigError
    from fleet.inventory import load_inventory

    path = tmp_path / "site" / "devices.json"
    path.parent.mkdir()
    path.write_text('{"defaults": {"tls": true, "ca": "pki/ca.crt", "cert": "pki/me.crt", "key": "pki/me.key"},'
                    ' "raspberryPiDevices": [{"id": "d0", "host": "10.0.0.5"},'
                    ' {"id": "d1", "host": "10.0.0.6", "tls": false}]}')
    d0, d1 = load_inventory(path).devices
    assert d0.tls == ClientTLS(path.parent / "pki/ca.crt", path.parent / "pki/me.crt", path.parent / "pki/me.key")
    assert d1.tls is None
    path.write_text('{"raspberryPiDevices": [{"id": "d0", "host": "10.0.0.5", "tls": true, "ca": "ca.crt"}]}')
    with pytest.raises(FleetConfigError, match="with TLS, 'cert' must name a file"):
        load_inventory(path)


async def test_a_devices_certificate_cannot_command_another_device(start_agent, pki):
    agent = await start_agent(handlers={"mark": MARK}, tls=pki.agent_files("d0"))
    d1 = pki.devices["d1"]  # the certificate on a Pi someone took away
    async with Fleet([tls_device(agent, "d0", ClientTLS(pki.ca.cert_path, d1.cert, d1.key))]) as fleet:
        result = (await fleet.send_all({"command": "mark"}))["d0"]
    assert result.status is Status.FAILED and result.code == "tls_failed", result
    assert not (agent.config.root / "marked").exists()


def test_the_whole_path_from_ca_init_to_a_lost_pi_over_the_command_line(tmp_path, agents, capsys):
    """The README's steps: a CA, a certificate per Pi, the three files on the Pi, devices.json; then a Pi is lost."""
    from fleet.cli import main

    devices = tmp_path / "devices.json"
    devices.write_text('{"raspberryPiDevices": []}')
    assert main(["-d", str(devices), "ca", "init"]) == 0
    assert main(["-d", str(devices), "ca", "issue-controller", "laptop"]) == 0
    ca = tmp_path / ".pifleet" / "ca"
    entries = []
    for device_id in ("d0", "d1"):
        assert main(["-d", str(devices), "ca", "issue", device_id, "--out", str(tmp_path / "usb" / device_id)]) == 0
        pi = tmp_path / "usb" / device_id  # what is copied to the Pi: three files, and the revocation list
        assert (pi / "crl.pem").read_bytes() == (ca / "crl.pem").read_bytes()
        agent = agents.start(device_id, extra=["--host", "127.0.0.1", "--tls-cert", str(pi / "device.crt"),
                                               "--tls-key", str(pi / "device.key"), "--tls-ca", str(pi / "ca.crt"),
                                               "--tls-crl", str(pi / "crl.pem")])
        entries.append({"id": device_id, "host": "127.0.0.1", "port": agent.device.port})
    controller = ca / "issued" / "laptop"
    devices.write_text(json.dumps({"defaults": {"tls": True, "ca": str(controller / "ca.crt"),
                                                "cert": str(controller / "controller.crt"),
                                                "key": str(controller / "controller.key"),
                                                "crl": str(ca / "crl.pem")},
                                   "raspberryPiDevices": entries}))
    capsys.readouterr()
    assert main(["-d", str(devices), "status", "--json"]) == 0
    assert [d["state"] for d in json.loads(capsys.readouterr()[0])["devices"]] == ["unmanaged", "unmanaged"]

    # d1 is lost: revoke it. The controller stops trusting that certificate at once; the next deploy gives
    # every agent the new list, so the lost Pi's certificate cannot command the others either.
    assert main(["-d", str(devices), "ca", "revoke", "d1"]) == 0
    (tmp_path / "ver.py").write_text(V1)
    capsys.readouterr()
    assert main(["-d", str(devices), "deploy", str(tmp_path / "ver.py"), "--max-failures", "1", "--json"]) == 1
    out, err = capsys.readouterr()
    results = {d["device"]: d for d in json.loads(out)["devices"]}
    assert results["d0"]["status"] == "OK"
    assert results["d1"]["code"] == "tls_failed" and "has been revoked" in results["d1"]["error"]
    assert "revocation list" in err and "new on 1 device(s)" in err
    assert (tmp_path / "usb" / "d0" / "crl.pem").read_bytes() == (ca / "crl.pem").read_bytes()
