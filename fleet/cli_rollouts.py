"""The rollouts of the command line: ``fleet deploy``, ``fleet converge``, ``fleet rollback --to-release``.

Each one is recorded in the state store as it goes (``converge``); a dry run
records nothing and changes nothing.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional

from . import state_cli, tables
from .cli_common import EXIT_FAILED, EXIT_OK, Output, say, verify_options
from .converge import converge, deploy_targets, fileset_of, run_recorded
from .fileset import FileSet, read_handlers
from .fleet import Fleet
from .inventory import Inventory
from .keys import SigningKey, chosen_key
from .results import Status, short
from .rollout import Rollout, RolloutPlan, RolloutReport
from .state import StateStore
from .text import lines


def plan_from(args: argparse.Namespace) -> RolloutPlan:
    """The waves, limits and checks given on the command line."""
    return RolloutPlan(canary=args.canary, batch=args.batch, max_failures=args.max_failures,
                       max_unreachable=args.max_unreachable, **verify_options(args.verify),
                       rollback_on_failure=args.rollback_on_failure, dry_run=getattr(args, "dry_run", False),
                       probation=not args.no_probation, force=args.force, timeout=args.timeout)


def announce(what: str, count: int, plan: RolloutPlan) -> None:
    say(f"rolling out {what} to {count} device(s): canary {plan.canary}, batch {plan.batch}, "
        f"max failures {plan.max_failures}{', verify ' + plan.verify if plan.verify else ''}"
        f"{', DRY RUN' if plan.dry_run else ''}")


def describe(targets: Dict[str, FileSet]) -> str:
    """``greet.py (release 4)``, or ``greet.py, cam.py (releases 4, 5)`` when devices started from different ones."""
    sets = {fileset.release: fileset for fileset in targets.values()}
    if len(sets) == 1:
        return next(iter(sets.values())).describe()
    names = sorted({name for fileset in sets.values() for name in fileset.names})
    return f"{', '.join(names)} (releases {', '.join(str(n) for n in sorted(n for n in sets if n))})"


def signing_key(args: argparse.Namespace) -> Optional[SigningKey]:
    key = chosen_key(getattr(args, "sign_key", None), args.state_file, os.environ)
    if key is not None:
        say(f"signing with release key {key.key_id} ({key.path})")
    return key


async def push_revocations(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace) -> None:
    """Before a rollout: give the TLS devices the fleet CA's revocation list (``fleet ca revoke``), if there is one
    beside the state file; each agent takes it only if it differs from its own."""
    crl = args.state_file.parent / "ca" / "crl.pem"
    tls_ids = [d for d in ids if inventory.get(d).tls is not None]
    if not tls_ids or not crl.exists():
        return
    results = await fleet.send_all({"command": "update_crl", "crl": crl.read_text(encoding="ascii")}, tls_ids,
                                   timeout=args.timeout)
    changed = [d for d, r in results.items() if r.ok and (r.reply or {}).get("changed")]
    refused = [f"{d} ({r.error})" for d, r in results.items() if r.status is Status.FAILED]
    if changed or refused:
        say(f"revocation list {crl}: new on {len(changed)} device(s)"
            + (f"; refused by {tables.some(refused)}" if refused else ""))


async def cmd_deploy(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace, out: Output) -> int:
    files = read_handlers(args.files)
    plan = plan_from(args)
    key = signing_key(args)
    if plan.dry_run:  # changes nothing, the controller's records included (signed in memory, for signed agents)
        signed = [replace(f, signature=key.sign(f.name, f.sha256), key_id=key.key_id) if key else f for f in files]
        targets = {device_id: FileSet.of(signed) for device_id in ids}
        announce(describe(targets), len(ids), plan)
        report = await Rollout(fleet, targets, plan, out.progress(len(ids))).run()
        return finish(report, out)
    await push_revocations(fleet, inventory, ids, args)
    with StateStore(args.state_file) as store:
        message = args.message or f"fleet deploy {' '.join(f.name for f in files)}"
        targets = deploy_targets(store, ids, files, message=message, author=state_cli.author(), key=key)
        announce(describe(targets), len(ids), plan)
        report = await run_recorded(fleet, store, "deploy", targets, plan, out.progress(len(ids)))
    return finish(report, out)


async def cmd_converge(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace,
                       out: Output) -> int:
    plan = plan_from(args)
    key = signing_key(args)
    with StateStore(args.state_file) as store:
        if args.watch:
            from .watch import Watch

            return await Watch(fleet, store, ids, plan, retry_every=args.retry_every, key=key, say=say).run()
        await push_revocations(fleet, inventory, ids, args)
        desired = store.desired(ids)
        say(f"converging {len(desired)} device(s) with a desired release"
            + (f" ({len(ids) - len(desired)} without one are left alone)" if len(desired) < len(ids) else ""))
        found = await converge(fleet, store, ids, plan, out.progress(len(desired)), key=key)
    for rollout, devices in found.adopted.items():
        say(f"rollout {rollout} was interrupted: its {len(devices)} remaining device(s) were given its release")
    if found.rollout is None:
        out.emit({"devices": [], "unmanaged": found.unmanaged, "adopted": found.adopted},
                 "no device has a desired release yet: `fleet deploy FILE` or `fleet rollback --to-release N` sets one")
        return EXIT_OK
    return finish(found.rollout, out, {"unmanaged": found.unmanaged, "adopted": found.adopted})


async def rollback_to_release(fleet: Fleet, inventory: Inventory, ids: List[str], args: argparse.Namespace,
                              out: Output) -> int:
    plan = plan_from(args)
    key = signing_key(args)
    await push_revocations(fleet, inventory, ids, args)
    with StateStore(args.state_file) as store:
        fileset = fileset_of(store, args.to_release, key)
        targets = {device_id: fileset for device_id in ids}
        announce(f"{fileset.describe()}, back", len(ids), plan)
        report = await run_recorded(fleet, store, "rollback", targets, plan, out.progress(len(ids)))
    return finish(report, out)


def finish(report: RolloutReport, out: Output, extra: Optional[Dict[str, Any]] = None) -> int:
    """The table and its summary, or the JSON document; the exit code."""
    what = f"{report.filename} version {short(report.version)}" if report.version else report.filename
    if report.releases:
        what += f" (release{'s' if len(report.releases) > 1 else ''} {', '.join(map(str, report.releases))})"
    summary = lines([f"HALTED: {report.halt_reason}"] * report.halted
                    + [f"{what}: {report.tally() or 'no devices'} in {report.seconds:.1f}s"]
                    + [f"recorded as rollout {report.rollout} (`fleet history`)"] * (report.rollout is not None)
                    + [f"{device}: its desired release is not at its broker yet ({why}); `fleet converge` tries again"
                       for device, why in sorted(report.desired_problems.items())])
    out.emit({**report.as_dict(), **(extra or {})}, tables.rollout_table(list(report.results.values())) + "\n\n" + summary)
    return EXIT_OK if report.ok else EXIT_FAILED
