"""``fleet``: roll handler code out to a fleet of pi-agents, and look after it.

Exit codes: 0 all good, 1 some device failed or a rollout halted, 2 usage or
configuration error. ``--json`` prints one machine-readable document on
stdout instead of tables; progress lines go to stderr either way. Tokens are
never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import state_cli, tables
from .errors import ConfigError
from .fleet import DEFAULT_CONCURRENCY, Fleet
from .inventory import Inventory, load_inventory
from .state import STATE_ENV, StateStore, state_path
from .text import lines, visible
from .results import DeviceResult, Status, short
from .rollout import RolloutPlan, deploy, read_handler

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
REPO_DEVICES = Path(__file__).resolve().parent.parent / "devices.json"
DEVICES_ENV = "FLEET_DEVICES"


def default_devices() -> str:
    """``$FLEET_DEVICES``, else ./devices.json, else the project's own (local agents on 127.0.0.1)."""
    if os.environ.get(DEVICES_ENV):
        return os.environ[DEVICES_ENV]
    return "devices.json" if Path("devices.json").exists() else str(REPO_DEVICES)


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


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def verify_options(text: Optional[str]) -> Dict[str, Any]:
    """``--verify 'greet name=x'``: the command and its arguments, the same syntax as ``fleet send``."""
    if not text:
        return {"verify": None}
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--verify {text!r}: {exc}") from None
    if not words:
        raise ConfigError("--verify needs a command, e.g. --verify camera_status")
    return {"verify": words[0], "verify_args": parse_pairs(words[1:])}


