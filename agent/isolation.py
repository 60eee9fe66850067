"""Import tests in a box: the agent's side of ``import_helper.py``.

New code is never imported into the agent's own process before it has been
imported, and its runtime test run, in a child process that can hang, exit,
crash or exhaust its memory without touching the agent. (The system the seed
documents imported new code in-process: ``sys.exit`` left a file that stopped
every restart and ``os._exit`` killed the agent outright.) The child runs in
the box ``box.py`` describes: what it could do to the device is bounded too.

``ImportTester.test`` blocks; the pipeline calls it from a thread of its own.
Tests are serialised through one helper, which is started on first use and
exits by itself when idle, so an agent that is not deploying carries no
second process.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

HELPER = Path(__file__).with_name("import_helper.py")
HANDLER_TABLE = Path(__file__).with_name("handler_table.py")
BOX = Path(__file__).with_name("box.py")
# The helper's whole environment: nothing of the agent's (its token above all) reaches the box.
HELPER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# Timeouts
HELPER_IDLE_EXIT = 300.0  # seconds without a test before the helper exits
HELPER_GRACE = 5.0  # beyond a test's own time limit, before the helper itself is presumed stuck


@dataclass(frozen=True)
class ImportResult:
    ok: bool
    commands: List[str] = field(default_factory=list)
    kind: str = ""
    error: str = ""
    warnings: List[str] = field(default_factory=list)
    isolation: Optional[Dict[str, Any]] = None  # the box's report: which protections held

    @classmethod
    def from_reply(cls, reply: Dict[str, Any]) -> "ImportResult":
        isolation = reply.get("isolation")
        return cls(
            ok=bool(reply.get("ok")),
            commands=list(reply.get("commands") or []),
            kind=str(reply.get("kind") or ""),
            error=str(reply.get("error") or ""),
            warnings=list(reply.get("warnings") or []),
            isolation=isolation if isinstance(isolation, dict) else None,
        )


class HelperFailed(RuntimeError):
    """The helper process itself died or stopped answering (not the module under test)."""


def helper_programs(agent_root: Path) -> Tuple[Path, Path, Path]:
    """The helper, the handler table and the box as files a new interpreter can run and load by path.

    From a checkout or an install they are the agent's own files. An agent run
    from one zip file (``pi-agent.pyz``, the offline bundle) copies them out of
    it once, into ``ROOT/.state/runtime/`` under a name that changes with their
    contents, so an upgraded agent never runs an older helper.
    """
    if HELPER.is_file():
        return HELPER, HANDLER_TABLE, BOX
    import hashlib  # here: only an agent run from its zip needs them
    import pkgutil

    contents = {path.name: pkgutil.get_data("agent", path.name) or b"" for path in (HELPER, HANDLER_TABLE, BOX)}
    digest = hashlib.sha256(b"".join(contents[name] for name in sorted(contents))).hexdigest()[:16]
    folder = agent_root / ".state" / "runtime" / digest
    for name, data in contents.items():
        target = folder / name
        if not target.is_file() or target.read_bytes() != data:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = target.with_suffix(".tmp")
            temporary.write_bytes(data)
            os.replace(temporary, target)
    return folder / HELPER.name, folder / HANDLER_TABLE.name, folder / BOX.name


class ImportTester:
    def __init__(
        self,
        *,
        timeout: float,
        memory_mb: int,
        agent_root: Path,
        sandbox_user: str,
        hide: Sequence[str] = (),
        idle_exit: float = HELPER_IDLE_EXIT,
    ) -> None:
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.agent_root = agent_root
        self.sandbox_user = sandbox_user
        self.hide = [str(path) for path in hide]
        self.idle_exit = idle_exit
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._buffer = b""
        self.isolation: Optional[Dict[str, Any]] = None  # from the latest test or probe

    @property
    def helper_pid(self) -> Optional[int]:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def test(self, name: str, source: str) -> ImportResult:
        """Import ``source`` as handler module ``name`` in the box and run its runtime test."""
        return self._run({"name": name, "path": f"handlers/{name}.py", "source": source})

    def probe(self) -> ImportResult:
        """Set the box up with nothing in it: which protections hold here (``isolation``)."""
        return self._run({"probe": True})

    def _run(self, request: Dict[str, Any]) -> ImportResult:
        request.update(timeout=self.timeout, memory_mb=self.memory_mb)
        with self._lock:
            problem = ""
            for attempt in (1, 2):
                try:
                    result = ImportResult.from_reply(self._ask(request))
                    if result.isolation is not None:
                        self.isolation = result.isolation
                    return result
                except HelperFailed as exc:
                    # One retry: the helper may have exited for idleness just as we wrote.
                    problem = str(exc)
                    log.warning("import test helper failed (attempt %d): %s", attempt, problem)
                    self._stop()
            return ImportResult(ok=False, kind="helper", error=(
                f"the import test could not run: {problem}; nothing was changed. "
                "Try again; if it keeps failing, the agent's log says why"))

    def start(self) -> None:
        """Start the helper now (optional: ``test`` starts it when needed)."""
        with self._lock:
            self._ensure_running()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_running(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        helper, table, box = helper_programs(self.agent_root)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(helper)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the helper's own tracebacks belong in the agent's log
            close_fds=True,
            start_new_session=True,  # Ctrl-C in a terminal goes to the agent, not to the helper
            env=HELPER_ENV,
            cwd="/",
        )
        config = {"sys_path": [os.path.abspath(p) for p in sys.path if p], "handler_table": str(table),
                  "box": str(box), "idle_exit": self.idle_exit, "agent_root": str(self.agent_root),
                  "user": self.sandbox_user, "hide": self.hide}
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(config) + "\n").encode("utf-8"))
        proc.stdin.flush()
        self._proc = proc
        self._buffer = b""
        return proc

    def _ask(self, request: Dict[str, Any]) -> Dict[str, Any]:
        proc = self._ensure_running()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise HelperFailed(f"could not write to the helper: {exc}") from None
        line = self._read_line(proc, self.timeout + HELPER_GRACE)
        try:
            reply = json.loads(line)
        except ValueError:
            raise HelperFailed(f"the helper answered something that is not JSON: {line[:200]!r}") from None
        if not isinstance(reply, dict):
            raise HelperFailed("the helper answered something that is not a JSON object")
        return reply

    def _read_line(self, proc: subprocess.Popen, timeout: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise HelperFailed(f"the helper did not answer within {timeout:g} s")
                data = os.read(fd, 65536)
                if not data:
                    raise HelperFailed(f"the helper exited (status {proc.poll()})")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a killed process always exits
            pass
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
