#!/usr/bin/env python3
"""Camera handlers: record video on a Raspberry Pi, on any Raspberry Pi OS of the last years.

Commands (reply fields kept from the original camera handler):

    start_recording {duration?, filename?, width?, height?, fps?}
        -> type: recording_started, message, path, duration, recorder
    stop_recording   -> type: recording_stopped, message, last_file, size_bytes
    camera_status    -> type: camera_status, recording, elapsed_seconds, size_bytes,
                        ended_by_itself, last_recording, recording_path, recorder
    list_recordings  -> type: recordings, recordings: [{file, size_bytes, modified}]

The recorder is whichever exists on the device: ``rpicam-vid`` (Bookworm),
``libcamera-vid`` (Bullseye) or ``raspivid`` (legacy camera stack), each with
its own flags. The process this module started is tracked and stopped by
itself (SIGINT so the file is finalised, SIGTERM if it does not stop), never
by killing every process with a given name.

Recordings go to ``$PI_AGENT_RECORDINGS`` or ``~/recordings``. A redeploy of
this module while a recording runs hands the recording over to the new code
(``on_reload``), so it can still be watched and stopped.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
import time

RECORDERS = ("rpicam-vid", "libcamera-vid", "raspivid")
DEFAULT_DURATION = 10  # seconds, as the original handler
MAX_DURATION = 24 * 3600
STOP_GRACE = 3.0  # seconds between SIGINT and SIGTERM
SIZE_LIMITS = {"width": (64, 4056), "height": (64, 3040), "fps": (1, 120)}
DEFAULTS = {"width": 1920, "height": 1080, "fps": 30}
FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# The one recording this module controls. on_reload() carries it over to a new version.
_state = {
    "process": None,  # subprocess.Popen of the running (or last) recorder
    "path": None,
    "recorder": None,
    "duration": None,
    "started_monotonic": None,
    "started_at": None,
    "stopped_by_us": False,
}
_lock = threading.Lock()


def recordings_dir():
    return os.path.expanduser(os.environ.get("PI_AGENT_RECORDINGS") or "~/recordings")


def find_recorder():
    """(name, full path) of the first recorder on PATH, or (None, None)."""
    for name in RECORDERS:
        path = shutil.which(name)
        if path:
            return name, path
    return None, None


def recorder_command(name, executable, path, duration, width, height, fps):
    """The command line for each recorder's flags. A duration of 0 records until stopped."""
    millis = str(int(duration * 1000))
    if name == "raspivid":
        return [executable, "-o", path, "-t", millis, "-w", str(width), "-h", str(height), "-fps", str(fps), "-n"]
    return [executable, "-o", path, "-t", millis, "--width", str(width), "--height", str(height),
            "--framerate", str(fps), "--nopreview"]


def _error(message, code, **extra):
    reply = {"success": False, "type": "recording_error", "error": message, "code": code, "timestamp": time.time()}
    reply.update(extra)
    return reply


def _number(data, key, default, low, high, integer=True):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"'{key}' must be {kind} from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"'{key}' must be from {low} to {high}, got {value!r}")
    return int(value) if integer else value


def _running():
    process = _state["process"]
    return process is not None and process.poll() is None


def _size(path):
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return None


