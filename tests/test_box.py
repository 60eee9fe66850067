"""The import test's box: code that is refused leaves nothing behind and reaches nothing.

Each module below tries one thing the issue saw refused code do, then raises,
so that its import test refuses it. A real agent process runs it with a token
in its environment, twice: as root (the box drops to ``nobody``) and as an
unprivileged user, as the systemd unit runs it (the box enters a user
namespace and drops every capability; the module runs as the agent's own
user, so the read-only view is what keeps it out of the agent's files).
Each case names the protections that stop it; where the kernel refuses all of
them, the case is skipped with their names.
"""

import asyncio
import os
import shutil
import socket
from pathlib import Path

import pytest

from conftest import REPLY_TIMEOUT, Client, visible_folder
from fleet.local import free_port
from test_deploy import deploy

TOKEN = "box-test-token-4b1d"
RAISE = "raise RuntimeError('refused on purpose: ' + repr(found))\n"


def attack_home(agent_home: Path, **_) -> str:
    return (f"import os, pathlib\nfound = []\n"
            f"for place in (os.path.expanduser('~'), {str(agent_home)!r}):\n"
            "    try:\n        pathlib.Path(place, 'pwned').write_text('x'); found.append(place)\n"
            "    except OSError as exc:\n        found.append(str(exc))\n" + RAISE)


def attack_child(marker: str, target: Path, **_) -> str:
    """A child in a new session that writes ``target`` a second later (after the refusal)."""
    return ("import os, pathlib, subprocess, time\n"
            f"script = pathlib.Path(os.environ.get('TMPDIR', '/tmp'), {marker!r})\n"
            f"script.write_text('echo up > \"$0.up\"; sleep 1; echo x > {target}')\n"
            "subprocess.Popen(['/bin/sh', str(script)], start_new_session=True, stdin=subprocess.DEVNULL,\n"
            "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "while not os.path.exists(str(script) + '.up'):\n    time.sleep(0.01)\n"
            "found = 'child started'\n" + RAISE)


def attack_socket(port: int, **_) -> str:
    return ("import socket, subprocess\nfound = []\n"
            "listener = socket.socket()\nlistener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"try:\n    listener.bind(('0.0.0.0', {port})); listener.listen(); found.append('listening')\n"
            "except OSError as exc:\n    found.append(str(exc))\n"
            "subprocess.Popen(['sleep', '30'], pass_fds=[listener.fileno()], start_new_session=True)\n" + RAISE)


def attack_token(token_file: Path, **_) -> str:
    return ("import glob, os\n"
            "found = [os.environ.get('PI_AGENT_TOKEN', '')]\n"
            f"for path in glob.glob('/proc/*/environ') + [{str(token_file)!r}]:\n"
            "    try:\n        found.append(open(path, 'rb').read().decode('utf-8', 'replace'))\n"
            "    except OSError:\n        pass\n" + RAISE)


def attack_signal(agent_pid: int, **_) -> str:
    return ("import os, signal\nfound = []\n"
            f"for pid in {{os.getppid(), {agent_pid}}} - {{0}}:\n"
            "    try:\n        os.kill(pid, signal.SIGSTOP); found.append(pid)\n"
            "    except OSError as exc:\n        found.append(str(exc))\n" + RAISE)


def attack_handlers(root: Path, **_) -> str:
    evil = "import os\\nos.system('touch /tmp/evil')\\ndef handle_evil(data):\\n    return {}\\n"
    return ("import pathlib\nfound = []\n"
            f"try:\n    pathlib.Path({str(root / 'handlers' / 'evil.py')!r}).write_text({evil!r})\n"
            "except OSError as exc:\n    found.append(str(exc))\n" + RAISE)


# case: (module maker, protections of which one suffices)
CASES = {
    "writes into HOME": (attack_home, ["readonly_filesystem"]),
    "a new-session child": (attack_child, ["process_tree_killed"]),
    "a listening socket": (attack_socket, ["no_network"]),
    "reads the token": (attack_token, ["clean_environment"]),
    "signals its parent and the agent": (attack_signal, ["private_proc", "unprivileged_user"]),
    "writes into handlers/": (attack_handlers, ["readonly_filesystem"]),
}


SYSTEM_PYTHON = Path("/usr/bin/python3")  # readable by any user, as on a Pi
UNPRIVILEGED = 65534


def as_unprivileged_user():
    os.setgroups([])
    os.setgid(UNPRIVILEGED)
    os.setuid(UNPRIVILEGED)


