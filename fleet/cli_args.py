"""The ``fleet`` command line: its options, subcommands and help (``build_parser``).

Every subcommand's ``--help`` has a description and an example, from one table
(``SUBCOMMANDS``); the commands themselves are in ``cli``.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, List

from . import state_cli
from .fleet import DEFAULT_CONCURRENCY
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
    common.add_argument("--concurrency", type=int, default=default(DEFAULT_CONCURRENCY),
                        help=f"requests in flight at once across the fleet (default {DEFAULT_CONCURRENCY})")
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
               "  fleet rollback camera_handlers.py --only raspi_main\n"
               "  fleet demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    device_parents = [common, targets]
    _subcommand(sub, "status", device_parents)
    _add_deploy_options(_subcommand(sub, "deploy", device_parents))
    p = _subcommand(sub, "rollback", device_parents)
    p.add_argument("file", help="handler file name, e.g. camera_handlers.py")
    p.add_argument("--backup", default=None, help="restore this named backup (see `fleet backups`) instead of the newest")
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
    return parser


USES_STATE = ("deploy",) + state_cli.COMMANDS  # the subcommands that read or write the state file

# Each subcommand: its line in `fleet --help`, what its own --help says, and an example.
SUBCOMMANDS = {
    "status": ("per-device status table (versions, drift, uptime)",
               "Ask every device for its status and print one table: the version of each handler file, drift "
               "from what most devices of the same type run, uptime, the last change; under it, why a device did "
               "not answer and what its agent found by itself (quarantined versions, files changed by hand).",
               "fleet status --tag cams"),
    "deploy": ("roll a handler file out in waves",
               "Roll a handler file out: canary first, then batches; each wave is checked (push ok, commands "
               "live, optional verify) before the next, and the rollout halts past its failure limits.",
               "fleet deploy handlers/camera_handlers.py --tag cams --canary 1 --batch 25% --verify camera_status"),
    "rollback": ("roll a handler back to its previous version",
                 "Put one handler file back on each device: to the newest backup that differs from what runs "
                 "(skipping versions the agent took off by itself: rolled back by probation, or quarantined), or "
                 "to a named backup.",
                 "fleet rollback camera_handlers.py --only raspi_main"),
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
    "history": ("the rollouts fleet deploy ran, newest first",
                "List the rollouts `fleet deploy` ran from this state file, newest first: when, which file, version "
                "and release, how many devices answered and how, and the outcome (or that the controller stopped "
                "before the end).",
                "fleet history --limit 10"),
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
    """The waves, limits and checks of a rollout (``fleet deploy``)."""
    p.add_argument("file", help="handler file, e.g. handlers/camera_handlers.py")
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
    p.add_argument("--dry-run", action="store_true", help="run every check on every device; change nothing")
    p.add_argument("--no-probation", action="store_true",
                   help="do not let agents roll the new code back by themselves if it keeps failing at first")
    p.add_argument("-m", "--message", default=None,
                   help="what the release this deploy makes is for (default: 'fleet deploy FILE')")
    p.add_argument("--force", action="store_true",
                   help="push even to devices that quarantined this version (it killed or hung their agent "
                        "when loaded; `fleet status` lists quarantined versions)")
