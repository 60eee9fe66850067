"""The ``fleet`` CLI against real agent processes: exit codes, tables, --json, progress."""

import json
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, sha
from fleet.cli import main
from fleet.local import free_port

V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n"
V2 = "VERSION = 2\n\ndef handle_version(data):\n    return {'version': VERSION}\n"


def inventory(tmp_path, agents, count=2, offline=False, tokens=None):
    entries = []
    for i in range(count):
        agent = agents.start(f"d{i}", extra=["--token-file", str(tokens)] if tokens else [])
        entries.append({"id": f"d{i}", "host": "127.0.0.1", "port": agent.device.port, "tags": ["cams"]})
    if offline:
        entries.append({"id": "off", "host": "127.0.0.1", "port": free_port()})
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"defaults": {"timeout": 20, "token_env": "CLI_TEST_TOKEN"},
                                "raspberryPiDevices": entries}))
    return path


def handler(tmp_path, code=V1, name="ver.py"):
    path = tmp_path / name
    path.write_text(code)
    return str(path)


def test_deploy_prints_progress_and_a_table_and_exits_0(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents)
    code = main(["-d", str(devices), "deploy", handler(tmp_path), "--verify", "version"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "[1/2] d0" in err and "[2/2] d1" in err  # one progress line per device, as results arrive
    assert "outcome" in out and out.count(" OK ") >= 2 and "2 OK" in out


def test_deploy_json_document_and_exit_1_when_a_device_is_offline(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, offline=True)
    code = main(["deploy", handler(tmp_path), "-d", str(devices), "--json"])
    out, _ = capsys.readouterr()
    document = json.loads(out)
    assert code == 1
    assert set(document) >= {"file", "version", "ok", "halted", "counts", "devices", "waves"}
    assert document["counts"] == {"OK": 2, "UNREACHABLE": 1}
    by_id = {d["device"]: d for d in document["devices"]}
    assert by_id["off"]["status"] == "UNREACHABLE" and by_id["d0"]["commands"] == ["version"]


def test_status_says_why_a_device_did_not_answer_and_exits_1(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=1, offline=True)
    assert main(["-d", str(devices), "status"]) == 1
    out, _ = capsys.readouterr()
    assert re.search(r"^off\s.*\bunreachable\b", out, re.M)
    assert "off: 127.0.0.1:" in out and "connection refused (is pi-agent running there" in out


def test_a_halted_rollout_exits_1(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents)
    broken = handler(tmp_path, "import os\nos.system('x')\n")
    assert main(["-d", str(devices), "deploy", broken]) == 1
    out, _ = capsys.readouterr()
    assert "HALTED" in out and "SKIPPED" in out and "Dangerous pattern detected" in out


def test_a_halted_rollout_with_rollback_marks_the_undo_lines(tmp_path, agents, capsys):
    clash = agents.base / "d2" / "handlers"
    clash.mkdir(parents=True)
    (clash / "old.py").write_text(V1.replace("VERSION = 1", "VERSION = 0"))  # offers 'version' too: d2 refuses
    devices = inventory(tmp_path, agents, count=3)
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V1), "--batch", "1", "--rollback-on-failure"]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()[2:]  # after "fleet: inventory ..." and "rolling out ..."
    assert [line.split()[0] for line in lines] == ["[1/3]", "[2/3]", "[3/3]", "[undo]", "[undo]"]
    assert all("ROLLED_BACK" in line for line in lines[3:]) and "1 FAILED, 2 ROLLED_BACK" in out


