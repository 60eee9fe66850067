"""Replies are untrusted: a broken or hostile device fails alone, and nothing it sends reaches the terminal raw.

A stand-in device (a real server on loopback, in a thread of its own)
answers every command the way a compromised Pi could, beside a real agent.
Every ``fleet`` subcommand must finish without a traceback, report the
stand-in as failed (wrong shapes) and serve the real agent.
"""

import asyncio
import json
import threading

import pytest

from fleet.cli import main
from fleet.replies import reply_problem
from fleet.text import lines, visible

ESC = "\x1b[31m\x1b]0;pwned\x07\r\u202e"  # colour, window title, bell, carriage return, right-to-left override
UNSAFE = ("\x1b", "\x07", "\r", "\u202e", "\x9b")


class StandIn:
    """A device that answers each request with ``answer(command)``, echoing its id."""

    def __init__(self, answer):
        self.answer = answer
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer):
        while line := await reader.readline():
            request = json.loads(line)
            reply = {"success": True, "timestamp": 1.0, **self.answer(request.get("command", ""))}
            reply["id"] = request.get("id")
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wrong_shapes(command):
    """The right JSON types, in the wrong places."""
    return {
        "get_status": {"agent_version": "0.1.0", "modules": {"file": "x.py"}, "failed_modules": {}, "integrity": "x"},
        "update_handler": {"version": 5, "reload": ["x"]},
        "rollback_handler": {"reload": "x"},
        "list_backups": {"backups": {"a": 1}},
        "update_log": {"entries": [{"action": "deploy", "time": 1.0}]},  # an entry without 'file'
        "list_commands": {"commands": "ping"},
    }.get(command, {"success": "yes"})


def escapes(command):
    """The right shapes, with escape sequences in every string."""
    text = f"text{ESC}\nFAKE ROW OK"
    module = {"file": f"cam{ESC}.py", "sha256": f"ab{ESC}", "commands": [f"rec{ESC}"], "loaded_at": 1.0}
    change = {"message": text, "version": f"v{ESC}", "previous_version": f"p{ESC}", "backup_created": text,
              "reload": {"success": True, "command_count": 1, "commands": [f"rec{ESC}"]},
              "validation": {"valid": True, "errors": [], "warnings": [text]}, "removed_commands": [text],
              "restored_from": text}
    return {
        "get_status": {"agent_version": f"0.1.0{ESC}", "hostname": text, "uptime_seconds": 5, "command_count": 3,
                       "modules": [module], "failed_modules": [{"file": f"bad{ESC}.py", "error": text}],
                       "integrity": [{"file": "x.py", "status": "modified", "detail": text}],
                       "quarantine": [{"file": f"q{ESC}.py", "version": "ab" * 32, "reason": text, "time": 1.0}],
                       "auto_rollbacks": [{"file": f"r{ESC}.py", "time": 1.0, "reason": text}]},
        "update_handler": change,
        "rollback_handler": change,
        "list_backups": {"backups": [{"backup": text, "file": f"cam{ESC}.py", "created": 1.0, "size": 1}]},
        "update_log": {"entries": [{"action": f"deploy{ESC}", "file": f"cam{ESC}.py", "version": text, "time": 1.0}]},
        "list_commands": {"commands": [text], "handlers": {text: text}},
    }.get(command, {"success": False, "error": text, "code": f"odd{ESC}"})


SUBCOMMANDS = [
    ["status"],
    ["send", "all", "ping"],
    ["send", "odd", "ping"],
    ["deploy", "HANDLER", "--canary", "0", "--max-failures", "100%"],
    ["rollback", "ver.py"],
    ["backups", "ver.py"],
    ["log"],
    ["commands"],
]


@pytest.fixture
def fleet_with(tmp_path, spawn_agent):
    """``(devices.json path, handler path)`` for a real agent ("real") beside a stand-in ("odd")."""
    stand_ins = []

    def make(answer):
        stand_in = StandIn(answer)
        stand_ins.append(stand_in)
        real = spawn_agent(root=tmp_path / "real")
        devices = tmp_path / "devices.json"
        devices.write_text(json.dumps({"defaults": {"timeout": 20}, "raspberryPiDevices": [
            {"id": "real", "host": "127.0.0.1", "port": real.address[1]},
            {"id": "odd", "host": "127.0.0.1", "port": stand_in.port}]}))
        handler = tmp_path / "ver.py"
        handler.write_text("VERSION = 1\ndef handle_version(data):\n    return {'version': VERSION}\n")
        return devices, handler

    yield make
    for stand_in in stand_ins:
        stand_in.close()