@pytest.fixture(params=["root", "unprivileged"])
def boxed_agent(request, spawn_agent):
    """``(start, home, token_file)``: ``start()`` spawns the agent, as root or as an unprivileged user."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the agent as root and as another user")
    extra = {}
    if request.param == "unprivileged":
        if not SYSTEM_PYTHON.exists():
            pytest.skip(f"missing {SYSTEM_PYTHON}: an interpreter an unprivileged user can run")
        extra = {"python": str(SYSTEM_PYTHON), "preexec_fn": as_unprivileged_user}
    # Not tmp_path: the box has its own /tmp, and pytest's folders are closed to other users. A real
    # agent's root and home are outside /tmp too (/var/lib/pi-agent), where the box sees them read-only.
    folder = visible_folder("box-")
    home, token_file, root = folder / "agent-home", folder / "token", folder / "device"
    home.mkdir()
    root.mkdir()
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    if request.param == "unprivileged":
        for path in (home, root, token_file):
            os.chown(path, UNPRIVILEGED, UNPRIVILEGED)

    def start():
        # The token both in a file (hidden from the box) and in the environment (cleared for it).
        return spawn_agent("--token-file", str(token_file), root=root,
                           env={"PI_AGENT_TOKEN": TOKEN, "HOME": str(home)}, **extra)
    yield start, home, token_file
    shutil.rmtree(folder, ignore_errors=True)


async def isolation_of(client) -> dict:
    """``get_status.isolation``, once the agent's probe of its box has answered (it runs after start)."""
    deadline = asyncio.get_running_loop().time() + REPLY_TIMEOUT
    while True:
        status = await client.call("get_status", token=TOKEN)
        if status["isolation"] is not None:
            return status
        assert asyncio.get_running_loop().time() < deadline, "the agent never reported its box"
        await asyncio.sleep(0.02)


def skip_unless_any(status, protections):
    missing = status["isolation"]["missing"]
    if all(name in missing for name in protections):
        pytest.skip("missing protection: " + "; ".join(f"{name} ({missing[name]})" for name in protections))


def processes_with(marker: str):
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("case", CASES)
async def test_refused_code_leaves_nothing_behind(boxed_agent, flag_dir, tmp_path, case):
    start, home, token_file = boxed_agent
    agent = start()
    make, protections = CASES[case]
    marker, target, port = f"pifleet-late-{os.getpid()}.sh", flag_dir / "late", free_port()
    flag_dir.chmod(0o777)  # writable by anyone: only the box stands between the child and this folder
    code = make(agent_home=home, marker=marker, target=target, port=port, token_file=token_file,
                agent_pid=agent.proc.pid, root=agent.root)
    client = await Client.connect(agent.address)
    try:
        status = await isolation_of(client)
        skip_unless_any(status, protections)
        reply = await deploy(client, "attack.py", code, token=TOKEN)
        assert reply["code"] == "import_failed" and "refused on purpose" in reply["error"], reply
        assert TOKEN not in repr(reply)
        assert (await client.call("ping", token=TOKEN))["success"] is True
        assert list(home.iterdir()) == []
        assert processes_with(marker) == []  # the child is gone with the test, before the reply
        assert not target.exists()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for pid in (agent.proc.pid, status["import_helper_pid"]):
            assert not stopped(pid)
        assert not (agent.root / "handlers" / "evil.py").exists()
        if case == "a new-session child":
            assert "child started" in reply["error"]  # it really ran before the refusal
    finally:
        await client.close()
    agent.terminate()
    client = await Client.connect(start().address)
    try:
        assert (await client.call("evil", token=TOKEN))["code"] == "unknown_command"
    finally:
        await client.close()


async def test_the_box_reports_its_protections_and_the_agent_logs_them(boxed_agent):
    start, _, _ = boxed_agent
    agent = start()
    client = await Client.connect(agent.address)
    try:
        isolation = (await isolation_of(client))["isolation"]
    finally:
        await client.close()
    assert {"clean_environment", "throwaway_home"} <= set(isolation["active"])
    assert set(isolation["active"]).isdisjoint(isolation["missing"])
    agent.terminate()
    _, err = agent.proc.communicate(timeout=10)
    assert "import test box: active: " + ", ".join(sorted(isolation["active"])) in err


async def test_handlers_and_the_processes_they_start_never_see_the_token(boxed_agent):
    start, _, _ = boxed_agent
    client = await Client.connect(start().address)
    code = ("import os, subprocess\n"
            "def handle_env(data):\n"
            "    child = subprocess.run(['env'], capture_output=True, text=True).stdout\n"
            "    return {'mine': os.environ.get('PI_AGENT_TOKEN'), 'child': child}\n")
    try:
        assert (await deploy(client, "env.py", code, token=TOKEN))["success"] is True
        reply = await client.call("env", token=TOKEN)
        assert reply["mine"] is None and TOKEN not in reply["child"] and "PATH=" in reply["child"]
    finally:
        await client.close()


async def test_a_file_the_agent_did_not_put_in_handlers_is_checked_before_it_loads(tmp_path, spawn_agent):
    root = tmp_path / "device"
    (root / "handlers").mkdir(parents=True)
    (root / "handlers" / "evil.py").write_text("import os\nos.system('true')\ndef handle_evil(data):\n    return {}\n")
    (root / "handlers" / "fine.py").write_text("def handle_fine(data):\n    return {'fine': True}\n")
    client = await Client.connect(spawn_agent(root=root).address)
    try:
        assert (await client.call("evil"))["code"] == "unknown_command"
        assert (await client.call("fine"))["fine"] is True
        status = await client.call("get_status")
        findings = {f["file"]: f for f in status["integrity"]}
        assert findings["evil.py"]["status"] == "quarantined" and "os.system" in findings["evil.py"]["detail"]
        assert findings["fine.py"]["status"] == "found"
        assert not (root / "handlers" / "evil.py").exists()
        assert status["quarantine"][0]["file"] == "evil.py"
    finally:
        await client.close()
