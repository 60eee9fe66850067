"""The deploy pipeline as a service: called directly, no socket, the same rules as the wire."""

import pytest

from agent.changes import Untouched
from agent.errors import ChecksumMismatch, Quarantined, ValidationFailed
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
