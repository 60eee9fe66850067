"""The handlers that ship in handlers/, deployed through a real agent's update_handler.

The camera tests put the stand-in recorder (``fleet.local``) on PATH under
each of the three names the handler looks for. It writes a growing file,
records the arguments it was given, and stops on SIGINT (or, when told to,
ignores SIGINT so the handler has to escalate to SIGTERM).
"""

import json

import pytest

from conftest import REPO
from fleet.local import install_stand_in_recorder

CAMERA = (REPO / "handlers" / "camera_handlers.py").read_text()
SYSTEM = (REPO / "handlers" / "system_handlers.py").read_text()

@pytest.fixture
def camera_env(tmp_path, monkeypatch):
    """A PATH with no recorder at all, a recordings folder, and a way to add a stand-in recorder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recordings = tmp_path / "recordings"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("PI_AGENT_RECORDINGS", str(recordings))

    def install(name="rpicam-vid"):
        install_stand_in_recorder(bin_dir, name)

    install.recordings = recordings
    return install


async def camera_client(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    reply = await client.call("update_handler", filename="camera_handlers.py", code=CAMERA)
    assert reply["success"] is True, reply
    assert reply["reload"]["commands"] == ["start_recording", "stop_recording", "camera_status", "list_recordings"]
    return agent, client


async def wait_for_bytes(client):
    async def size():
        return (await client.call("camera_status"))["size_bytes"] or 0

    for _ in range(1000):
        if await size() > 0:
            return
    raise AssertionError("the recording never wrote anything")


@pytest.mark.parametrize("recorder, flags", [
    ("rpicam-vid", ["--width", "640", "--height", "480", "--framerate", "25", "--nopreview"]),
    ("libcamera-vid", ["--width", "640", "--height", "480", "--framerate", "25", "--nopreview"]),
    ("raspivid", ["-w", "640", "-h", "480", "-fps", "25", "-n"]),
])
async def test_start_status_stop_with_each_recorder(start_agent, connect, camera_env, recorder, flags):
    camera_env(recorder)
    _, client = await camera_client(start_agent, connect)
    started = await client.call("start_recording", duration=30, filename="race_video.h264", width=640, height=480, fps=25)
    assert started["success"] is True and started["type"] == "recording_started"
    assert started["message"] == "Recording started: race_video.h264" and started["duration"] == 30
    assert started["path"] == str(camera_env.recordings / "race_video.h264") and started["recorder"] == recorder
    await wait_for_bytes(client)
    status = await client.call("camera_status")
    assert status["recording"] is True and status["elapsed_seconds"] >= 0 and status["recorder"] == recorder
    called = json.loads((camera_env.recordings / "race_video.h264.args.json").read_text())
    assert called["name"] == recorder
    assert called["args"][:4] == ["-o", started["path"], "-t", "30000"] and called["args"][4:] == flags
    stopped = await client.call("stop_recording")
    assert stopped["type"] == "recording_stopped" and stopped["stopped_with"] == "SIGINT"
    assert stopped["last_file"] == started["path"] and stopped["size_bytes"] > 0
    after = await client.call("camera_status")
    assert after["recording"] is False and after["ended_by_itself"] is False
    listed = await client.call("list_recordings")
    assert "race_video.h264" in [r["file"] for r in listed["recordings"]]


async def test_a_timed_recording_ends_by_itself_and_status_notices(start_agent, connect, camera_env):
    camera_env()
    _, client = await camera_client(start_agent, connect)
    assert (await client.call("start_recording", duration=0.3, filename="short.h264"))["success"]
    for _ in range(2000):
        status = await client.call("camera_status")
        if not status["recording"]:
            break
    assert status["recording"] is False and status["ended_by_itself"] is True and status["exit_code"] == 0
    assert status["size_bytes"] > 0
    stopped = await client.call("stop_recording")
    assert stopped["was_recording"] is False and stopped["last_file"].endswith("short.h264")


async def test_a_second_start_while_recording_is_busy(start_agent, connect, camera_env):
    camera_env()
    _, client = await camera_client(start_agent, connect)
    assert (await client.call("start_recording", filename="one.h264"))["success"]
    second = await client.call("start_recording", filename="two.h264")
    assert second["success"] is False and second["code"] == "busy" and "one.h264" in second["error"]
    await client.call("stop_recording")


async def test_a_recorder_that_ignores_sigint_is_stopped_with_sigterm(start_agent, connect, camera_env, monkeypatch):
    monkeypatch.setenv("STAND_IN_IGNORE_SIGINT", "1")
    camera_env()
    _, client = await camera_client(start_agent, connect)
    assert (await client.call("start_recording", filename="stubborn.h264"))["success"]
    await wait_for_bytes(client)
    stopped = await client.call("stop_recording")
    assert stopped["stopped_with"] == "SIGTERM"
    assert (await client.call("camera_status"))["recording"] is False


@pytest.mark.parametrize("fields, words", [
    ({"filename": "../escape.h264"}, "bad filename"),
    ({"filename": "sub/dir.h264"}, "bad filename"),
    ({"filename": ".hidden"}, "bad filename"),
    ({"filename": "x;rm.h264"}, "bad filename"),
    ({"filename": 5}, "bad filename"),
    ({"duration": -1}, "'duration' must be from 0"),
    ({"duration": "10"}, "'duration' must be a number"),
    ({"duration": 10 ** 9}, "'duration' must be from 0"),
    ({"width": 10}, "'width' must be from 64"),
    ({"height": 99999}, "'height' must be from 64"),
    ({"fps": 0}, "'fps' must be from 1"),
    ({"fps": 2.5}, "'fps' must be a whole number"),
])
async def test_bad_filenames_and_values_are_refused_clearly(start_agent, connect, camera_env, fields, words):
    camera_env()
    _, client = await camera_client(start_agent, connect)
    reply = await client.call("start_recording", **fields)
    assert reply["success"] is False and reply["code"] == "bad_request" and words in reply["error"]
    assert not camera_env.recordings.exists() or not any(camera_env.recordings.iterdir())


async def test_no_recorder_at_all_is_camera_unavailable(start_agent, connect, camera_env):
    _, client = await camera_client(start_agent, connect)
    reply = await client.call("start_recording")
    assert reply["success"] is False and reply["code"] == "camera_unavailable"
    assert reply["error"].startswith("Camera not available")
    for name in ("rpicam-vid", "libcamera-vid", "raspivid"):
        assert name in reply["error"]
    assert (await client.call("camera_status"))["recorder"] is None


async def test_a_hot_redeploy_during_a_recording_keeps_it_under_control(start_agent, connect, camera_env):
    camera_env()
    agent, client = await camera_client(start_agent, connect)
    started = await client.call("start_recording", duration=60, filename="long.h264")
    await wait_for_bytes(client)
    old_module = agent.registry.modules["camera_handlers"].module
    redeploy = await client.call("update_handler", filename="camera_handlers.py", code=CAMERA + "\n# v2\n")
    assert redeploy["success"] is True and redeploy["unchanged"] is False and redeploy["validation"]["warnings"] == []
    assert agent.registry.modules["camera_handlers"].module is not old_module
    status = await client.call("camera_status")
    assert status["recording"] is True and status["last_recording"] == started["path"]
    stopped = await client.call("stop_recording")
    assert stopped["was_recording"] is True and stopped["stopped_with"] == "SIGINT"
    process = agent.registry.modules["camera_handlers"].module._state["process"]
    assert process.poll() is not None  # the recorder the old code started is really gone


async def test_system_handlers_deploy_and_answer_without_crashing(start_agent, connect):
    client = await connect(await start_agent())
    reply = await client.call("update_handler", filename="system_handlers.py", code=SYSTEM)
    assert reply["success"] is True and reply["reload"]["commands"] == ["system_info", "echo"]
    info = await client.call("system_info")
    assert info["success"] is True and isinstance(info["hostname"], str) and info["python_version"]
    for key in ("model", "os", "cpu_temperature_c", "load_average", "memory", "disk", "uptime_seconds", "throttled"):
        assert key in info  # present, null where this machine cannot tell
    assert info["memory"] is None or 0 <= info["memory"]["used_percent"] <= 100
    assert info["disk"]["total_bytes"] > 0
    echo = await client.call("echo", value=[1, "two"], nested={"a": True})
    assert echo["echo"] == {"value": [1, "two"], "nested": {"a": True}}
