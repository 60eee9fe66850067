"""The ``fleet`` command line: its options, subcommands and help (``build_parser``).

Every subcommand's ``--help`` has a description and an example, from one table
(``SUBCOMMANDS``); the commands themselves are in ``cli``.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, List

from agent import __version__

from . import agent_cli, broker_cli, ca_cli, keys_cli, provision_cli, state_cli
from .fleet import DEFAULT_BROKER_CONCURRENCY, DEFAULT_CONCURRENCY
from .state import STATE_ENV

DEVICES_ENV = "FLEET_DEVICES"


def _common_options(after_subcommand: bool) -> argparse.ArgumentParser:
    """Options every subcommand takes, before or after its name.

    Two copies, because argparse shares Action objects between parents: after
    the subcommand they default to SUPPRESS so they never overwrite a value
    given before it.
    """
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_subcommand else value

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-d", "--devices", default=default(None),
                        help=f"inventory file (default ${DEVICES_ENV}, ./devices.json, or the project's own)")
    common.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON document instead of tables")
    common.add_argument("--timeout", type=float, default=default(None),
                        help="seconds to wait for each reply (default: the inventory's, 30)")
    common.add_argument("--concurrency", type=int, default=default(None),
                        help=f"requests in flight at once across the fleet (default {DEFAULT_CONCURRENCY}; "
                             f"{DEFAULT_BROKER_CONCURRENCY} with devices behind a broker)")
    common.add_argument("-v", "--verbose", action="store_true", default=default(False), help="log connection details")
    common.add_argument("--state", default=default(None), metavar="PATH",
                        help=f"the controller's state file (default ${STATE_ENV}, or .pifleet/state.db beside the "
                             "inventory)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(after_subcommand=True)

    targets = argparse.ArgumentParser(add_help=False)
    targets.add_argument("--only", default=None, metavar="ID,ID", help="only these device ids")
    targets.add_argument("--tag", action="append", default=None, metavar="TAG",
                         help="only devices with this tag (repeatable: any of them)")

    parser = argparse.ArgumentParser(
        prog="fleet", parents=[_common_options(after_subcommand=False)],
        description="Push handler code to a fleet of Raspberry Pis running pi-agent, in waves, with checks and rollback.",
        epilog="Examples:\n"
               "  fleet status\n"
               "  fleet deploy handlers/camera_handlers.py --tag cams --canary 1 --batch 25% --verify camera_status\n"
               "  fleet send raspi_main start_recording duration=30 filename=race.h264\n"
               "  fleet converge --watch\n"
               "  fleet rollback --to-release 3\n"
               "  fleet demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    device_parents = [common, targets]
    _subcommand(sub, "status", device_parents).add_argument(
        "--wide", action="store_true", help="a column per handler file with its version, and each device's address")
    _add_deploy_options(_subcommand(sub, "deploy", device_parents))
    p = _subcommand(sub, "converge", device_parents)
    _add_plan_options(p)
    p.add_argument("--watch", action="store_true",
                   help="keep running: converge each device as it comes back online, and each one whose desired "
                        "release changes; stop with SIGTERM or Ctrl-C")
    p.add_argument("--retry-every", type=float, default=1.0, metavar="SECONDS",
                   help="with --watch: how often to try each offline device again (default 1)")
    p = _subcommand(sub, "rollback", device_parents)
    p.add_argument("file", nargs="?", default=None, help="handler file name, e.g. camera_handlers.py: put this one "
                                                         "file back on each device (an emergency)")
    p.add_argument("--to-release", type=int, default=None, metavar="N",
                   help="put every target on exactly release N's versions (sets their desired release; in waves, "
                        "with the options below)")
    p.add_argument("--backup", default=None, help="restore this named backup (see `fleet backups`) instead of the newest")
    _add_plan_options(p)
    p = _subcommand(sub, "send", device_parents)
    p.add_argument("device", help="a device id, or 'all' (narrow with --tag/--only)")
    p.add_argument("name", metavar="COMMAND", help="command name, e.g. camera_status")
    p.add_argument("args", nargs="*", default=[], metavar="KEY=VALUE")  # a default: or argparse calls it required
    _subcommand(sub, "commands", device_parents)
    _subcommand(sub, "backups", device_parents).add_argument("file", help="handler file name, e.g. camera_handlers.py")
    _subcommand(sub, "log", device_parents).add_argument("--limit", type=int, default=5,
                                                         help="entries per device (default 5)")
    _subcommand(sub, "demo", [common]).add_argument("--agents", type=int, default=4,
                                                    help="local agents to start (default 4, at least 3)")
    state_cli.add_commands(sub, lambda sub, name: _subcommand(sub, name, [common]), [common])
    ca_cli.add_commands(sub, lambda sub, name: _subcommand(sub, name, [common]), [common])
    keys_cli.add_commands(sub, lambda sub, name: _subcommand(sub, name, [common]), [common])
    broker_cli.add_commands(sub, lambda sub, name: _subcommand(sub, name, [common]), [common])
    agent_cli.add_commands(sub, lambda sub, name: _subcommand(sub, name, [common]), [common], device_parents,
                           _add_plan_options)
    provision_cli.add_options(_subcommand(sub, "provision", [common]))
    return parser


USES_STATE = ("status", "deploy", "converge", "rollback", "ca", "keys", "provision", "broker") + state_cli.COMMANDS  # the subcommands that read or write the state file

# Each subcommand: its line in `fleet --help`, what its own --help says, and an example.
SUBCOMMANDS = {
    "status": ("where each device stands: its release, state, agent, uptime",
               "Ask every device for its status and print one table: its desired release, the release it reports, "
               "where it stands (current, behind, ahead, diverged, unreachable), its agent, uptime, handler files "
               "and commands, the last change; under it, drift from what most devices of the same type run, why a "
               "device did not answer and what its agent found by itself. --wide adds each file's version.",
               "fleet status --tag cams --wide"),
    "deploy": ("roll handler files out in waves (a new release)",
               "Roll handler files out: each target's desired release with these files laid over it becomes a new "
               "release (or an identical old one), and each wave's devices get it as their desired release just "
               "before the wave is pushed. Canary first, then batches; each wave is checked (push ok, commands "
               "live, optional verify) before the next, and the rollout halts past its failure limits.",
               "fleet deploy handlers/camera_handlers.py --tag cams --canary 1 --batch 25% --verify camera_status"),
    "converge": ("bring every device to its desired release",
                 "Bring each reachable device that is not on its desired release to it (up or back down), in "
                 "waves with the same checks and limits as a deploy; finish rollouts whose controller was stopped "
                 "first. Devices already on their release are not pushed to. --watch keeps running and converges "
                 "each device as it comes back online.",
                 "fleet converge --watch"),
    "rollback": ("put the fleet back on a release, or one file back",
                 "--to-release N puts every target on exactly release N's versions, whatever each ran before, in "
                 "waves, and makes N their desired release (offline devices get it from `fleet converge` when "
                 "they return). With a FILE instead, put that one file back on each device (an emergency): to the "
                 "newest backup that differs from what runs, or to a named backup; the table says which version "
                 "each device ended on.",
                 "fleet rollback --to-release 3"),
    "send": ("send one command to a device, or to all",
             "Send one command. Arguments are key=value; values are parsed as JSON where they parse "
             "(duration=30 is a number, filename=x.h264 a string).",
             "fleet send raspi_main start_recording duration=30 filename=race.h264"),
    "commands": ("the commands each device offers",
                 "List the commands each device offers: the agent's own and those of its handler modules.",
                 "fleet commands --only raspi_main"),
    "backups": ("backups of a handler file on each device",
                "List the backups of one handler file on each device, newest first (names to give "
                "`fleet rollback --backup`).",
                "fleet backups camera_handlers.py"),
    "log": ("recent deploys, rollbacks and deletes on each device",
            "Show each device's update log: deploys, rollbacks, deletes, restores and quarantines, newest first.",
            "fleet log --limit 10"),
    "release": ("make a release, or show one (create, show)",
                "Releases are immutable, numbered sets of handler files, kept in the controller's state file.",
                "fleet release create handlers/camera_handlers.py -m 'finish-line camera'"),
    "releases": ("list the releases, newest first",
                 "List the releases in the controller's state file, newest first: number, when, who, files, message.",
                 "fleet releases --limit 5"),
    "history": ("the rollouts run from this state file, newest first",
                "List the rollouts (deploy, converge, rollback) run from this state file, newest first: when, which "
                "files and release, how many devices answered and how, and the outcome (or that the controller "
                "stopped before the end: `fleet converge` finishes it).",
                "fleet history --limit 10"),
    "ca": ("the fleet's certificate authority (init, issue, issue-controller, issue-broker, revoke, list)",
           "Mutual TLS for the wire: one CA for the fleet, a certificate per device (its id in it) and per "
           "controller, and a revocation list the agents re-read. Its folder is --ca-dir, or ca/ beside the "
           "state file.",
           "fleet ca issue raspi_main"),
    "broker": ("an MQTT broker for devices behind NAT (config)",
               "Devices that the controller cannot reach connect out to an MQTT broker (Mosquitto) and wait for "
               "their release there. This writes the broker's configuration from the fleet CA.",
               "fleet broker config --cert .pifleet/ca/issued/broker.example.com/broker.crt --out broker/"),
    "keys": ("release-signing keys (init)",
             "Signed releases: deploys sign each file's name and sha256 with an Ed25519 key, and agents started "
             "with --trusted-keys run only code a trusted key signed.",
             "fleet keys init"),
    "agent": ("the agent itself: bundle (.pyz and .deb), upgrade (in waves)",
              "Build what a Pi needs to run the agent, from this installation (one .pyz file and a Debian "
              "package, both with the agent only), or upgrade the agents of the fleet over the network.",
              "fleet agent bundle --out dist/"),
    "provision": ("add a new device, and write what its Pi needs",
                  "Add a device to the inventory (its formatting and order kept) with a new random token of its "
                  "own, and write a folder for its Pi: the token, install.sh, and with a fleet CA its "
                  "certificate and key. Copy the folder and the agent's .deb to the Pi and run install.sh.",
                  "fleet provision raspi_pit --host 192.168.1.104 --type camera --tag cams"),
    "demo": ("start local agents and roll the camera handler out to them",
             "Start local agents on 127.0.0.1 in a temporary folder and run the main job against them: a rollout "
             "in waves with an offline device and one that refuses, recordings, status, rollback.",
             "fleet demo --agents 5"),
}


def _subcommand(sub: Any, name: str, parents: List[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    line, description, example = SUBCOMMANDS[name]
    return sub.add_parser(name, parents=parents, help=line, description=textwrap.fill(description, 79),
                          epilog=f"Example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_deploy_options(p: argparse.ArgumentParser) -> None:
    """``fleet deploy``: the files, and the waves, limits and checks of its rollout."""
    p.add_argument("files", nargs="+", metavar="FILE", help="handler files, e.g. handlers/camera_handlers.py")
    _add_plan_options(p)
    p.add_argument("--dry-run", action="store_true", help="run every check on every device; change nothing")
    p.add_argument("-m", "--message", default=None,
                   help="what the release this deploy makes is for (default: 'fleet deploy FILE...')")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    """The waves, limits and checks of a rollout (deploy, converge, rollback --to-release)."""
    p.add_argument("--canary", type=int, default=1, help="devices in the first wave (default 1; 0 for none)")
    p.add_argument("--batch", default="25%", help="devices per later wave: a number or a percentage (default 25%%)")
    p.add_argument("--max-failures", default="0",
                   help="failed devices tolerated over the whole rollout before it halts: number or %% (default 0)")
    p.add_argument("--max-unreachable", default=None,
                   help="unreachable devices tolerated before it halts: number or %% (default: no limit)")
    p.add_argument("--verify", default=None, metavar="'COMMAND [KEY=VALUE ...]'",
                   help="command that must succeed on each device after its push, with arguments as for "
                        "`fleet send` (quote it: --verify 'greet name=x')")
    p.add_argument("--rollback-on-failure", action="store_true",
                   help="when the rollout halts, put every device it changed back to its previous version")
    p.add_argument("--no-probation", action="store_true",
                   help="do not let agents roll the new code back by themselves if it keeps failing at first")
    p.add_argument("--sign-key", default=None, metavar="PATH",
                   help="sign the pushed files with this release key (default $PIFLEET_SIGN_KEY, or keys/release.key "
                        "beside the state file if it exists; without one, pushes go unsigned)")
    p.add_argument("--force", action="store_true",
                   help="push even to devices that quarantined this version (it killed or hung their agent "
                        "when loaded; `fleet status` lists quarantined versions)")
