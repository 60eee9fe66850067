"""``fleet provision``: a new device in devices.json, and a folder with what that Pi needs.

The device's entry is added to the inventory without rewriting it: the new
entry goes in as text after the last one, in the style of the entries before
it, so the file keeps its formatting, order and comments-in-names. Its token
is new and random (``secrets``), one per device, written to
``.pifleet/tokens/DEVICE_ID`` (mode 0600) and named by the entry's
``token_file``; ``--shared-token`` gives it the fleet's token from the
environment instead. When the fleet uses TLS (a CA beside the state file), the
folder also holds the device's certificate, key, the CA certificate and the
revocation list. A device behind NAT (``--broker``) gets an entry with
``"transport": "mqtt"`` and agent options that connect it out to the broker,
its certificate as its identity there.

The folder (or ``--tarball``) goes on a USB stick with the agent's ``.deb``:
on the Pi, ``sudo sh install.sh`` puts the token (and TLS files) in place,
then installs the package.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from .ca import FleetCA
from .errors import ConfigError
from .inventory import parse_inventory

INSTALL = """#!/bin/sh
# Put this device's token{tls_words} in place, install the agent, and set its options: sudo sh install.sh
set -e
cd "$(dirname "$0")"
install -d -m 755 /etc/pi-agent
install -m 640 token /etc/pi-agent/token
{tls_steps}deb=$(ls ../pi-agent_*_all.deb pi-agent_*_all.deb 2>/dev/null | head -n 1)
if [ -z "$deb" ]; then echo "no pi-agent_*_all.deb next to this folder: copy it from 'fleet agent bundle'"; exit 1; fi
dpkg -i "$deb"
cat > /etc/pi-agent/pi-agent.conf <<'CONF'
# pi-agent's options (pi-agent --help), written by fleet provision for {device}. After a change:
#   sudo systemctl restart pi-agent
PI_AGENT_OPTIONS="{options}"
CONF
if [ -d /run/systemd/system ]; then
    systemctl restart pi-agent
    echo "pi-agent: running with this device's options (journalctl -u pi-agent)"
fi
"""

TLS_STEPS = """install -m 644 device.crt ca.crt /etc/pi-agent/
install -m 640 device.key /etc/pi-agent/device.key
install -d -m 750 /var/lib/pi-agent
install -m 644 crl.pem /var/lib/pi-agent/crl.pem
"""
TLS_OPTIONS = (" --tls-cert /etc/pi-agent/device.crt --tls-key /etc/pi-agent/device.key --tls-ca /etc/pi-agent/ca.crt"
               " --tls-crl /var/lib/pi-agent/crl.pem")


def provision(inventory: Path, state_dir: Path, entry: Dict[str, Any], out: Path, *, shared_token: Optional[str],
              tarball: bool) -> Dict[str, Any]:
    """Add ``entry`` to ``inventory`` and write the device's folder (or tarball) under ``out``; what was made."""
    device_id = entry["id"]
    text = inventory.read_text(encoding="utf-8")
    base = inventory.resolve().parent
    if device_id in {d.id for d in parse_inventory(json.loads(text), source=str(inventory), environ={},
                                                   base=base).devices}:
        raise ConfigError(f"{inventory}: there is a device {device_id!r} already")
    token = shared_token or secrets.token_urlsafe(32)
    folder = out / device_id
    if folder.exists():
        raise ConfigError(f"{folder} exists already: remove it, or give another --out")
    kept = state_dir / "tokens" / device_id
    if shared_token is None:
        entry = {**entry, "token_file": os.path.relpath(kept, base)}
    ca = FleetCA(state_dir / "ca")
    tls = ca.exists
    if "broker" in entry and entry["broker"].startswith("mqtts:") and not tls:
        raise ConfigError("over mqtts a device's certificate is its identity at the broker: `fleet ca init` first")
    new_text = add_entry(text, entry)  # checked whole before anything is written
    parse_inventory(json.loads(new_text), source=str(inventory), environ={}, base=base, check_files=False)
    folder.mkdir(parents=True)
    _write_secret(folder / "token", token)
    if shared_token is None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        _write_secret(kept, token)
    if tls:
        issued = ca.issue(device_id, folder)
        os.replace(issued.cert, folder / "device.crt")
        os.replace(issued.key, folder / "device.key")
    options = (f"--host 0.0.0.0 --port {entry.get('port', 3000)}" if "broker" not in entry else
               f"--no-listen --broker {entry['broker']} --device-id {device_id}")
    options += " --token-file /etc/pi-agent/token" + (TLS_OPTIONS if tls else "")
    install = INSTALL.format(tls_words=" and TLS files" if tls else "", tls_steps=TLS_STEPS if tls else "",
                             device=device_id, options=options)
    (folder / "install.sh").write_text(install)
    (folder / "install.sh").chmod(0o755)
    temporary = inventory.with_name(f".{inventory.name}.tmp")  # the inventory last: whole, or not at all
    temporary.write_text(new_text, encoding="utf-8")
    os.replace(temporary, inventory)
    made: Dict[str, Any] = {"device": device_id, "folder": str(folder), "tls": tls,
                            "token_file": entry.get("token_file"), "files": sorted(p.name for p in folder.iterdir())}
    if tarball:
        archive = out / f"{device_id}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=device_id)
        made["tarball"] = str(archive)
    return made


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")


def add_entry(text: str, entry: Dict[str, Any]) -> str:
    """``text`` (a devices.json) with ``entry`` added at the end of its device list, the rest untouched."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("raspberryPiDevices"), list):
        raise ConfigError("the inventory must be an object with a \"raspberryPiDevices\" list")
    key = re.search(r'"raspberryPiDevices"\s*:\s*\[', text)
    assert key is not None  # the list exists, so its key does
    decoder = json.JSONDecoder()
    position = key.end()
    starts: List[int] = []
    ends: List[int] = []
    for _ in data["raspberryPiDevices"]:
        position = _skip(text, position, ",")
        starts.append(position)
        _, position = decoder.raw_decode(text, position)
        ends.append(position)
    rendered = json.dumps(entry)
    if not ends:  # an empty list: the entry on a line of its own, indented one step more than the key
        indent = _indent_of(text, key.start())
        return text[:key.end()] + "\n" + indent + "  " + rendered + "\n" + indent + text[_skip(text, key.end(), ""):]
    last_start = starts[-1]
    previous = text[last_start:ends[-1]]
    if "\n" in previous:  # entries spread over lines: keep that style
        inner = _indent_of(text, last_start)
        rendered = json.dumps(entry, indent=2).replace("\n", "\n" + inner)
    separator = text[ends[-2]:starts[-1]] if len(starts) > 1 else ",\n" + _indent_of(text, last_start)
    if "," not in separator:
        separator = "," + separator
    return text[:ends[-1]] + separator + rendered + text[ends[-1]:]


def _skip(text: str, position: int, also: str) -> int:
    """The first position from ``position`` that is not whitespace (or one of ``also``)."""
    while position < len(text) and (text[position].isspace() or text[position] in also):
        position += 1
    return position


def _indent_of(text: str, position: int) -> str:
    line_start = text.rfind("\n", 0, position) + 1
    line = text[line_start:position]
    return line[:len(line) - len(line.lstrip())]
