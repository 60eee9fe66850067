"""``fleet provision DEVICE_ID --host HOST``: the command line face of ``fleet/provision.py``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict

from .errors import ConfigError
from .provision import provision
from .text import lines

Emit = Callable[[Dict[str, Any], str], None]


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", metavar="DEVICE_ID", help="the new device's id (letters, digits, '_', '.', '-')")
    p.add_argument("--host", default=None, help="its address on the network, as the controller reaches it")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="instead of --host, for a device behind NAT: the MQTT broker it connects out to "
                        "(mqtts://HOST:8883; README: 'Devices behind NAT')")
    p.add_argument("--port", type=int, default=3000, help="its agent's port (default 3000)")
    p.add_argument("--name", default=None, help="a name for people (default: the id)")
    p.add_argument("--type", default=None, help="its kind, e.g. camera (drift is judged among devices of a type)")
    p.add_argument("--tag", action="append", default=None, help="a tag (repeatable)")
    p.add_argument("--out", default="provisioned", metavar="DIR",
                   help="where to write the device's folder (default provisioned/)")
    p.add_argument("--tarball", action="store_true", help="also pack the folder as DEVICE_ID.tar.gz")
    p.add_argument("--shared-token", action="store_true",
                   help="give it the fleet's token from $PI_AGENT_TOKEN instead of a new one of its own "
                        "(one stolen card then opens every device that shares it)")


def run(args: argparse.Namespace, inventory: Path, emit: Emit) -> int:
    if (args.host is None) == (args.broker is None):
        raise ConfigError("give --host (the controller connects to the device) or --broker URL (the device connects "
                          "out to that MQTT broker), one of them")
    entry: Dict[str, Any] = ({"id": args.device, "host": args.host, "port": args.port} if args.broker is None else
                             {"id": args.device, "transport": "mqtt", "broker": args.broker})
    for field in ("name", "type"):
        if getattr(args, field):
            entry[field] = getattr(args, field)
    if args.tag:
        entry["tags"] = args.tag
    shared = None
    if args.shared_token:
        shared = os.environ.get("PI_AGENT_TOKEN")
        if not shared:
            raise ConfigError("--shared-token gives the device the fleet's token from $PI_AGENT_TOKEN, which is not set")
    made = provision(inventory, args.state_file.parent, entry, Path(args.out), shared_token=shared,
                     tarball=args.tarball)
    folder = Path(made["folder"])
    emit(made, lines([
        f"added {args.device} to {inventory}" + (f" (its token in {made['token_file']}, mode 0600)"
                                                 if made["token_file"] else " (it shares the fleet's token)"),
        f"wrote {folder}: {', '.join(made['files'])}" + (f"; and {made['tarball']}" if "tarball" in made else ""),
        f"on the Pi: copy {folder.name}/ and pi-agent_*_all.deb (`fleet agent bundle`) side by side, then "
        f"sudo sh {folder.name}/install.sh; `fleet status --only {args.device}` then shows it"]))
    return 0
