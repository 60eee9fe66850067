"""Signed code over real sockets: an agent with --trusted-keys runs only what a trusted release key signed."""

import json
import subprocess
import sys

import pytest

from agent.app import Agent
from agent.config import AgentConfig
from conftest import REPO, sha
from fleet.cli import main
from fleet.keys import init_key, load_key

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = V1.replace("VERSION = 1", "VERSION = 2")
V3 = V1.replace("VERSION = 1", "VERSION = 3")


@pytest.fixture
def keys(tmp_path):
    """Two release keys (a, b) and a trusted-keys folder holding both public keys."""
    made = {}
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    for name in ("a", "b", "stranger"):
        private, public, _ = init_key(tmp_path / f"key-{name}")
        made[name] = load_key(private)
        if name != "stranger":
            (trusted / f"{name}.pub").write_bytes(public.read_bytes())
    made["trusted"] = trusted
    return made


def signed(key, code, filename="ver.py", signed_as=None):
    """An update_handler request for ``code``, signed by ``key`` (for ``signed_as``'s name and code if given)."""
    name, source = signed_as or (filename, code)
    return {"filename": filename, "code": code, "signature": key.sign(name, sha(source)), "key_id": key.key_id}


async def test_a_signed_push_runs_and_its_signature_is_kept(start_agent, connect, keys):
    agent = await start_agent(trusted_keys=keys["trusted"])
    client = await connect(agent)
    reply = await client.call("update_handler", **signed(keys["a"], V1))
    assert reply["success"] is True, reply
    assert (await client.call("version"))["version"] == 1
    status = await client.call("get_status")
    assert status["signatures"] == {"required": True, "trusted_keys": sorted([keys["a"].key_id, keys["b"].key_id])}


@pytest.mark.parametrize("case, code", [
    ("unsigned", "unsigned"),
    ("tampered", "bad_signature"),
    ("another file's signature", "bad_signature"),
    ("unknown key", "bad_signature"),
])
async def test_pushes_that_do_not_verify_are_refused_and_nothing_changes(start_agent, connect, keys, case, code):
    agent = await start_agent(trusted_keys=keys["trusted"])
    client = await connect(agent)
    assert (await client.call("update_handler", **signed(keys["a"], V1)))["success"] is True
    request = {
        "unsigned": {"filename": "ver.py", "code": V2},
        "tampered": {**signed(keys["a"], V2), "code": V2.replace("2", "3")},  # one byte changed after signing
        "another file's signature": signed(keys["a"], V2, signed_as=("other.py", V2)),
        "unknown key": signed(keys["stranger"], V2),
    }[case]
    reply = await client.call("update_handler", **request)
    assert reply["success"] is False and reply["code"] == code, reply
    assert (await client.call("version"))["version"] == 1  # still the signed version
    log = (await client.call("update_log"))["entries"]
    assert [e["action"] for e in log] == ["deploy"]


async def test_keys_rotate_by_adding_the_new_one_and_removing_the_old(start_agent, connect, keys):
    agent = await start_agent(trusted_keys=keys["trusted"])
    client = await connect(agent)
    assert (await client.call("update_handler", **signed(keys["a"], V1)))["success"] is True
    assert (await client.call("update_handler", **signed(keys["b"], V2)))["success"] is True
    (keys["trusted"] / "a.pub").unlink()  # key a retired: read again at the next push, no restart
    refused = await client.call("update_handler", **signed(keys["a"], V3))
    assert refused["code"] == "bad_signature" and "does not trust" in refused["error"]
    assert (await client.call("update_handler", **signed(keys["b"], V3)))["success"] is True
    assert (await client.call("version"))["version"] == 3


async def test_a_rollback_to_a_version_that_came_unsigned_is_refused(tmp_path, keys, connect):
    root = tmp_path / "device"
    before = Agent(AgentConfig(root=root, port=0))  # signatures not required yet
    await before.start()
    client = await connect(before)
    assert (await client.call("update_handler", filename="ver.py", code=V1))["success"] is True
    assert (await client.call("update_handler", **signed(keys["a"], V2)))["success"] is True
    await client.close()
    await before.close()
    after = Agent(AgentConfig(root=root, port=0, trusted_keys=keys["trusted"]))  # now they are
    await after.start()
    try:
        client = await connect(after)
        assert (await client.call("version"))["version"] == 2  # came signed: loads at start
        reply = await client.call("rollback_handler", filename="ver.py")
        assert reply["success"] is False and reply["code"] == "unsigned", reply
        assert (await client.call("version"))["version"] == 2
    finally:
        await after.close()


async def test_a_file_found_unsigned_at_start_is_not_loaded(start_agent, connect, keys):
    agent = await start_agent(handlers={"ver": V1}, trusted_keys=keys["trusted"])
    client = await connect(agent)
    assert (await client.call("version"))["code"] == "unknown_command"
    status = await client.call("get_status")
    assert any("never came with a signature" in f["detail"] for f in status["integrity"]), status["integrity"]


def test_the_agent_refuses_to_start_with_trusted_keys_without_cryptography(tmp_path, keys):
    hide = "import sys; sys.modules['cryptography'] = None; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", hide, "--root", str(tmp_path / "a"), "--port", "0",
                          "--trusted-keys", str(keys["trusted"])], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "sudo apt install python3-cryptography" in run.stderr, run.stderr


def test_fleet_deploy_signs_with_the_configured_key_and_a_signed_agent_runs_it(tmp_path, agents, capsys):
    state = tmp_path / ".pifleet"
    assert main(["-d", str(tmp_path / "devices.json"), "keys", "init"]) == 2  # no inventory yet: said clearly
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"raspberryPiDevices": []}))
    assert main(["-d", str(devices), "keys", "init"]) == 0
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "release.pub").write_bytes((state / "keys" / "release.pub").read_bytes())
    agent = agents.start("d0", extra=["--trusted-keys", str(trusted)])
    devices.write_text(json.dumps({"raspberryPiDevices": [{"id": "d0", "host": "127.0.0.1",
                                                           "port": agent.device.port}]}))
    (tmp_path / "ver.py").write_text(V1)
    capsys.readouterr()
    assert main(["-d", str(devices), "deploy", str(tmp_path / "ver.py"), "--json"]) == 0
    assert "signing with release key" in capsys.readouterr()[1]
    (tmp_path / "ver.py").write_text(V2)
    other, _, _ = init_key(tmp_path / "other")
    assert main(["-d", str(devices), "deploy", str(tmp_path / "ver.py"), "--sign-key", str(other), "--json"]) == 1
    refused = json.loads(capsys.readouterr()[0])["devices"][0]
    assert refused["code"] == "bad_signature" and "does not trust" in refused["error"]
