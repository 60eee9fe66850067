"""The agent as a real process: the CLI, signals, exit codes, the token, Python 3.9."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, Client, fixture_text, python39, scripted, wait_until


def run_agent_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_the_options():
    result = run_agent_cli("--help")
    assert result.returncode == 0
    for option in ("--root", "--token-file", "--insecure", "--handler-timeout", "--max-connections"):
        assert option in result.stdout


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    result = run_agent_cli("--host", "0.0.0.0", "--port", "0", "--root", str(tmp_path), env={"PI_AGENT_TOKEN": ""})
    assert result.returncode == 2
    assert "without a token" in result.stderr and "--insecure" in result.stderr


def test_bad_settings_are_usage_errors(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    assert run_agent_cli("--token-file", str(empty), "--root", str(tmp_path)).returncode == 2
    assert run_agent_cli("--token-file", str(tmp_path / "missing"), "--root", str(tmp_path)).returncode == 2
    result = run_agent_cli("--port", "70000", "--root", str(tmp_path))
    assert result.returncode == 2 and "port" in result.stderr


def test_a_root_that_is_not_a_folder_is_exit_1_naming_it(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    result = run_agent_cli("--port", "0", "--root", str(a_file))
    assert result.returncode == 1 and "cannot listen" not in result.stderr
    assert f"cannot use --root {a_file}: Not a directory" in result.stderr


def test_a_port_in_use_is_exit_1_with_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_agent_cli("--port", str(taken.getsockname()[1]), "--root", str(tmp_path))
    assert result.returncode == 1
    assert "address already in use" in result.stderr and "stop it or pick another --port" in result.stderr


async def test_starts_creates_root_serves_and_stops_on_sigterm_with_exit_0(tmp_path, spawn_agent):
    root = tmp_path / "new" / "root"
    proc = spawn_agent(root=root)
    assert (root / "handlers").is_dir() and (root / ".backups").is_dir()
    client = await Client.connect(proc.address)
    assert (await client.call("ping"))["message"] == "pong"
    await client.close()
    assert proc.terminate() == 0


async def test_sigterm_lets_a_running_request_finish(tmp_path, spawn_agent):
    root = tmp_path / "root"
    (root / "handlers").mkdir(parents=True)
    (root / "handlers" / "marks_then_waits.py").write_text(scripted("marks_then_waits"))
    proc = spawn_agent(root=root)
    client = await Client.connect(proc.address)
    marker = tmp_path / "started"
    await client.send({"command": "work", "id": 5, "marker": str(marker), "seconds": 1.0})
    await wait_until(marker.exists, what="the handler to start")
    loop = asyncio.get_running_loop()
    exit_code = loop.run_in_executor(None, proc.terminate)
    reply = await client.reply()
    assert reply["id"] == 5 and reply["done"] is True
    assert await exit_code == 0
    await client.close()


async def test_sigterm_refuses_a_request_that_outlives_the_grace_period(tmp_path, spawn_agent):
    root = tmp_path / "root"
    (root / "handlers").mkdir(parents=True)
    (root / "handlers" / "marks_then_waits.py").write_text(scripted("marks_then_waits"))
    proc = spawn_agent("--shutdown-grace", "0.2", root=root)
    client = await Client.connect(proc.address)
    marker = tmp_path / "started"
    await client.send({"command": "work", "id": "long", "marker": str(marker), "seconds": 30})
    await wait_until(marker.exists, what="the handler to start")
    exit_code = asyncio.get_running_loop().run_in_executor(None, proc.terminate)
    reply = await client.reply()
    assert reply["id"] == "long" and reply["code"] == "shutting_down"
    assert await exit_code == 0
    await client.close()


async def test_token_from_file_and_from_environment(tmp_path, spawn_agent):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    proc = spawn_agent("--token-file", str(token_file))
    client = await Client.connect(proc.address)
    assert (await client.call("ping"))["code"] == "unauthorized"
    assert (await client.call("ping", token="from-file"))["message"] == "pong"
    await client.close()
    env_proc = spawn_agent(env={"PI_AGENT_TOKEN": "from-env"})
    client = await Client.connect(env_proc.address)
    assert (await client.call("ping"))["code"] == "unauthorized"
    assert (await client.call("ping", token="from-env"))["message"] == "pong"
    await client.close()


@pytest.mark.skipif(python39() is None, reason="no Python 3.9 on this machine")
async def test_agent_runs_on_python_3_9_standard_library_only(tmp_path, spawn_agent):
    # Run from a copy of the agent/ folder alone: what a Pi without internet would do.
    copy = tmp_path / "copied"
    shutil.copytree(REPO / "agent", copy / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    proc = spawn_agent(python=python39(), cwd=copy, env={"PYTHONPATH": "", "PYTHONNOUSERSITE": "1"})
    client = await Client.connect(proc.address)
    status = await client.call("get_status")
    assert status["python_version"].startswith("3.9")
    reply = await client.call("update_handler", filename="camera_handlers.py",
                              code=fixture_text("seed_camera_step1.py"))
    assert reply["success"] is True, reply
    assert reply["reload"]["commands"] == ["start_recording", "stop_recording", "camera_status"]
    undo = await client.call("rollback_handler", filename="camera_handlers.py", if_version="0" * 64)
    assert undo["success"] is True and undo["unchanged"] is True, undo
    await client.close()
    assert proc.terminate() == 0


def test_an_unknown_sandbox_user_stops_the_agent_at_start(tmp_path):
    result = subprocess.run([sys.executable, "-m", "agent", "--port", "0", "--root", str(tmp_path / "r"),
                             "--sandbox-user", "no-such-user-here"], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "no user 'no-such-user-here'" in result.stderr and "--sandbox-user" in result.stderr


async def test_a_second_agent_on_the_same_root_refuses_to_start_and_names_the_first(start_agent, connect, tmp_path):
    first = await start_agent(root=tmp_path / "shared")
    run = subprocess.run([sys.executable, "-m", "agent", "--port", "0", "--root", str(tmp_path / "shared")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"another pi-agent (pid {os.getpid()}) already runs with --root {tmp_path / 'shared'}" in run.stderr
    assert (await (await connect(first)).call("ping"))["success"] is True  # the first one is untouched
