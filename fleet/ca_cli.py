"""``fleet ca``: the fleet's certificate authority from the command line (init, issue, issue-controller, revoke, list).

The CA's folder is ``--ca-dir``, or ``ca/`` beside the state file
(``.pifleet/ca/``). Each command says what it wrote and what to do with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List

from .ca import CA_DAYS, DEVICE_DAYS, FleetCA
from .text import grid, lines

Emit = Callable[[Dict[str, Any], str], None]


def add_commands(sub: Any, make: Any, parents: List[argparse.ArgumentParser]) -> None:
    """``fleet ca ACTION``: ``make(sub, name)`` builds the subcommand, ``parents`` are the common options."""
    ca = make(sub, "ca")
    add_ca_dir(ca)
    actions = ca.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=parents, help=help_text, description=help_text + ".",
                                  epilog=f"Example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)

    init = action("init", "make the fleet's CA: its key (mode 0600) and certificate, and an empty revocation list",
                  "fleet ca init")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"the CA certificate's life (default {CA_DAYS})")
    issue = action("issue", "a key and certificate for a device, with the CA certificate: the three files its "
                            "agent's --tls-* options name", "fleet ca issue raspi_main")
    issue.add_argument("device", metavar="DEVICE_ID", help="the device id, as in devices.json")
    controller = action("issue-controller", "a key and certificate for a controller (a laptop, CI, the converge "
                                            "service)", "fleet ca issue-controller ci")
    controller.add_argument("name", metavar="NAME", nargs="?", default="controller",
                            help="a name for this controller (default: controller)")
    broker = action("issue-broker", "a key and certificate for the MQTT broker (Mosquitto), valid for the names and "
                                    "addresses devices and controllers dial", "fleet ca issue-broker broker.example.com")
    broker.add_argument("hosts", metavar="HOST", nargs="+", help="a DNS name or IP address of the broker")
    for parser in (issue, controller, broker):
        parser.add_argument("--out", default=None, metavar="DIR", help="where to write them (default: under the "
                                                                       "CA's folder, issued/NAME/)")
        parser.add_argument("--days", type=int, default=DEVICE_DAYS, help=f"its life (default {DEVICE_DAYS})")
    revoke = action("revoke", "revoke every certificate of a device or controller: a lost Pi, a stolen laptop",
                    "fleet ca revoke raspi_pit")
    revoke.add_argument("name", metavar="NAME", help="a device id or a controller's name")
    action("list", "what this CA issued: names, kinds, serials, expiry, revoked or not", "fleet ca list")


def add_ca_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-dir", default=None, metavar="DIR",
                        help="the fleet CA's folder (default: ca/ beside the state file, .pifleet/ca/)")


def ca_folder(args: argparse.Namespace) -> Path:
    """``--ca-dir``, or ``ca/`` beside the state file."""
    return Path(args.ca_dir) if args.ca_dir else args.state_file.parent / "ca"


def run(args: argparse.Namespace, emit: Emit) -> int:
    folder = ca_folder(args)
    ca = FleetCA(folder)
    if args.action == "init":
        ca.init(days=args.days)
        emit({"ca_dir": str(folder), "ca": str(ca.cert_path), "crl": str(ca.crl_path)}, lines([
            f"made the fleet CA in {folder}: {ca.cert_path.name} (give it to every agent and controller), "
            f"{ca.key_path.name} (mode 0600: keep it here, or offline), {ca.crl_path.name} (revoked: none yet)",
            "next: `fleet ca issue DEVICE_ID` for each Pi, `fleet ca issue-controller` for this machine"]))
    elif args.action == "issue-broker":
        name = args.hosts[0]
        out = Path(args.out) if args.out else folder / "issued" / name
        issued = ca.issue(name, out, days=args.days, kind="broker", hosts=args.hosts)
        emit({"name": name, "cert": str(issued.cert), "key": str(issued.key), "ca": str(issued.ca),
              "serial": str(issued.serial)}, lines([
                  f"wrote {issued.cert}, {issued.key} (mode 0600) and {issued.ca}",
                  "`fleet broker config` writes a Mosquitto configuration that uses them (README: 'Devices behind "
                  "NAT')"]))
    elif args.action in ("issue", "issue-controller"):
        device = args.action == "issue"
        name = args.device if device else args.name
        out = Path(args.out) if args.out else folder / "issued" / name
        issued = ca.issue(name, out, days=args.days, kind="device" if device else "controller")
        document = {"name": name, "cert": str(issued.cert), "key": str(issued.key), "ca": str(issued.ca),
                    "serial": str(issued.serial)}
        emit(document, lines([f"wrote {issued.cert}, {issued.key} (mode 0600) and {issued.ca}"
                              + (", and crl.pem" if device else "")] + (
            [f"copy them to the Pi (README: 'A secure wire') and start pi-agent with --tls-cert {issued.cert.name} "
             f"--tls-key {issued.key.name} --tls-ca {issued.ca.name} --tls-crl crl.pem",
             f"in devices.json, give {name} \"tls\": true (with ca, cert and key: see `fleet ca issue-controller`)"]
            if device else
            [f"in devices.json \"defaults\": \"tls\": true, \"ca\": \"{issued.ca}\", \"cert\": \"{issued.cert}\", "
             f"\"key\": \"{issued.key}\""])))
    elif args.action == "revoke":
        serials = ca.revoke(args.name)
        emit({"name": args.name, "revoked": [str(s) for s in serials], "crl": str(ca.crl_path)}, lines([
            f"revoked {len(serials)} certificate(s) of {args.name}; {ca.crl_path} lists them",
            "copy crl.pem to every agent's --tls-crl file: each agent re-reads it at the next connection"]))
    else:
        entries = ca.issued()
        emit({"issued": entries}, grid([[e["name"], e["kind"], e["serial"][:12], e["not_after"][:10],
                                         "revoked" if e["revoked"] else "live"] for e in entries],
                                       ["name", "kind", "serial", "expires", "state"]) if entries
             else "nothing issued yet: `fleet ca issue DEVICE_ID`")
    return 0