def handle_start_recording(data):
    """Start recording in the background; refuse with 'busy' while a recording runs."""
    try:
        duration = _number(data, "duration", DEFAULT_DURATION, 0, MAX_DURATION, integer=False)
        width = _number(data, "width", DEFAULTS["width"], *SIZE_LIMITS["width"])
        height = _number(data, "height", DEFAULTS["height"], *SIZE_LIMITS["height"])
        fps = _number(data, "fps", DEFAULTS["fps"], *SIZE_LIMITS["fps"])
    except ValueError as exc:
        return _error(str(exc), "bad_request")
    filename = data.get("filename") or f"recording_{int(time.time())}.h264"
    if not isinstance(filename, str) or not FILENAME.match(filename) or ".." in filename:
        return _error(f"bad filename {filename!r}: use a plain name such as race_video.h264 "
                      "(letters, digits, '.', '_', '-'; no folders)", "bad_request")
    name, executable = find_recorder()
    if executable is None:
        return _error(f"Camera not available (looked for {', '.join(RECORDERS)} on PATH)", "camera_unavailable")
    with _lock:
        if _running():
            return _error(f"already recording {_state['path']}; stop_recording first", "busy",
                          path=_state["path"])
        folder = recordings_dir()
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            return _error(f"cannot create the recordings folder {folder}: {exc.strerror}", "storage_error")
        full_path = os.path.join(folder, filename)
        command = recorder_command(name, executable, full_path, duration, width, height, fps)
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            return _error(f"Recording failed: could not start {name}: {exc.strerror}", "camera_unavailable")
        _state.update(process=process, path=full_path, recorder=name, duration=duration,
                      started_monotonic=time.monotonic(), started_at=time.time(), stopped_by_us=False)
    return {
        "success": True,
        "type": "recording_started",
        "message": f"Recording started: {filename}",
        "duration": duration,
        "path": full_path,
        "recorder": name,
        "width": width,
        "height": height,
        "fps": fps,
        "pid": process.pid,
        "timestamp": time.time(),
    }


def handle_stop_recording(data):
    """Stop the recording this module started: SIGINT, then SIGTERM after a grace period."""
    with _lock:
        process = _state["process"]
        if not _running():
            return {
                "success": True,
                "type": "recording_stopped",
                "message": "No recording was running",
                "was_recording": False,
                "last_file": _state["path"],
                "size_bytes": _size(_state["path"]),
                "timestamp": time.time(),
            }
        _state["stopped_by_us"] = True
        how = "SIGINT"
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            how = "SIGTERM"
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                how = "SIGKILL"
                process.kill()
                process.wait()
    return {
        "success": True,
        "type": "recording_stopped",
        "message": "Recording stopped",
        "was_recording": True,
        "stopped_with": how,
        "last_file": _state["path"],
        "size_bytes": _size(_state["path"]),
        "timestamp": time.time(),
    }


def handle_camera_status(data):
    """Whether a recording runs, for how long, how big the file is, and how the last one ended."""
    process = _state["process"]
    running = _running()
    started = _state["started_monotonic"]
    ended_by_itself = bool(process is not None and not running and not _state["stopped_by_us"])
    name, _ = find_recorder()
    return {
        "success": True,
        "type": "camera_status",
        "recording": running,
        "elapsed_seconds": round(time.monotonic() - started, 1) if running and started else None,
        "duration": _state["duration"],
        "size_bytes": _size(_state["path"]),
        "ended_by_itself": ended_by_itself,
        "exit_code": process.returncode if process is not None and not running else None,
        "last_recording": _state["path"],
        "recording_path": recordings_dir(),
        "recorder": name,
        "timestamp": time.time(),
    }


def handle_list_recordings(data):
    """Recordings in the recordings folder, newest first."""
    folder = recordings_dir()
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_file():
                    info = entry.stat()
                    entries.append({"file": entry.name, "size_bytes": info.st_size, "modified": info.st_mtime})
    except FileNotFoundError:
        pass
    entries.sort(key=lambda e: e["modified"], reverse=True)
    return {"success": True, "type": "recordings", "recording_path": folder, "recordings": entries,
            "timestamp": time.time()}


def on_reload(previous_module):
    """Called by the agent after a redeploy: keep control of a recording the old code started."""
    previous = getattr(previous_module, "_state", None)
    if isinstance(previous, dict):
        _state.update(previous)


def self_test():
    """Run by the agent's import test: the command lines are right for every recorder."""
    for name in RECORDERS:
        command = recorder_command(name, name, "/tmp/x.h264", 2, 640, 480, 25)
        assert command[1:5] == ["-o", "/tmp/x.h264", "-t", "2000"], command
    assert "-fps" in recorder_command("raspivid", "raspivid", "x", 1, 640, 480, 25)
    assert "--framerate" in recorder_command("rpicam-vid", "rpicam-vid", "x", 1, 640, 480, 25)


COMMAND_HANDLERS = {
    "start_recording": handle_start_recording,
    "stop_recording": handle_stop_recording,
    "camera_status": handle_camera_status,
    "list_recordings": handle_list_recordings,
}
