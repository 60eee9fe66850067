#!/usr/bin/env python3
"""System handlers: what a fleet owner wants to know about each Pi, without extra packages.

    system_info -> hostname, model, os, python_version, cpu_temperature_c, load_average,
                   memory {total_bytes, available_bytes, used_percent}, disk {...},
                   uptime_seconds, throttled {raw, under_voltage_now, ...}
    echo        -> returns what it was sent (a round-trip check for the whole path)

Every value that cannot be read on this device is null: a laptop has no
device-tree model and no vcgencmd, a container may have no thermal zone.
"""

import os
import platform
import shutil
import socket
import subprocess
import sys
import time

THROTTLE_BITS = {
    0: "under_voltage_now",
    1: "frequency_capped_now",
    2: "throttled_now",
    3: "soft_temperature_limit_now",
    16: "under_voltage_occurred",
    17: "frequency_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temperature_limit_occurred",
}


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace").strip("\x00\n ")
    except OSError:
        return None


def pi_model():
    return _read("/proc/device-tree/model")


def os_name():
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return f"{platform.system()} {platform.release()}"


def cpu_temperature():
    raw = _read("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(raw) / 1000.0, 1) if raw else None
    except ValueError:
        return None


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def memory():
    text = _read("/proc/meminfo")
    if not text:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if not total or available is None:
        return None
    return {"total_bytes": total, "available_bytes": available,
            "used_percent": round(100.0 * (total - available) / total, 1)}


def disk(path="/"):
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    total = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    if not total:
        return None
    return {"path": path, "total_bytes": total, "free_bytes": free,
            "used_percent": round(100.0 * (total - free) / total, 1)}


def uptime():
    raw = _read("/proc/uptime")
    try:
        return round(float(raw.split()[0]), 1) if raw else None
    except (ValueError, IndexError):
        return None


def throttling():
    """Decode ``vcgencmd get_throttled`` when the Raspberry Pi firmware tool exists."""
    vcgencmd = shutil.which("vcgencmd")
    if vcgencmd is None:
        return None
    try:
        output = subprocess.run([vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=5).stdout
        raw = int(output.strip().split("=", 1)[1], 16)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    decoded = {name: bool(raw & (1 << bit)) for bit, name in THROTTLE_BITS.items()}
    decoded["raw"] = hex(raw)
    return decoded


def handle_system_info(data):
    return {
        "success": True,
        "type": "system_info",
        "hostname": socket.gethostname(),
        "model": pi_model(),
        "os": os_name(),
        "machine": platform.machine(),
        "python_version": sys.version.split()[0],
        "cpu_temperature_c": cpu_temperature(),
        "load_average": load_average(),
        "memory": memory(),
        "disk": disk(),
        "uptime_seconds": uptime(),
        "throttled": throttling(),
        "timestamp": time.time(),
    }


def handle_echo(data):
    echoed = {k: v for k, v in data.items() if k not in ("command", "id")}
    return {"success": True, "type": "echo", "echo": echoed, "timestamp": time.time()}