def parse_pairs(pairs: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {pair!r} must be KEY=VALUE, e.g. duration=30")
        out[key] = parse_value(value)
    return out


class Output:
    """Where results go: progress to stderr as they arrive, then tables or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.done = 0

    def progress(self, total: int) -> Callable[[DeviceResult], None]:
        self.done = 0

        def report(result: DeviceResult) -> None:
            self.done += 1
            print(tables.progress_line(result, self.done, total), file=sys.stderr, flush=True)

        return report

    def emit(self, document: Any, text: str) -> None:
        if self.as_json:
            json.dump(document, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            print(text)


def select(inventory: Inventory, args: argparse.Namespace) -> List[str]:
    only = [s.strip() for s in args.only.split(",") if s.strip()] if getattr(args, "only", None) else None
    return [d.id for d in inventory.select(only, getattr(args, "tag", None))]


def exit_code(results: Sequence[DeviceResult]) -> int:
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


async def cmd_status(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    statuses, last = await fleet.status(ids, timeout=args.timeout)
    reachable = [i for i in ids if statuses[i].status is Status.OK]
    devices = [inventory.get(i) for i in ids]
    out.emit(tables.status_document(devices, statuses, last), tables.status_table(devices, statuses, last))
    return EXIT_OK if len(reachable) == len(ids) else EXIT_FAILED


async def cmd_deploy(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    if args.dry_run:  # a dry run changes nothing, the controller's records included
        return await roll_out(fleet, ids, args, out, None)
    with StateStore(args.state_file) as store:
        return await roll_out(fleet, ids, args, out, store)


async def roll_out(fleet: Fleet, ids: List[str], args: argparse.Namespace, out: Output,
                   store: Optional[StateStore]) -> int:
    """The rollout, recorded in ``store`` as it goes: its release, then each device's result, then the outcome."""
    filename, code = read_handler(Path(args.file))
    release = None
    if store is not None:
        release, _ = store.record_release({filename: code.encode("utf-8")}, author=state_cli.author(),
                                          message=args.message or f"fleet deploy {filename}")
    plan = RolloutPlan(canary=args.canary, batch=args.batch, max_failures=args.max_failures,
                       max_unreachable=args.max_unreachable, **verify_options(args.verify),
                       rollback_on_failure=args.rollback_on_failure, dry_run=args.dry_run,
                       probation=not args.no_probation, force=args.force, timeout=args.timeout,
                       release=release.number if release else None)
    print(f"rolling out {filename}{f' (release {release.number})' if release else ''} to {len(ids)} device(s): "
          f"canary {plan.canary}, batch {plan.batch}, "
          f"max failures {plan.max_failures}{', verify ' + plan.verify if plan.verify else ''}"
          f"{', DRY RUN' if plan.dry_run else ''}", file=sys.stderr, flush=True)
    progress = out.progress(len(ids))
    rollout = store.start_rollout(file=filename, version=hashlib.sha256(code.encode("utf-8")).hexdigest(),
                                  release=release.number if release else None, plan=vars(plan),
                                  targets=len(ids)) if store is not None else None

    def on_result(result: DeviceResult) -> None:
        if store is not None and rollout is not None:  # kept as it arrives, before its line: a kill loses none
            store.record_result(rollout, result.device_id, result.status.value, old_version=result.old_version,
                                new_version=result.new_version, detail=result.error or result.note)
        progress(result)

    report = await deploy(fleet, args.file, ids, plan, on_result=on_result)
    if store is not None and rollout is not None:
        store.finish_rollout(rollout, f"halted: {report.halt_reason}" if report.halted else report.tally())
    summary = lines([f"HALTED: {report.halt_reason}"] * report.halted
                    + [f"{report.filename} version {short(report.version)}: {report.tally()} in {report.seconds:.1f}s"])
    out.emit({**report.as_dict(), "release": release.number if release else None},
             tables.rollout_table(list(report.results.values())) + "\n\n" + summary)
    return EXIT_OK if report.ok else EXIT_FAILED


async def report_each(fleet: Fleet, command: Dict[str, Any], ids: List[str], args: argparse.Namespace, out: Output,
                      summarise: Optional[Callable[[Dict[str, Any]], str]] = None, progress: bool = False) -> int:
    """Send one command to every target, print a row per device (or the JSON document), return the exit code."""
    results = await fleet.send_all(command, ids, timeout=args.timeout,
                                   on_result=out.progress(len(ids)) if progress else None)
    ordered = list(results.values())  # send_all keeps the order of ids
    devices = [r.as_dict() for r in ordered]
    # "devices", as in deploy and status; "results" is the old name, kept for one release (README)
    out.emit({"devices": devices, "results": devices}, tables.reply_table(ordered, summarise))
    return exit_code(ordered)


async def cmd_rollback(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    command: Dict[str, Any] = {"command": "rollback_handler", "filename": args.file}
    if args.backup:
        command["backup"] = args.backup
    return await report_each(fleet, command, ids, args, out, progress=True)


async def cmd_send(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    command = {**parse_pairs(args.args), "command": args.name}
    if args.device == "all":
        return await report_each(fleet, command, ids, args, out)
    inventory.get(args.device)
    if out.as_json:
        return await report_each(fleet, command, [args.device], args, out)
    result = (await fleet.send_all(command, [args.device], timeout=args.timeout))[args.device]
    if result.reply:  # the device's own words, whatever they say
        print(json.dumps(result.reply, indent=2))
    if not result.ok:
        print(visible(f"{args.device}: {result.status.value}: {result.error}"), file=sys.stderr)
    return exit_code([result])


async def cmd_commands(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    return await report_each(fleet, {"command": "list_commands"}, ids, args, out,
                             lambda reply: ", ".join(sorted(reply.get("handlers", {}))) or "(built-ins only)")


async def cmd_backups(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    def summary(reply: Dict[str, Any]) -> str:
        backups = [f"{b['backup']} ({short(b.get('sha256'))})" for b in reply.get("backups", [])]
        return tables.some(backups, shown=3) if backups else "(none)"

    return await report_each(fleet, {"command": "list_backups", "filename": args.file}, ids, args, out, summary)


async def cmd_log(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")

    def summary(reply: Dict[str, Any]) -> str:
        return "; ".join(f"{e.get('action')} {e.get('file')} {short(e.get('version'))} {tables.ago(e.get('time'))}"
                         for e in reply.get("entries", [])) or "(no changes yet)"

    return await report_each(fleet, {"command": "update_log", "limit": args.limit}, ids, args, out, summary)


COMMANDS = {
    "status": cmd_status, "deploy": cmd_deploy, "rollback": cmd_rollback, "send": cmd_send,
    "commands": cmd_commands, "backups": cmd_backups, "log": cmd_log,
}


async def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        return await run_demo(agents=args.agents, as_json=args.json)
    path = Path(args.devices or default_devices())
    inventory = load_inventory(path)
    # Say which files: without ./devices.json the project's sample (local agents) is used, and must not be a surprise.
    sample = " (the project's sample: local agents on 127.0.0.1)" if path.resolve() == REPO_DEVICES.resolve() else ""
    used = f"fleet: inventory {path}{sample}, {len(inventory.devices)} device(s)"
    args.state_file = state_path(args.state, path, os.environ)
    if args.command in USES_STATE and not getattr(args, "dry_run", False):
        used += f"; state {args.state_file}"
    print(visible(used), file=sys.stderr)
    if args.command in state_cli.COMMANDS:
        with StateStore(args.state_file) as store:
            return state_cli.run(args, store)
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    ids = select(inventory, args)
    fleet = Fleet.from_inventory(inventory, concurrency=args.concurrency)
    try:
        return await COMMANDS[args.command](fleet, inventory, ids, args, Output(args.json))
    finally:
        await fleet.close()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        print(visible(f"fleet: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        if args.command in ("deploy", "rollback"):
            print("fleet: the lines above are the devices that finished; a change already sent may still complete "
                  "on its device. Run `fleet status` to see what each device runs now.", file=sys.stderr)
        return 130
