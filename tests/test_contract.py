"""The wire contract (agent/contract.py) holds on the agent's side: real replies fit the shapes clients read."""

import inspect

from agent import contract, errors
from conftest import sha

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = V1.replace("VERSION = 1", "VERSION = 2")


async def test_the_agents_replies_fit_the_shapes_the_controller_reads(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    calls = [
        ("update_handler", {"filename": "ver.py", "code": V1}),
        ("update_handler", {"filename": "ver.py", "code": V2, "release": 2}),
        ("list_backups", {"filename": "ver.py"}),
        ("rollback_handler", {"filename": "ver.py"}),
        ("reload_handler", {"filename": "ver.py"}),
        ("get_status", {}),
        ("list_commands", {}),
        ("update_log", {"limit": 5}),
        ("delete_handler", {"filename": "ver.py", "if_version": sha(V1)}),
        ("update_crl", {"crl": "x"}),  # refused here (no TLS): a failed reply fits every shape's common part
    ]
    for command, args in calls:
        reply = await client.call(command, **args)
        shape = contract.SHAPES.get(command, contract.ANY_COMMAND)
        assert shape.problem(reply, "") is None, (command, reply)
    assert reply["code"] == contract.BAD_REQUEST


def test_every_agent_error_code_is_a_contract_code():
    values = {value for name, value in vars(contract).items() if name.isupper() and isinstance(value, str)}
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, errors.AgentError) and cls is not errors.AgentError:
            assert cls.code in values, cls
