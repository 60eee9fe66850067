"""``fleet``: roll handler code out to a fleet of pi-agents, and look after it.

Exit codes: 0 all good, 1 some device failed or a rollout halted, 2 usage or
configuration error. ``--json`` prints one machine-readable document on
stdout instead of tables; progress lines go to stderr either way. Tokens are
never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import agent_cli, broker_cli, ca_cli, cli_rollouts, keys_cli, provision_cli, state_cli, status_view, tables
from .cli_args import DEVICES_ENV, USES_STATE, build_parser
from .cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Output, exit_code, parse_pairs
from .errors import ConfigError
from .fleet import Fleet
from .inventory import Inventory, load_inventory
from .state import StateStore, state_path
from .text import visible
from .results import Status, short

REPO_DEVICES = Path(__file__).resolve().parent.parent / "devices.json"


def default_devices() -> str:
    """``$FLEET_DEVICES``, else ./devices.json, else the project's own (local agents on 127.0.0.1)."""
    if os.environ.get(DEVICES_ENV):
        return os.environ[DEVICES_ENV]
    return "devices.json" if Path("devices.json").exists() else str(REPO_DEVICES)


def select(inventory: Inventory, args: argparse.Namespace) -> List[str]:
    only = [s.strip() for s in args.only.split(",") if s.strip()] if getattr(args, "only", None) else None
    return [d.id for d in inventory.select(only, getattr(args, "tag", None))]


async def cmd_status(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    statuses, last = await fleet.status(ids, timeout=args.timeout)
    reachable = [i for i in ids if statuses[i].status is Status.OK]
    devices = [inventory.get(i) for i in ids]
    desired: Dict[str, int] = {}
    known, releases = {}, {}  # type: ignore[var-annotated]
    if args.state_file.exists():  # reading the state; a fleet that has none yet has no desired releases
        with StateStore(args.state_file) as store:
            desired = store.desired(ids)
            known, releases = store.release_index()
    reports = await fleet.last_reports([i for i in ids if i not in reachable])  # offline, behind a broker
    places = status_view.standings(devices, statuses, desired, known, releases, reports)
    out.emit(status_view.status_document(devices, statuses, last, places, reports),
             status_view.status_table(devices, statuses, last, places, wide=args.wide, reports=reports))
    return EXIT_OK if len(reachable) == len(ids) else EXIT_FAILED


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
    """``--to-release N``: the whole fleet to release N (recorded, in waves). ``FILE``: one file on each device."""
    if (args.file is None) == (args.to_release is None):
        raise ConfigError("give a handler file (one file's emergency rollback) or --to-release N (the fleet back "
                          "to a release), not both")
    if args.to_release is not None:
        if args.backup:
            raise ConfigError("--backup goes with a handler file, not with --to-release")
        return await cli_rollouts.rollback_to_release(fleet, inventory, ids, args, out)
    command: Dict[str, Any] = {"command": "rollback_handler", "filename": args.file}
    if args.backup:
        command["backup"] = args.backup

    def ended_on(reply: Dict[str, Any]) -> str:
        return f"now on {short(reply.get('version'))} (restored {reply.get('restored_from')})"

    return await report_each(fleet, command, ids, args, out, ended_on, progress=True)


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
    "status": cmd_status, "deploy": cli_rollouts.cmd_deploy, "converge": cli_rollouts.cmd_converge,
    "rollback": cmd_rollback, "agent": agent_cli.cmd_upgrade, "send": cmd_send,
    "commands": cmd_commands, "backups": cmd_backups, "log": cmd_log,
}


async def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        return await run_demo(agents=args.agents, as_json=args.json)
    if args.command == "agent" and args.action == "bundle":  # builds files: no inventory, no devices
        return agent_cli.run(args, Output(args.json).emit)
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
            return state_cli.run(args, store, Output(args.json).emit)
    if args.command == "ca":
        return ca_cli.run(args, Output(args.json).emit)
    if args.command == "provision":
        if sample:
            raise ConfigError("provisioning writes to the inventory, and this is the project's sample: copy "
                              f"{REPO_DEVICES} to ./devices.json (or give -d PATH) first")
        return provision_cli.run(args, path, Output(args.json).emit)
    if args.command == "keys":
        return keys_cli.run(args, Output(args.json).emit)
    if args.command == "broker":
        return broker_cli.run(args, Output(args.json).emit)
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if args.concurrency is not None and args.concurrency < 1:
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
        if args.command in ("deploy", "rollback", "converge"):
            print("fleet: the lines above are the devices that finished; a change already sent may still complete "
                  "on its device. `fleet status` shows what each device runs now; `fleet converge` finishes the "
                  "rollout (it pushes only to devices not yet on their release).", file=sys.stderr)
        return 130
