"""The agent as a Debian package: ``pi-agent_VERSION_all.deb``, built with ``dpkg-deb`` from the bundle.

What it installs:

    /opt/pi-agent/pi-agent.pyz          the agent (the offline bundle, ``fleet/bundle.py``)
    /opt/pi-agent/launcher.py           runs it, and switches to an upgraded agent only once it is up
    /usr/bin/pi-agent                   runs it with the system's python3
    /lib/systemd/system/pi-agent.service
    /etc/pi-agent/pi-agent.conf         the agent's options (a conffile: kept across upgrades)
    /usr/share/doc/pi-agent/            README.md (the unit's Documentation=), copyright, changelog
    /usr/share/lintian/overrides/       /opt/pi-agent is on purpose (lintian would flag it)

and what its scripts do: ``postinst`` makes the ``pi-agent`` system user,
adds it to ``video`` and ``gpio`` only where those groups exist, keeps a
provisioned ``/etc/pi-agent/token`` or makes a random one, and enables and
starts the unit where systemd runs (and says how to start the agent where it
does not); ``prerm`` stops it; ``postrm`` removes the agent's state, token
and user only on purge (``dpkg -P``).
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

from agent import __version__

from .bundle import AGENT, build_pyz
from .errors import ConfigError

MAINTAINER = "pifleet maintainers <maintainers@pifleet.dev>"

CONTROL = f"""Package: pi-agent
Version: {__version__}
Architecture: all
Maintainer: {MAINTAINER}
Depends: python3 (>= 3.9), adduser
Recommends: python3-cryptography
Section: admin
Priority: optional
Description: hot-loadable command server for a Raspberry Pi fleet
 pi-agent runs commands from handler modules and takes new handler code
 over the network, checked, test-imported in a box and loaded so that a bad
 push never costs the device. The pifleet controller rolls code out to many
 agents in waves. Standard library only; python3-cryptography is needed for
 signed code (--trusted-keys).
"""

CONFIG = """# pi-agent's options (`pi-agent --help`), read by pi-agent.service. Restart the service after a change:
#   sudo systemctl restart pi-agent
# With mutual TLS instead of (or as well as) the token, add:
#   --tls-cert /etc/pi-agent/device.crt --tls-key /etc/pi-agent/device.key --tls-ca /etc/pi-agent/ca.crt
#   --tls-crl /var/lib/pi-agent/crl.pem --trusted-keys /etc/pi-agent/trusted-keys
# Behind NAT, to be reached through the fleet's MQTT broker (with the TLS files above as its identity), add:
#   --broker mqtts://broker.example.com:8883 --device-id THIS_DEVICES_ID
PI_AGENT_OPTIONS="--host 0.0.0.0 --port 3000 --token-file /etc/pi-agent/token"
"""

UNIT = """[Unit]
Description=pi-agent: hot-loadable command server for this Raspberry Pi
Documentation=file:///usr/share/doc/pi-agent/README.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=pi-agent
Group=pi-agent
EnvironmentFile=/etc/pi-agent/pi-agent.conf
# The launcher runs the agent bundle, and switches to an upgraded one only once it is up (fleet agent upgrade).
ExecStart=/usr/bin/python3 /opt/pi-agent/launcher.py --bundle /opt/pi-agent/pi-agent.pyz --root /var/lib/pi-agent --supervised $PI_AGENT_OPTIONS
Environment=PYTHONUNBUFFERED=1
Environment=PI_AGENT_RECORDINGS=/var/lib/pi-agent/recordings
Restart=always
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=20
StateDirectory=pi-agent
StateDirectoryMode=0750
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full
ProtectHome=read-only

[Install]
WantedBy=multi-user.target
"""

DOC = f"""# pi-agent {__version__}

pi-agent runs commands from handler modules in /var/lib/pi-agent/handlers/ and takes new handler code
over the network (newline-delimited JSON, port 3000), from the pifleet controller (`fleet`) or any
client. Each push is checked, test-imported in a box, backed up and loaded so that a bad push never
costs the device.

- Options: /etc/pi-agent/pi-agent.conf (`PI_AGENT_OPTIONS`; every option is `pi-agent --help`), then
  `sudo systemctl restart pi-agent`.
- The token every request must carry: /etc/pi-agent/token (made at install unless one was provisioned
  there first). Give it to the controller: devices.json, `token_env` or `token`.
- Mutual TLS and signed code: see the options in pi-agent.conf; certificates come from `fleet ca issue`,
  release keys from `fleet keys init`.
- State, backups and the update log: /var/lib/pi-agent. Log: `journalctl -u pi-agent`.
- Remove: `sudo dpkg -r pi-agent` keeps the configuration, token and state; `sudo dpkg -P pi-agent`
  removes them and the pi-agent user too.

