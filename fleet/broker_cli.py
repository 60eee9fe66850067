"""``fleet broker config``: write a Mosquitto configuration for the fleet (``fleet/broker_config.py``)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List

from .broker_config import DEFAULT_TLS_PORT, BrokerFiles, write_config
from .ca import FleetCA
from .ca_cli import add_ca_dir, ca_folder
from .errors import ConfigError
from .text import lines

Emit = Callable[[Dict[str, Any], str], None]


def add_commands(sub: Any, make: Any, parents: List[argparse.ArgumentParser]) -> None:
    broker = make(sub, "broker")
    add_ca_dir(broker)
    actions = broker.add_subparsers(dest="action", metavar="ACTION", required=True)
    config = actions.add_parser(
        "config", parents=parents, help="write mosquitto.conf and its access list",
        description=textwrap.fill(
            "Write mosquitto.conf and acl into a folder: TLS with the fleet CA, each client's certificate name as "
            "its user name, each device limited to its own topics, the CA's controllers to all of pifleet/, "
            "persistence for the desired releases. Run it again after `fleet ca issue-controller` and reload "
            "Mosquitto (systemctl reload mosquitto).", 79),
        epilog="Example:\n  fleet ca issue-broker broker.example.com\n"
               "  fleet broker config --cert .pifleet/ca/issued/broker.example.com/broker.crt --out broker/ "
               "--installed-at /etc/mosquitto/pifleet --persistence /var/lib/mosquitto",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_argument("--out", required=True, metavar="DIR",
                        help="where to write mosquitto.conf, acl and the TLS files they name")
    config.add_argument("--installed-at", default=None, metavar="DIR",
                        help="where that folder will be on the broker's machine, e.g. /etc/mosquitto/pifleet "
                             "(default: --out): the configuration names its files there")
    config.add_argument("--cert", required=True, metavar="FILE",
                        help="the broker's certificate from `fleet ca issue-broker` (its key beside it, broker.key)")
    config.add_argument("--port", type=int, default=DEFAULT_TLS_PORT, help=f"TLS port (default {DEFAULT_TLS_PORT})")
    config.add_argument("--host", default="", help="address to listen on (default: all)")
    config.add_argument("--plain-port", type=int, default=None,
                        help="also listen without TLS on 127.0.0.1, for a controller or agents on the broker's machine")
    config.add_argument("--persistence", default=None, metavar="DIR",
                        help="where Mosquitto keeps retained messages (default: --out; /var/lib/mosquitto on Debian)")
    config.add_argument("--user", default=None, help="the user Mosquitto runs as when started as root (default: "
                                                     "Mosquitto's own, mosquitto; it must be able to read the key)")


def run(args: argparse.Namespace, emit: Emit) -> int:
    ca = FleetCA(ca_folder(args))
    if not ca.exists:
        raise ConfigError(f"no fleet CA in {ca.folder}: `fleet ca init` first (or give --ca-dir)")
    cert = Path(args.cert).resolve()
    key = cert.with_name("broker.key")
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"{path} not found: `fleet ca issue-broker HOST` writes broker.crt and broker.key")
    out = Path(args.out).resolve()
    written = write_config(ca, BrokerFiles(cert, key, ca.cert_path.resolve(), ca.crl_path.resolve()), out,
                           installed_at=Path(args.installed_at) if args.installed_at else None,
                           host=args.host, port=args.port, plain_port=args.plain_port, run_as=args.user,
                           persistence=Path(args.persistence).resolve() if args.persistence else None)
    home = Path(args.installed_at) if args.installed_at else out
    emit({"written": [str(p) for p in written]}, lines([
        f"wrote {', '.join(p.name for p in written)} in {out}",
        f"on the broker's machine, with the folder at {home}: mosquitto -c {home / 'mosquitto.conf'} (Debian: "
        "deploy/mosquitto/mosquitto.service.d); broker.key must be readable by the user Mosquitto runs as"]))
    return 0