def run(capsys, devices, handler, argv):
    argv = [str(handler) if word == "HANDLER" else word for word in argv]
    code = main(["-d", str(devices), *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=[" ".join(a) for a in SUBCOMMANDS])
def test_a_device_whose_replies_have_the_wrong_shape_fails_alone(fleet_with, capsys, argv):
    devices, handler = fleet_with(wrong_shapes)
    code, out, err = run(capsys, devices, handler, argv)
    assert "Traceback" not in out + err
    assert code == 1
    assert "does not fit the protocol" in out + err
    if argv[:2] != ["send", "odd"]:  # the real agent is served too: its row has its own agent's answer
        real = next(line for line in out.splitlines() if line.startswith("real"))
        assert "does not fit" not in real and "UNREACHABLE" not in real, real
    code, out, err = run(capsys, devices, handler, [*argv, "--json"])
    document = json.loads(out)
    odd = next(d for d in document["devices"] if d["device"] == "odd")  # every document names its devices
    assert "does not fit the protocol" in odd["error"]


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=[" ".join(a) for a in SUBCOMMANDS])
def test_no_escape_sequence_a_device_sends_reaches_the_terminal(fleet_with, capsys, argv):
    devices, handler = fleet_with(escapes)
    code, out, err = run(capsys, devices, handler, argv)
    assert "Traceback" not in out + err
    for unsafe in UNSAFE:
        assert unsafe not in out and unsafe not in err, (unsafe, out, err)
    assert "\\x1b" in out + err  # shown, not obeyed
    assert not any(line.startswith("FAKE ROW") for line in (out + err).splitlines())


def test_json_output_stays_exact(fleet_with, capsys):
    devices, handler = fleet_with(escapes)
    code, out, _ = run(capsys, devices, handler, ["status", "--json"])
    odd = next(d for d in json.loads(out)["devices"] if d["device"] == "odd")
    assert odd["agent"]["agent_version"] == f"0.1.0{ESC}"


@pytest.mark.parametrize("command, reply, words", [
    ("get_status", {"modules": {"file": "x"}}, "modules is an object, not a list"),
    ("get_status", {"modules": [{"file": "x.py"}]}, "modules[0] has no 'sha256'"),
    ("get_status", {"disk": {"free_bytes": "lots"}}, "disk.free_bytes is a string, not a whole number"),
    ("get_status", {"uptime_seconds": True}, "uptime_seconds is a boolean, not a number"),
    ("update_log", {"entries": [{"action": "deploy"}]}, "entries[0] has no 'file'"),
    ("update_handler", {"reload": {"commands": "ping"}}, "reload.commands is a string, not a list"),
    ("list_commands", {"handlers": {"a": 1}}, "handlers.a is a number, not a string"),
    ("anything", {"success": "yes"}, "success is a string, not true or false"),
])
def test_reply_shapes_say_what_does_not_fit(command, reply, words):
    assert reply_problem(command, reply) == words


def test_replies_that_fit_pass():
    assert reply_problem("get_status", {"success": True, "modules": [], "disk": None, "isolation": None}) is None
    assert reply_problem("my_handler_command", {"success": True, "anything": {"at": ["all"]}}) is None


@pytest.mark.parametrize("text, shown", [
    ("0.1.0\x1b[31m", "0.1.0\\x1b[31m"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("x\u202ey", "x\\u202ey"),
    ("\x9b2J", "\\x9b2J"),
    ("caf\u00e9 \u2713", "caf\u00e9 \u2713"),  # ordinary Unicode is left alone
])
def test_visible_writes_control_characters_out(text, shown):
    assert visible(text) == shown


def test_lines_keep_one_line_per_item():
    assert lines(["a\nFAKE", "b"]).splitlines() == ["a\\nFAKE", "b"]
