"""The import-test helper: a warm, single-threaded process that forks a boxed child per test.

The agent starts this file as its own program (``python -I import_helper.py``)
with a clean environment, never as a fork of itself: the agent has threads,
and forking a threaded process is unsafe. This helper has exactly one thread,
so *it* may fork, and a fork costs about a millisecond where starting a fresh
interpreter costs tens. The helper stays idle between deploys and exits by
itself after a while without work; the agent starts a new one when it needs it.

Each test runs in the box (``box.py``, loaded by path): its own namespaces,
a read-only filesystem, an unprivileged user, no network, resource limits
(address space, CPU time, file size, no core dumps), stdin/stdout/stderr on
/dev/null, and its whole process tree killed at the end. The module's process
compiles and runs the exact text it was sent, checks the module's command
table with the same rules the agent uses (``handler_table.py``, loaded by
path), runs a module-level ``self_test()`` if there is one, and writes one
JSON result to a pipe. How that process ended comes from the box's init
process on a second pipe the module never holds, so the module cannot forge
it: finished, raised, called ``sys.exit``, exited without reporting
(``os._exit``), was killed by a signal (a segfault), or ran out of time.

Protocol on stdin/stdout, one JSON object per line:
    first line  {"sys_path": [...], "handler_table": "...", "box": "...", "idle_exit": 300,
                 "agent_root": "/var/lib/pi-agent", "user": "nobody", "hide": ["/etc/pi-agent/token"]}
    request     {"name": "cam", "path": "handlers/cam.py", "source": "...", "timeout": 10, "memory_mb": 512}
                {"probe": true, "timeout": 10, "memory_mb": 512}  (set up the box, run nothing)
    reply       {"ok": true, "commands": [...], "warnings": [...], "isolation": {...}}
                {"ok": false, "kind": "timeout|exit|crash|exception|table|self_test|memory|box",
                 "error": "...", "isolation": {...}}

Standard library only; runs on Python 3.9+.
"""

import contextlib
import importlib.util
import json
import os
import select
import signal
import sys
import time
import traceback
import types

try:  # here, once: imported in each box it would be loaded afresh, from disk, by every test
    import resource
except ImportError:
    resource = None  # type: ignore[assignment]

# Modules most handlers import: loading them once here makes each forked
# child start warm. This changes nothing a module can observe except speed.
WARM_MODULES = (
    "asyncio", "datetime", "json", "logging", "pathlib", "re", "shutil",
    "signal", "socket", "subprocess", "threading", "time",
)
BOX_FAILED = 71  # exit status of a box process that could not set itself up


def main():
    lines = _LineInput(sys.stdin.fileno())
    config = json.loads(lines.next_line(None))
    sys.path[:] = config["sys_path"]
    table = _load_by_path("_pi_agent_handler_table", config["handler_table"])
    box_module = _load_by_path("_pi_agent_box", config["box"])
    box = box_module.Box(agent_root=config["agent_root"], user=config["user"], hide=config["hide"],
                         sys_path=config["sys_path"])
    for name in WARM_MODULES:
        try:
            __import__(name)
        except ImportError:
            pass
    idle_exit = config.get("idle_exit")
    ready = PreparedBox(box, table)
    try:
        while True:
            line = lines.next_line(idle_exit)
            if not line:
                return 0  # the agent closed the pipe, or we were idle: it starts a new helper when needed
            reply = ready.run(json.loads(line))
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            # Off the deploy's path: the agent has its answer while this box goes and the next one is made.
            ready.discard()
            ready = PreparedBox(box, table)
    finally:
        ready.discard()


def _load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


class PreparedBox:
    """A box made ahead of its test: the module's process waits, boxed already, for its request.

    Making a box costs three forks, namespaces and mounts, a few milliseconds;
    the helper makes the next one while the agent is busy with the reply, so a
    deploy waits only for the module's own import.
    """

    def __init__(self, box, table):
        self.box = box
        request_r, self.request_w = os.pipe()
        self.result_r, result_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.scratch = box.new_scratch()
        self.outer = os.fork()
        if self.outer == 0:  # never returns
            with _box_process():
                for fd in (self.request_w, self.result_r, self.status_r):
                    os.close(fd)
                _outer(table, box, self.scratch, request_r, result_w, status_w)
        for fd in (request_r, result_w, status_w):
            os.close(fd)

    def run(self, request):
        """Hand ``request`` to the waiting module process; its reply, with the box's report."""
        deadline = time.monotonic() + float(request["timeout"])
        try:
            _write_all(self.request_w, json.dumps(request) + "\n")
        except OSError:  # the box died while it waited
            output, status = b"", -1
        else:
            output, status = _collect(self.result_r, self.status_r, deadline)
        return _verdict(request, output, status)

    def discard(self):
        """Kill everything the test left and drop its folders."""
        for fd in (self.request_w, self.result_r, self.status_r):
            try:
                os.close(fd)
            except OSError:
                pass
        _kill_group(self.outer)
        self.box.kill_descendants()
        self.box.discard(self.scratch)


