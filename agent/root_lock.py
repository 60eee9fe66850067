"""One agent per ``--root``: a second one started on the same folder refuses, instead of fighting the first.

The lock is ``ROOT/.state/agent.lock``, held with ``flock`` for the agent's
life (the kernel drops it when the process ends, however it ends), with the
holder's pid inside for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RootInUse(RuntimeError):
    """Another agent holds this root; the message names it."""


class RootLock:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / ".state" / "agent.lock"
        self._fd: int = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise RootInUse(f"another pi-agent (pid {holder}) already runs with --root {self.path.parent.parent}; "
                            "stop it first, or give this one a --root of its own") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1
