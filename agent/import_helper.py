"""The import-test helper: a warm, single-threaded process that forks one child per test.

The agent starts this file as its own program (``python -I import_helper.py``),
never as a fork of itself: the agent has threads, and forking a threaded
process is unsafe. This helper has exactly one thread, so *it* may fork, and
a fork costs about a millisecond where starting a fresh interpreter costs
tens. The helper stays idle between deploys and exits by itself after a
while without work; the agent starts a new one when it needs it.

Each test runs in a fresh child with resource limits (address space, CPU
time, file size, no core dumps), its own session (so anything it spawns can
be killed with it), and stdin/stdout/stderr on /dev/null. The child compiles
and runs the exact source it was sent, checks the module's command table with
the same rules the agent uses (``handler_table.py``, loaded by path), runs a
module-level ``self_test()`` if there is one, and writes one JSON result to a
pipe. The helper enforces the time limit and reports how the child ended:
finished, raised, called ``sys.exit``, exited without reporting (``os._exit``),
was killed by a signal (a segfault), or ran out of time.

Protocol on stdin/stdout, one JSON object per line:
    first line  {"sys_path": [...], "handler_table": "/path/handler_table.py", "idle_exit": 300}
    request     {"name": "cam", "path": "handlers/cam.py", "source": "...", "timeout": 10, "memory_mb": 512}
    reply       {"ok": true, "commands": [...], "warnings": [...]}
                {"ok": false, "kind": "timeout|exit|crash|exception|table|self_test|memory", "error": "..."}

Standard library only; runs on Python 3.9+.
"""

import importlib.util
import json
import os
import select
import signal
import sys
import time
import traceback
import types

# Modules most handlers import: loading them once here makes each forked
# child start warm. This changes nothing a module can observe except speed.
WARM_MODULES = (
    "asyncio", "datetime", "json", "logging", "pathlib", "re", "shutil",
    "signal", "socket", "subprocess", "threading", "time",
)


def main():
    lines = _LineInput(sys.stdin.fileno())
    config = json.loads(lines.next_line(None))
    sys.path[:] = config["sys_path"]
    spec = importlib.util.spec_from_file_location("_pi_agent_handler_table", config["handler_table"])
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name in WARM_MODULES:
        try:
            __import__(name)
        except ImportError:
            pass
    idle_exit = config.get("idle_exit")
    while True:
        line = lines.next_line(idle_exit)
        if not line:
            return 0  # the agent closed the pipe, or we were idle: it starts a new helper when needed
        reply = run_test(json.loads(line), table)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class _LineInput:
    """Unbuffered line reading from a file descriptor, with an idle timeout.

    ``sys.stdin.readline`` reads ahead into its own buffer, where ``select``
    cannot see the data; reading the descriptor directly avoids that.
    """

    def __init__(self, fd):
        self.fd = fd
        self.buffer = b""

    def next_line(self, timeout):
        while b"\n" not in self.buffer:
            if timeout:
                ready, _, _ = select.select([self.fd], [], [], timeout)
                if not ready:
                    return b""
            data = os.read(self.fd, 1 << 20)
            if not data:
                return b""
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def run_test(request, table):
    timeout = float(request["timeout"])
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read_fd)
            _child(request, table, write_fd)
        finally:
            os._exit(70)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    chunks = []
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if ready:
                data = os.read(read_fd, 65536)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(read_fd)
    status = None if timed_out else _wait(pid, deadline)
    if status is None:
        _kill_group(pid)
        return _failure("timeout", f"import did not finish within {timeout:g} s "
                                   "(the module blocks at import or in self_test())")
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        _kill_group(pid)  # anything it started goes with it
        return _failure("crash", f"the import test process was killed by signal {name} (the module crashed the interpreter)")
    _kill_group(pid)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        code = os.WEXITSTATUS(status)
        return _failure("exit", f"the module ended the import test process with exit status {code} "
                                "before the import finished (os._exit or similar)")


def _wait(pid, deadline):
    """waitpid with a deadline; None if the child is still running at the deadline."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _failure(kind, error):
    return {"ok": False, "kind": kind, "error": error}


def _child(request, table, write_fd):
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _limit_resources(request)
    result = _import_and_test(request, table)
    payload = json.dumps(result).encode("utf-8")
    view = memoryview(payload)
    while view:
        written = os.write(write_fd, view)
        view = view[written:]
    os.close(write_fd)
    os._exit(0)


def _limit_resources(request):
    try:
        import resource
    except ImportError:  # not on Linux: the time limit still holds
        return
    memory = int(request["memory_mb"]) * 1024 * 1024
    cpu = int(float(request["timeout"])) + 1
    for limit, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, 64 * 1024 * 1024),
    ):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass


def _import_and_test(request, table):
    path = request["path"]
    module = types.ModuleType("pi_agent_handlers." + request["name"])
    module.__file__ = path
    sys.modules[module.__name__] = module
    try:
        code = compile(request["source"], path, "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except SystemExit as exc:
        return _failure("exit", f"the module called sys.exit({exc.code!r}) at import")
    except MemoryError:
        return _failure("memory", f"the module ran out of memory at import (limit {request['memory_mb']} MiB)")
    except BaseException as exc:  # noqa: BLE001 - report anything the module raised
        return _failure("exception", f"{type(exc).__name__} at import{_where(exc, path)}: {exc}")
    try:
        commands = table.collect_commands(module)
    except table.TableError as exc:
        return _failure("table", f"Runtime test failed: {exc}")
    self_test = getattr(module, "self_test", None)
    if callable(self_test):
        try:
            outcome = self_test()
            if hasattr(outcome, "__await__"):
                import asyncio
                asyncio.run(outcome)
        except BaseException as exc:  # noqa: BLE001
            return _failure("self_test", f"Runtime test failed: self_test() raised {type(exc).__name__}{_where(exc, path)}: {exc}")
    warnings = []
    if not commands:
        warnings.append("the module defines no commands (no COMMAND_HANDLERS and no handle_<name> functions)")
    return {
        "ok": True,
        "commands": list(commands),
        "warnings": warnings,
    }


def _where(exc, path):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return f" (line {frames[-1].lineno})" if frames else ""


if __name__ == "__main__":
    sys.exit(main())
