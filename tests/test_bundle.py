"""The offline agent bundle and its Debian package: built from this checkout, run, installed, removed, purged."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.contract import listening_address
from conftest import REPO

HANDLER = "def handle_hello(data):\n    return {'hello': 'from the bundle'}\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``fleet agent bundle`` run once for this module, into a folder of its own."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "fleet", "agent", "bundle", "--out", str(out), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    return Path(document["pyz"]), Path(document["deb"])


def pythons():
    """Every Python 3.9 or newer on this machine that runs (PATH, pyenv, this one)."""
    candidates = {sys.executable, *(shutil.which(f"python3.{minor}") or "" for minor in range(9, 16)),
                  shutil.which("python3") or "", "/usr/bin/python3",
                  *glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3.*[0-9]"))}
    found = {}
    for path in sorted(p for p in candidates if p and os.access(p, os.X_OK)):
        probe = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and tuple(map(int, probe.stdout.split("."))) >= (3, 9):
            found.setdefault(probe.stdout.strip(), path)
    return found


def ask(port, *requests):
    """Send requests over one connection, each after the reply to the one before; their replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        stream = sock.makefile("rb")
        replies = []
        for request in requests:
            sock.sendall(json.dumps(request).encode() + b"\n")
            replies.append(json.loads(stream.readline()))
        return replies