def test_status_rollback_send_commands_backups_and_log(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents)
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V1)]) == 0
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2), "--only", "d0"]) == 0
    capsys.readouterr()

    assert main(["-d", str(devices), "status"]) == 0
    out, _ = capsys.readouterr()
    assert re.search(r"^d0\s+2\s+2\s+current\s", out, re.M) and re.search(r"^d1\s+1\s+1\s+current\s", out, re.M)
    assert "2 device(s): 2 current" in out and "d0: * ver.py drifts" in out
    assert main(["-d", str(devices), "status", "--wide"]) == 0
    assert sha(V2)[:8] in capsys.readouterr()[0]  # each file's version, behind --wide

    assert main(["-d", str(devices), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr()[0])
    assert [d["device"] for d in status["devices"]] == ["d0", "d1"]
    assert all(d["reachable"] for d in status["devices"])
    assert [d["drift"] for d in status["devices"]] == [["ver.py"], ["ver.py"]]  # split evenly: both marked
    assert [(d["desired_release"], d["reported_release"], d["state"]) for d in status["devices"]] == \
        [(2, 2, "current"), (1, 1, "current")]

    assert main(["-d", str(devices), "send", "d0", "version"]) == 0
    assert json.loads(capsys.readouterr()[0])["version"] == 2

    assert main(["-d", str(devices), "rollback", "ver.py", "--only", "d0"]) == 0
    assert f"now on {sha(V1)[:8]}" in capsys.readouterr()[0]  # the version the device ended on
    assert main(["-d", str(devices), "status", "--json"]) == 0
    d0 = json.loads(capsys.readouterr()[0])["devices"][0]
    assert (d0["desired_release"], d0["reported_release"], d0["state"]) == (2, 1, "behind")
    assert main(["-d", str(devices), "send", "all", "version", "--json"]) == 0
    replies = json.loads(capsys.readouterr()[0])["results"]
    assert [r["reply"]["version"] for r in replies] == [1, 1]

    assert main(["-d", str(devices), "commands"]) == 0
    assert "version" in capsys.readouterr()[0]
    assert main(["-d", str(devices), "backups", "ver.py", "--json"]) == 0
    backups = json.loads(capsys.readouterr()[0])["results"]
    assert len(backups[0]["reply"]["backups"]) == 2 and backups[1]["reply"]["backups"] == []
    assert main(["-d", str(devices), "log", "--limit", "2"]) == 0
    assert "rollback ver.py" in capsys.readouterr()[0]


def test_send_parses_values_as_json_where_they_parse(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=1)
    echo = "def handle_echo(data):\n    return {'got': {k: v for k, v in data.items() if k not in ('command', 'id')}}\n"
    assert main(["-d", str(devices), "deploy", handler(tmp_path, echo, "echoer.py")]) == 0
    capsys.readouterr()
    assert main(["-d", str(devices), "send", "d0", "echo", "duration=30", "filename=x.h264", "on=true",
                 "ratio=0.5", "tags=[1,2]"]) == 0
    got = json.loads(capsys.readouterr()[0])["got"]
    assert got == {"duration": 30, "filename": "x.h264", "on": True, "ratio": 0.5, "tags": [1, 2]}
    assert main(["-d", str(devices), "send", "d0", "echo", "novalue"]) == 2


def test_tokens_are_used_and_never_printed(tmp_path, agents, capsys, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text("very-secret-token\n")
    devices = inventory(tmp_path, agents, count=1, tokens=secret)
    assert main(["-d", str(devices), "send", "d0", "ping"]) == 1  # no token in the environment yet
    out, err = capsys.readouterr()
    # The hint names the variable this inventory asks for, not the default one.
    assert "unauthorized" in out + err and "from $CLI_TEST_TOKEN (not set)" in out + err
    assert main(["-d", str(devices), "status"]) == 1
    out = capsys.readouterr()[0]
    row = next(line for line in out.splitlines() if line.startswith("d0"))
    assert "refused" in row and "unreachable" not in row  # it answered: reachable, and says why it refused
    assert re.search(r"^d0: .*from \$CLI_TEST_TOKEN \(not set\)", out, re.M)  # why, under the table
    monkeypatch.setenv("CLI_TEST_TOKEN", "very-secret-token")
    assert main(["-d", str(devices), "status", "--json"]) == 0
    assert main(["-d", str(devices), "deploy", handler(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "very-secret-token" not in out + err


@pytest.mark.parametrize("argv, words", [
    (["-d", "/nonexistent/devices.json", "status"], "file not found"),
    (["deploy", "/nonexistent/handler.py"], "file not found"),
    (["deploy", "README.md"], "handler files must end in .py"),
    (["deploy", "class.py"], "bad filename 'class.py'"),
    (["status", "--only", "ghost"], "no device 'ghost'"),
    (["deploy", "handlers/camera_handlers.py", "--batch", "lots"], "batch must be"),
    (["demo", "--agents", "9"], "--agents must be from 3 to 6"),
])
def test_usage_and_config_errors_exit_2_with_a_message(argv, words, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    assert words in capsys.readouterr()[1]


def test_send_without_a_command_names_only_what_is_missing(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["send", "raspi_main"])
    assert stopped.value.code == 2
    assert capsys.readouterr()[1].splitlines()[-1].endswith("the following arguments are required: COMMAND")


def test_ctrl_c_during_a_deploy_exits_130_and_says_what_to_check(tmp_path, agents):
    devices = inventory(tmp_path, agents)
    slow = handler(tmp_path, "import time\n\ndef handle_slow(data):\n    time.sleep(20)\n    return {}\n", "slow.py")
    run = subprocess.Popen([sys.executable, "-m", "fleet", "-d", str(devices), "deploy", slow, "--verify", "slow"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    assert run.stderr.readline().startswith("fleet: inventory ")
    assert run.stderr.readline().startswith("rolling out slow.py")  # printed once the rollout has begun
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "fleet: interrupted" in err and "`fleet status` shows" in err and "`fleet converge` finishes" in err and "Traceback" not in err


def test_help_and_bad_arguments():
    run = subprocess.run([sys.executable, "-m", "fleet", "deploy", "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "--rollback-on-failure" in run.stdout and "--max-failures" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "fleet", "frobnicate"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2


def test_demo_runs_end_to_end():
    run = subprocess.run([sys.executable, "-m", "fleet", "demo"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "UNREACHABLE" in out and "offered by both old_camera.py and camera_handlers.py" in out
    assert "Recording stopped with SIGINT" in out and "1 FAILED, 1 OK, 3 SKIPPED: raspi_offline caught up" in out
    assert "5 device(s): 4 current, 1 behind" in out
    assert "raspi_pit: * camera_handlers.py, old_camera.py drift from what most camera devices run" in out


def test_demo_json_is_one_document_on_stdout_and_the_story_on_stderr():
    run = subprocess.run([sys.executable, "-m", "fleet", "demo", "--json"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["rollout"]["counts"] == {"OK": 3, "FAILED": 1, "UNREACHABLE": 1}
    assert document["converge"]["counts"] == {"SKIPPED": 3, "FAILED": 1, "OK": 1}  # the offline one caught up
    assert [r["status"] for r in document["stop_recording"]] == ["OK"] * 3
    drift = {d["device"]: d["drift"] for d in document["status"]["devices"]}
    assert drift["raspi_pit"] == ["camera_handlers.py", "old_camera.py"] and drift["raspi_main"] == []
    assert "== fleet deploy" in run.stderr and "Starting 4 local agents" in run.stderr


def test_the_unreachable_limit_is_checked_before_any_push(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=2, offline=True)
    code = main(["-d", str(devices), "deploy", handler(tmp_path), "--max-unreachable", "0", "--json"])
    document = json.loads(capsys.readouterr()[0])
    assert code == 1 and document["halted"] and "unreachable" in document["halt_reason"]
    assert {d["device"]: d["status"] for d in document["devices"]} == {"d0": "SKIPPED", "d1": "SKIPPED",
                                                                        "off": "UNREACHABLE"}
    assert main(["-d", str(devices), "log", "--only", "d0,d1", "--json"]) == 0
    logs = json.loads(capsys.readouterr()[0])["devices"]
    assert all(r["reply"]["entries"] == [] for r in logs)  # nothing was pushed anywhere


def test_verify_takes_a_command_with_arguments(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=1)
    greet = "def handle_greet(data):\n    return {'success': data.get('name') == 'x', 'error': 'who?'}\n"
    assert main(["-d", str(devices), "deploy", handler(tmp_path, greet, "greet.py"), "--verify", "greet name=x"]) == 0
    capsys.readouterr()
    greet2 = greet.replace("'who?'", "'who are you?'")
    code = main(["-d", str(devices), "deploy", handler(tmp_path, greet2, "greet.py"), "--verify", "greet name=y"])
    assert code == 1 and "who are you?" in capsys.readouterr()[0]
    assert main(["-d", str(devices), "deploy", handler(tmp_path, greet2, "greet.py"), "--verify", "greet 'x"]) == 2


def test_every_json_document_calls_the_per_device_list_devices(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=1)
    for argv in (["status"], ["send", "all", "ping"], ["commands"], ["log"], ["deploy", handler(tmp_path)]):
        main(["-d", str(devices), *argv, "--json"])
        document = json.loads(capsys.readouterr()[0])
        assert [d["device"] for d in document["devices"]] == ["d0"], argv


@pytest.mark.parametrize("command", ["status", "deploy", "converge", "rollback", "send", "commands", "backups", "log", "demo", "ca", "keys", "agent", "provision",
                                     "release", "releases", "history"])
def test_every_subcommand_help_has_a_description_and_an_example(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr()[0]
    description = text.split("\n\n")[1]
    assert not description.lstrip().startswith(("options:", "positional")), text
    assert "Example:\n  fleet " + command in text


def test_every_command_says_which_inventory_it_read(tmp_path, agents, capsys, monkeypatch):
    devices = inventory(tmp_path, agents, count=1)
    main(["-d", str(devices), "status"])
    assert f"fleet: inventory {devices}, 1 device(s)" in capsys.readouterr()[1]
    monkeypatch.chdir(tmp_path / "agents")  # no ./devices.json here
    monkeypatch.delenv("FLEET_DEVICES", raising=False)
    main(["commands", "--timeout", "2"])
    assert "(the project's sample: local agents on 127.0.0.1)" in capsys.readouterr()[1]


def test_releases_are_made_listed_and_shown_from_the_state_file(tmp_path, capsys):
    devices = tmp_path / "site" / "devices.json"
    devices.parent.mkdir()
    devices.write_text(json.dumps({"raspberryPiDevices": [{"id": "d0", "host": "127.0.0.1"}]}))
    cam, system = handler(tmp_path, V1, "cam.py"), handler(tmp_path, V2.replace("version", "sys"), "sys.py")
    assert main(["-d", str(devices), "release", "create", cam, system, "-m", "first", "--json"]) == 0
    out, err = capsys.readouterr()
    made = json.loads(out)
    assert made["created"] and made["release"]["number"] == 1 and set(made["release"]["files"]) == {"cam.py", "sys.py"}
    assert f"state {devices.parent / '.pifleet' / 'state.db'}" in err  # beside the inventory
    assert main(["-d", str(devices), "release", "create", system, cam, "-m", "same files"]) == 0
    assert "release 1 already holds exactly these files" in capsys.readouterr()[0]
    assert main(["-d", str(devices), "releases"]) == 0
    row = capsys.readouterr()[0].splitlines()[2].split()
    assert row[0] == "1" and "first" in row
    assert main(["-d", str(devices), "release", "show", "1"]) == 0
    assert "cam.py" in capsys.readouterr()[0]
    assert main(["-d", str(devices), "release", "show", "2"]) == 2
    assert "there is no release 2" in capsys.readouterr()[1]
    assert main(["-d", str(devices), "release", "create", str(tmp_path / "missing.py"), "-m", "x"]) == 2


def test_a_deploy_makes_a_release_and_tells_each_agent_its_number(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=2)
    assert main(["-d", str(devices), "deploy", handler(tmp_path), "-m", "version one", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["release"] == 1 and "rolling out ver.py (release 1)" in err
    assert main(["-d", str(devices), "status", "--json"]) == 0
    for device in json.loads(capsys.readouterr()[0])["devices"]:
        assert [m["release"] for m in device["agent"]["modules"]] == [1]
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr()[0])["release"] is None  # a dry run records nothing
    assert main(["-d", str(devices), "releases", "--json"]) == 0
    assert [r["message"] for r in json.loads(capsys.readouterr()[0])["releases"]] == ["version one"]


def test_history_lists_each_rollout_with_its_results_and_outcome(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=2, offline=True)
    assert main(["-d", str(devices), "deploy", handler(tmp_path), "-m", "v1"]) == 1  # one device is offline
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2), "--max-unreachable", "0"]) == 1
    assert main(["-d", str(devices), "deploy", handler(tmp_path, V2), "--dry-run"]) == 1  # not recorded
    capsys.readouterr()
    assert main(["-d", str(devices), "history", "--json"]) == 0
    second, first = json.loads(capsys.readouterr()[0])["rollouts"]
    assert first["results"] == {"d0": "OK", "d1": "OK", "off": "UNREACHABLE"} and first["outcome"] == "2 OK, 1 UNREACHABLE"
    assert first["release"] == 1 and first["file"] == "ver.py" and first["targets"] == 3
    assert second["outcome"].startswith("halted: 1 device(s) unreachable") and second["release"] == 2
    assert main(["-d", str(devices), "history"]) == 0
    assert capsys.readouterr()[0].splitlines()[2].split()[0] == "2"  # newest first


def test_a_rollout_the_controller_never_finished_shows_as_interrupted(tmp_path, agents, capsys):
    devices = inventory(tmp_path, agents, count=1, offline=True)
    slow = handler(tmp_path, "import time\n\ndef handle_slow(data):\n    time.sleep(20)\n    return {}\n", "slow.py")
    run = subprocess.Popen([sys.executable, "-m", "fleet", "-d", str(devices), "deploy", slow, "--verify", "slow"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    while not run.stderr.readline().startswith("[1/2] off"):  # the offline device's result, from the preflight
        pass
    run.kill()  # the controller dies while d0's verify still runs
    run.communicate(timeout=30)
    assert main(["-d", str(devices), "history", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr()[0])["rollouts"]
    assert record["outcome"] is None and record["results"] == {"off": "UNREACHABLE"}  # kept as it arrived
    assert main(["-d", str(devices), "history"]) == 0
    assert "interrupted" in capsys.readouterr()[0]