@contextlib.contextmanager
def _box_process():
    """Run a forked box process: it never returns, and a failure to set up goes to the agent's log."""
    try:
        yield
    except BaseException:  # noqa: BLE001 - the box's own code failed; the module has not run
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(BOX_FAILED)


def _outer(table, box, scratch, request_r, result_w, status_w):
    spaces = box.outer()
    init = os.fork()  # PID 1 of the new PID namespace, where there is one
    if init == 0:
        with _box_process():
            _init(table, box, spaces, scratch, request_r, result_w, status_w)
    for fd in (request_r, result_w, status_w):
        os.close(fd)
    os.waitpid(init, 0)
    os._exit(0)


def _init(table, box, spaces, scratch, request_r, result_w, status_w):
    home, active, missing = box.setup(spaces, scratch)
    child = os.fork()
    if child == 0:
        with _box_process():
            os.close(status_w)
            _child(table, box.enter(spaces, home, active, missing), request_r, result_w)
    os.close(request_r)
    os.close(result_w)
    _, status = os.waitpid(child, 0)
    try:
        os.write(status_w, f"{status}\n".encode())
    except BrokenPipeError:
        pass  # a box made ahead and never used: the helper has gone, or discarded it
    os._exit(0)


def _collect(result_r, status_r, deadline):
    """The module's output and its wait status (None if it ran out of time)."""
    chunks, status_bytes = [], b""
    open_fds = [result_r, status_r]
    while status_r in open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), None
        ready, _, _ = select.select(open_fds, [], [], remaining)
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                open_fds.remove(fd)
            elif fd == result_r:
                chunks.append(data)
            else:
                status_bytes += data
    while True:  # what the module wrote before it ended is in the pipe already
        ready, _, _ = select.select([result_r], [], [], 0)
        data = os.read(result_r, 65536) if ready else b""
        if not data:
            break
        chunks.append(data)
    try:
        return b"".join(chunks), int(status_bytes)
    except ValueError:  # the box's init process died before reporting
        return b"".join(chunks), -1


def _verdict(request, output, status):
    lines = output.split(b"\n")
    isolation = _json_line(lines[0]) if lines else None
    reply = _json_line(lines[1]) if len(lines) > 1 else None
    if not isinstance(isolation, dict) or "box" not in isolation:
        isolation, reply = None, None
    result = _judge(request, reply, status)
    result["isolation"] = isolation["box"] if isolation else None
    return result


def _judge(request, reply, status):
    timeout = float(request["timeout"])
    if status is None:
        return _failure("timeout", f"import did not finish within {timeout:g} s "
                                   "(the module blocks at import or in self_test())")
    if status == -1:
        return _failure("box", "the box the import test runs in failed before the test ended")
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return _failure("crash", f"the import test process was killed by signal {name} "
                                 "(the module crashed the interpreter or killed itself)")
    code = os.WEXITSTATUS(status)
    if isinstance(reply, dict) and code == 0:
        return reply
    if code == BOX_FAILED and reply is None:
        return _failure("box", "the box the import test runs in could not be set up (the agent's log may say why)")
    return _failure("exit", f"the module ended the import test process with exit status {code} "
                            "before the import finished (os._exit or similar)")


def _json_line(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


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


def _child(table, isolation, request_r, write_fd):
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    line = _LineInput(request_r).next_line(None)
    if not line:
        os._exit(0)  # the helper went away before it had a test for this box
    os.close(request_r)
    request = json.loads(line)
    _limit_resources(request)
    _write_all(write_fd, json.dumps({"box": isolation}) + "\n")
    result = {"ok": True} if request.get("probe") else _import_and_test(request, table)
    _write_all(write_fd, json.dumps(result) + "\n")
    os._exit(0)


def _write_all(fd, text):
    view = memoryview(text.encode("utf-8"))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _limit_resources(request):
    if resource is None:  # not on Linux: the time limit still holds
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
