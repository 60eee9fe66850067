"""The deploy pipeline as a service: called directly, no socket, the same rules as the wire."""

import pytest

from agent.changes import Untouched
from agent.errors import ChecksumMismatch, Quarantined, StorageFailed, ValidationFailed
from conftest import sha
from test_deploy import version_module


async def test_update_rollback_and_delete_without_a_socket(start_agent):
    agent = await start_agent()
    pipeline = agent.pipeline
    first = await pipeline.update("ver", version_module(1).encode())
    assert first.commands == ["version"] and first.backup is None and first.previous_version is None
    second = await pipeline.update("ver", version_module(2).encode(), sha256=sha(version_module(2)))
    assert second.previous_version == sha(version_module(1)) and second.backup is not None
    assert (await pipeline.update("ver", version_module(2).encode())).unchanged is True
    back = await pipeline.rollback("ver")
    assert back.version == sha(version_module(1)) and back.restored_from
    untouched = await pipeline.delete("ver", if_version=sha(version_module(2)))
    assert untouched == Untouched("ver", sha(version_module(1)), sha(version_module(2)))
    removal = await pipeline.delete("ver")
    assert removal.removed_commands == ["version"] and "ver" not in agent.registry.modules


async def test_refusals_are_the_same_errors_the_wire_carries(start_agent):
    pipeline = (await start_agent()).pipeline
    with pytest.raises(ChecksumMismatch):
        await pipeline.update("ver", b"x = 1\n", sha256="0" * 64)
    with pytest.raises(ValidationFailed, match="Dangerous pattern detected: os.system"):
        await pipeline.update("ver", b"import os\nos.system('true')\n")
    with pytest.raises(ValidationFailed, match="declares the encoding 'latin-1'"):
        await pipeline.update("ver", b"# coding: latin-1\n")


async def test_a_quarantined_version_needs_force_and_force_takes_it_out(start_agent):
    agent = await start_agent()
    code = version_module(3).encode()
    await agent.pipeline.run(lambda: agent.quarantine.add("ver", sha(version_module(3)), code,
                                                          reason="it killed the agent", action="deploy"))
    with pytest.raises(Quarantined, match="it killed the agent"):
        await agent.pipeline.update("ver", code)
    assert (await agent.pipeline.update("ver", code, force=True)).version == sha(version_module(3))
    assert agent.quarantine.entries() == []


def module(name: str, n: int, pad: int = 0) -> bytes:
    """Version ``n`` of handler ``name`` (its own command), ``pad`` bytes longer."""
    return (f"VERSION = {n}\ndef handle_{name}_version(data):\n    return {{'version': VERSION}}\n"
            + "#" * pad + "\n").encode()


async def test_a_new_file_past_the_handler_file_cap_is_refused_and_changes_nothing(start_agent):
    agent = await start_agent(max_handler_files=2)
    for name in ("a", "b"):
        await agent.pipeline.update(name, module(name, 1))
    with pytest.raises(StorageFailed, match="already has 2 handler files"):
        await agent.pipeline.update("c", module("c", 1))
    assert sorted(p.name for p in agent.store.handlers_dir.iterdir()) == ["a.py", "b.py"]
    assert "c" not in agent.registry.modules
    assert (await agent.pipeline.update("a", module("a", 2))).backup is not None  # a new version still fits


async def test_backups_stay_within_their_budget_and_the_newest_of_each_file_stays(start_agent):
    agent = await start_agent(max_backup_bytes=5000)
    for n in range(1, 8):  # six backups of ~1 KB would pass 5,000 bytes
        await agent.pipeline.update("a", module("a", n, 1000))
    await agent.pipeline.update("b", module("b", 1, 1000))
    await agent.pipeline.update("b", module("b", 2, 1000))
    assert sum(entry["size"] for entry in agent.store.backups()) <= 5000
    newest = {}
    for entry in agent.store.backups():  # newest first
        newest.setdefault(entry["file"], entry["backup"])
    assert agent.store.read_backup("a", newest["a.py"]) == module("a", 6, 1000)
    assert agent.store.read_backup("b", newest["b.py"]) == module("b", 1, 1000)
    await agent.pipeline.update("c", module("c", 1, 6000))  # no backup needed: a new file
    with pytest.raises(StorageFailed, match="budget of 5000 bytes"):  # backing up c@1 alone would pass it
        await agent.pipeline.update("c", module("c", 2))
    assert (agent.store.handlers_dir / "c.py").read_bytes() == module("c", 1, 6000)
    assert agent.registry.modules["c"].sha256 == sha(module("c", 1, 6000).decode())


async def test_a_push_names_its_release_and_a_rollback_finds_it_again(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    await client.call("update_handler", filename="ver.py", code=version_module(1), release=4)
    await client.call("update_handler", filename="ver.py", code=version_module(2), release=5)
    (module,) = (await client.call("get_status"))["modules"]
    assert module["release"] == 5
    assert (await client.call("update_log", limit=1))["entries"][0]["release"] == 5
    await client.call("rollback_handler", filename="ver.py")
    assert (await client.call("get_status"))["modules"][0]["release"] == 4  # found again in the log
    await client.call("update_handler", filename="ver.py", code=version_module(3))
    assert (await client.call("get_status"))["modules"][0]["release"] is None  # a push that names none
    bad = await client.call("update_handler", filename="ver.py", code=version_module(4), release=True)
    assert bad["code"] == "bad_request" and "'release'" in bad["error"]


async def test_the_release_is_known_again_after_a_restart(start_agent, tmp_path):
    root = tmp_path / "device"
    first = await start_agent(root=root)
    await first.pipeline.update("ver", version_module(1).encode(), release=7)
    await first.close()
    again = await start_agent(root=root)
    assert again.registry.modules["ver"].release == 7
