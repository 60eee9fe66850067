"""A Mosquitto configuration for the fleet: TLS with the fleet CA, one identity per device, an access list.

``fleet broker config`` writes ``mosquitto.conf`` and ``acl`` into a folder
(``deploy/mosquitto/`` holds an example with every line explained). Each
client presents a certificate from the fleet CA, and its common name is its
user name at the broker (``use_identity_as_username``): a device's is its id,
so the access list can give each device its own topic tree and nothing else.
A device may read its requests and its desired release (and the shared file
contents), and write its replies, its status and its report; controllers,
named one by one from the CA's list, may read and write everything under
``pifleet/``. Revoked certificates are refused through the CA's CRL.

Retained messages (desired releases, file contents, status) are the fleet's
memory at the broker, so persistence is on: they survive a restart.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from agent.contract import (BLOB_TOPIC, DESIRED_TOPIC, REPLY_TOPIC, REPORTED_TOPIC, REQUEST_TOPIC, STATUS_TOPIC,
                            TOPIC_ROOT)

from .ca import FleetCA

DEFAULT_TLS_PORT = 8883
AUTOSAVE_SECONDS = 10  # retained changes reach the disk within this long even if the broker then crashes


@dataclass(frozen=True)
class BrokerFiles:
    cert: Path  # the broker's certificate, from `fleet ca issue-broker`
    key: Path
    ca: Path
    crl: Optional[Path] = None


def acl_text(controllers: Sequence[str]) -> str:
    """The access list: each device its own tree (``%u`` is the user name, the certificate's common name)."""
    own = f"{TOPIC_ROOT}/%u"
    lines = [
        "# pifleet access list (`fleet broker config`). A device's user name is its certificate's common name,",
        "# its device id: it reads its own requests and desired release, writes its own replies, status and report.",
        f"pattern read {own}/{REQUEST_TOPIC}",
        f"pattern read {own}/{DESIRED_TOPIC}",
        f"pattern write {own}/{REPLY_TOPIC}/#",
        f"pattern write {own}/{STATUS_TOPIC}",
        f"pattern write {own}/{REPORTED_TOPIC}",
        "# File contents, shared by every device (Mosquitto warns that this pattern names no %u: on purpose).",
        f"pattern read {TOPIC_ROOT}/{BLOB_TOPIC}/#",
        "",
        "# Controllers (`fleet ca issue-controller NAME`): everything under the fleet's tree.",
    ]
    for name in controllers:
        lines += [f"user {name}", f"topic readwrite {TOPIC_ROOT}/#", ""]
    return "\n".join(lines) + "\n"


def mosquitto_conf(files: BrokerFiles, folder: Path, *, host: str = "", port: int = DEFAULT_TLS_PORT,
                   plain_port: Optional[int] = None, run_as: Optional[str] = None,
                   persistence: Optional[Path] = None) -> str:
    """``mosquitto.conf`` for a broker whose ``acl`` lives in ``folder`` (and its retained messages in
    ``persistence``, by default there too)."""
    lines = [
        "# pifleet broker (`fleet broker config`): TLS with the fleet CA, one identity per device, an access list.",
        "per_listener_settings true",
        "persistence true",
        f"persistence_location {persistence or folder}/",
        f"autosave_interval {AUTOSAVE_SECONDS}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        # A controller gets a reply from every device of a send_all: let them queue and flow, not drop.
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    lines += [
        "",
        "# Devices and controllers: mutual TLS, the certificate's common name as the user name.",
        f"listener {port} {host}".rstrip(),
        f"cafile {files.ca}",
        f"certfile {files.cert}",
        f"keyfile {files.key}",
        *([f"crlfile {files.crl}"] if files.crl else []),
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {folder / 'acl'}",
    ]
    if plain_port is not None:
        lines += [
            "",
            "# Plain MQTT on loopback only, without identities: for a controller or agents on this machine.",
            f"listener {plain_port} 127.0.0.1",
            "allow_anonymous true",
        ]
    return "\n".join(lines) + "\n"


def write_config(ca: FleetCA, files: BrokerFiles, folder: Path, *, installed_at: Optional[Path] = None,
                 **options: object) -> List[Path]:
    """Write the broker's folder: ``mosquitto.conf``, ``acl`` (controllers: the CA's live controller
    certificates), and the TLS files it names. ``installed_at``: where the folder will be on the broker's
    machine (default: where it is written), which the configuration's paths name."""
    folder.mkdir(parents=True, exist_ok=True)
    home = installed_at or folder
    written = []
    for source, name, mode in ((files.cert, "broker.crt", 0o644), (files.key, "broker.key", 0o600),
                               (files.ca, "ca.crt", 0o644), (files.crl, "crl.pem", 0o644)):
        if source is not None:
            target = folder / name
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
            target.chmod(mode)
            written.append(target)
    there = BrokerFiles(home / "broker.crt", home / "broker.key", home / "ca.crt",
                        home / "crl.pem" if files.crl is not None else None)
    controllers = sorted({e["name"] for e in ca.issued() if e["kind"] == "controller" and not e["revoked"]})
    acl = folder / "acl"
    acl.write_text(acl_text(controllers), encoding="utf-8")
    conf = folder / "mosquitto.conf"
    conf.write_text(mosquitto_conf(there, home, **options), encoding="utf-8")  # type: ignore[arg-type]
    return [conf, acl, *written]