def test_the_bundle_runs_on_every_python_from_39_on_and_pushes_go_through_its_box(built, tmp_path):
    pyz, _ = built
    versions = pythons()
    assert "3.9" in versions or pytest.skip("no Python 3.9 on this machine (pyenv install 3.9)")
    for version, python in versions.items():
        root = tmp_path / version
        agent = subprocess.Popen([python, str(pyz), "--port", "0", "--root", str(root)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        try:
            address = listening_address(agent.stdout.readline())
            assert address is not None, version
            pushed, called = ask(address[1], {"command": "update_handler", "filename": "hello.py", "code": HANDLER},
                                 {"command": "hello"})
            assert pushed["success"] is True, (version, pushed)  # its import test ran in the box
            assert called["hello"] == "from the bundle", version
        finally:
            agent.terminate()
            agent.wait(timeout=20)
            agent.stdout.close()
    assert len(versions) >= 2, versions


async def test_the_bundle_carries_its_mqtt_client_and_serves_through_a_broker_on_python_39(built, tmp_path, broker):
    from conftest import python39, until_online
    from fleet import Device, Fleet
    from fleet.inventory import BrokerRoute

    pyz, _ = built
    python = python39() or pytest.skip("no Python 3.9 on this machine (pyenv install 3.9)")
    agent = subprocess.Popen([python, "-I", str(pyz), "--port", "0", "--root", str(tmp_path / "root"),
                              "--broker", broker.plain_url, "--device-id", "bundled"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listening_address(agent.stdout.readline()) is not None, agent.stderr.read()
        async with Fleet([Device(id="bundled", host="", broker=BrokerRoute(broker.plain_url))],
                         connect_timeout=10) as fleet:
            status = await until_online(fleet, "bundled")
        assert status["python_version"].startswith("3.9")
    finally:
        agent.terminate()
        agent.wait(timeout=20)
        agent.stdout.close()
        agent.stderr.close()


def test_the_package_holds_the_agent_its_unit_config_and_scripts(built):
    _, deb = built
    info = subprocess.run(["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True).stdout
    assert f"Version: {__version__}" in info and "Architecture: all" in info and "python3 (>= 3.9)" in info
    contents = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./opt/pi-agent/pi-agent.pyz", "./opt/pi-agent/launcher.py", "./usr/bin/pi-agent", "./lib/systemd/system/pi-agent.service",
                 "./etc/pi-agent/pi-agent.conf", "./usr/share/doc/pi-agent/README.md",
                 "./usr/share/doc/pi-agent/copyright"):
        assert path in contents, path
    unit = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"SupplementaryGroups" not in unit  # groups are added by postinst, only where they exist
    assert b"Documentation=file:///usr/share/doc/pi-agent/README.md" in unit


def container_can_run():
    if os.geteuid() != 0:
        return "installing the .deb into a throwaway root needs root (CI runs as root)"
    if shutil.which("unshare") is None or shutil.which("dpkg") is None:
        return "installing the .deb needs unshare and dpkg"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return "" if probe.returncode == 0 else "this kernel refuses mount namespaces (unshare -m)"


@pytest.fixture
def throwaway_root(built, tmp_path):
    """``run(script)``: ``script`` (sh) as root in a copy-on-write view of this machine (an overlay on /, in a
    mount namespace of its own, on tmpfs), with the package at /tmp/pi-agent.deb. Whatever dpkg does there is
    gone when it ends. Skips, saying why, where the machine does not allow it."""
    why = container_can_run()
    if why:
        pytest.skip(why)
    _, deb = built
    layers = tmp_path / "layers"
    layers.mkdir()

    def run(script):
        setup = f"""set -e
mount -t tmpfs tmpfs {layers}
mkdir {layers}/upper {layers}/work {layers}/root
mount -t overlay overlay -o lowerdir=/,upperdir={layers}/upper,workdir={layers}/work {layers}/root
mount --bind /dev {layers}/root/dev
mount --bind /proc {layers}/root/proc
cp {deb} {layers}/root/tmp/pi-agent.deb
exec chroot {layers}/root sh -s
"""
        return subprocess.run(["unshare", "-m", "sh", "-c", setup], input=script, capture_output=True, text=True,
                              timeout=180)

    return run


def test_the_package_installs_removes_and_purges_in_a_throwaway_root(throwaway_root):
    run = throwaway_root("""set -e
dpkg -i /tmp/pi-agent.deb
echo "user: $(id pi-agent)"
echo "token: $(stat -c '%a %U:%G %s' /etc/pi-agent/token)"
echo "state: $(stat -c '%a %U' /var/lib/pi-agent)"
pi-agent --version
# as the unit starts it: the launcher, running the bundle
runuser -u pi-agent -- python3 /opt/pi-agent/launcher.py --bundle /opt/pi-agent/pi-agent.pyz \
    --root /var/lib/pi-agent --supervised --port 0 --token-file /etc/pi-agent/token > /tmp/out 2> /tmp/err < /dev/null &
agent=$!
for i in $(seq 1 100); do grep -q 'listening on' /tmp/out && break; sleep 0.1; done
echo "started: $(cat /tmp/out)"
kill $agent; wait $agent || true
dpkg -r pi-agent > /dev/null
echo "after remove: $(ls /etc/pi-agent | tr '\\n' ' ') user $(getent passwd pi-agent | cut -d: -f1)"
test ! -e /opt/pi-agent/pi-agent.pyz && echo "agent removed"
dpkg -P pi-agent > /dev/null 2>&1
test ! -e /etc/pi-agent && test ! -e /var/lib/pi-agent && echo "purged"
getent passwd pi-agent || echo "user gone"
""")
    out = run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
    user = next(line for line in out.splitlines() if line.startswith("user: "))
    has_video = subprocess.run(["getent", "group", "video"], capture_output=True).returncode == 0
    assert "groups=" in user and ("(video)" in user) == has_video  # added to video only where it exists
    assert "token: 640 root:pi-agent" in out and "token: 640 root:pi-agent 0" not in out
    assert "state: 750 pi-agent" in out and f"pi-agent {__version__}" in out
    assert "started: pi-agent" in out and "listening on 127.0.0.1:" in out
    assert "systemd is not running here; start the agent as its unit would, with:" in out  # no systemd in the throwaway root
    assert "after remove: pi-agent.conf token  user pi-agent" in out and "agent removed" in out
    assert "purged" in out and "user gone" in out


def test_a_provisioned_token_is_kept(throwaway_root):
    run = throwaway_root("""set -e
mkdir -p /etc/pi-agent && echo provisioned-secret > /etc/pi-agent/token
dpkg -i /tmp/pi-agent.deb > /dev/null
cat /etc/pi-agent/token
""")
    assert run.returncode == 0 and run.stdout.strip().endswith("provisioned-secret"), run.stdout + run.stderr


def test_lintian_finds_no_errors(built):
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (sudo apt install lintian)")
    _, deb = built
    run = subprocess.run(["lintian", "--tag-display-limit", "0", str(deb)], capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], run.stdout
