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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import state_cli, tables
from .cli_args import DEVICES_ENV, USES_STATE, build_parser
from .errors import ConfigError
from .fleet import Fleet
from .inventory import Inventory, load_inventory
from .state import StateStore, state_path
from .text import lines, visible
from .results import DeviceResult, Status, short
from .rollout import RolloutPlan, deploy, read_handler

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
REPO_DEVICES = Path(__file__).resolve().parent.parent / "devices.json"


def default_devices() -> str:
    """``$FLEET_DEVICES``, else ./devices.json, else the project's own (local agents on 127.0.0.1)."""
    if os.environ.get(DEVICES_ENV):
        return os.environ[DEVICES_ENV]
    return "devices.json" if Path("devices.json").exists() else str(REPO_DEVICES)


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
            return state_cli.run(args, store, Output(args.json).emit)
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