The pifleet project's README has the whole story (installing the controller, provisioning, rollouts).
"""

LAUNCHER = """#!/bin/sh
# pi-agent from its package: every option is pi-agent's (pi-agent --help).
exec /usr/bin/python3 /opt/pi-agent/pi-agent.pyz "$@"
"""

POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd pi-agent >/dev/null; then
        adduser --system --group --home /var/lib/pi-agent --no-create-home --quiet pi-agent
    fi
    for group in video gpio; do  # the camera and GPIO, where this image has those groups
        if getent group "$group" >/dev/null; then
            adduser --quiet pi-agent "$group"
        fi
    done
    mkdir -p /var/lib/pi-agent
    chown pi-agent:pi-agent /var/lib/pi-agent
    chmod 0750 /var/lib/pi-agent
    if [ ! -s /etc/pi-agent/token ]; then  # a provisioned token (fleet provision) is kept as it is
        (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > /etc/pi-agent/token)
        test -s /etc/pi-agent/token
        echo "pi-agent: made a new token in /etc/pi-agent/token: give it to the controller (devices.json)"
    fi
    chown root:pi-agent /etc/pi-agent/token
    chmod 0640 /etc/pi-agent/token
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable pi-agent.service >/dev/null
        systemctl restart pi-agent.service
        echo "pi-agent: running (journalctl -u pi-agent)"
    else
        echo "pi-agent: systemd is not running here; start the agent as its unit would, with:"
        echo "  runuser -u pi-agent -- sh -c '. /etc/pi-agent/pi-agent.conf && exec python3 /opt/pi-agent/launcher.py --bundle /opt/pi-agent/pi-agent.pyz --root /var/lib/pi-agent \\$PI_AGENT_OPTIONS'"
    fi
fi
exit 0
"""

PRERM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop pi-agent.service || true
    systemctl disable pi-agent.service >/dev/null || true
fi
exit 0
"""

POSTRM = """#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /var/lib/pi-agent /etc/pi-agent
    if getent passwd pi-agent >/dev/null; then
        deluser --quiet --system pi-agent 2>/dev/null || true
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"""

# /opt/pi-agent is where the project's unit, docs and upgrades put the agent on every Pi, packaged or not.
LINTIAN_OVERRIDES = """# The agent lives in /opt/pi-agent on every Pi, installed by this package or by hand (README), so that
# the unit, the docs and agent upgrades over the fleet find it in one place.
pi-agent: dir-or-file-in-opt [opt/pi-agent/]
pi-agent: dir-or-file-in-opt [opt/pi-agent/pi-agent.pyz]
pi-agent: dir-or-file-in-opt [opt/pi-agent/launcher.py]
"""

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pifleet
Source: the pifleet repository (fleet agent bundle)

Files: *
Copyright: 2026 the pifleet maintainers
License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
 associated documentation files, to deal in the software without restriction, subject to the
 condition that this notice is included in all copies. The software is provided "as is", without
 warranty of any kind.
"""


def build_deb(out: Path) -> Path:
    """Write ``out/pi-agent_VERSION_all.deb`` with ``dpkg-deb`` and return its path."""
    if shutil.which("dpkg-deb") is None:
        raise ConfigError("building the .deb needs dpkg-deb (Debian's dpkg package: sudo apt install dpkg)")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"pi-agent_{__version__}_all.deb"
    with tempfile.TemporaryDirectory(prefix="pi-agent-deb-") as tmp:
        root = Path(tmp) / "root"
        _tree(root, build_pyz(Path(tmp)))
        run = subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(target)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise ConfigError(f"dpkg-deb failed: {run.stderr.strip()}")
    return target


def _tree(root: Path, pyz: Path) -> None:
    """The package's files, with the modes Debian expects."""
    files = {
        "opt/pi-agent/pi-agent.pyz": (pyz.read_bytes(), 0o755),
        "opt/pi-agent/launcher.py": ((AGENT / "launcher.py").read_bytes(), 0o644),
        "usr/bin/pi-agent": (LAUNCHER.encode(), 0o755),
        "lib/systemd/system/pi-agent.service": (UNIT.encode(), 0o644),
        "etc/pi-agent/pi-agent.conf": (CONFIG.encode(), 0o644),
        "usr/share/doc/pi-agent/README.md": (DOC.encode(), 0o644),
        "usr/share/doc/pi-agent/copyright": (COPYRIGHT.encode(), 0o644),
        "usr/share/doc/pi-agent/changelog.gz": (_changelog(), 0o644),
        "usr/share/lintian/overrides/pi-agent": (LINTIAN_OVERRIDES.encode(), 0o644),
        "DEBIAN/control": (CONTROL.encode(), 0o644),
        "DEBIAN/conffiles": (b"/etc/pi-agent/pi-agent.conf\n", 0o644),
        "DEBIAN/postinst": (POSTINST.encode(), 0o755),
        "DEBIAN/prerm": (PRERM.encode(), 0o755),
        "DEBIAN/postrm": (POSTRM.encode(), 0o755),
    }
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)


def _changelog() -> bytes:
    text = (f"pi-agent ({__version__}) unstable; urgency=medium\n\n"
            "  * Built by `fleet agent bundle` from the pifleet checkout.\n\n"
            f" -- {MAINTAINER}  Mon, 30 Nov 2026 00:00:00 +0000\n")
    return gzip.compress(text.encode(), mtime=0)
