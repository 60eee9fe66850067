"""A handler that announces it has started (a marker file), then works for a while."""
import time
from pathlib import Path


def handle_work(data):
    Path(data["marker"]).touch()
    time.sleep(data.get("seconds", 1.0))  # the workload under test, not synchronisation
    return {"done": True}
