"""``fleet agent bundle``: build the offline agent bundle (``.pyz``) and its Debian package (``.deb``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List

from .bundle import build_pyz, sha256_of
from .debian import build_deb
from .text import lines

Emit = Callable[[Dict[str, Any], str], None]


def add_commands(sub: Any, make: Any, parents: List[argparse.ArgumentParser],
                 device_parents: List[argparse.ArgumentParser], add_plan_options: Callable[[Any], None]) -> None:
    agent = make(sub, "agent")
    actions = agent.add_subparsers(dest="action", metavar="ACTION", required=True)
    bundle = actions.add_parser(
        "bundle", parents=parents, help="build pi-agent-VERSION.pyz and pi-agent_VERSION_all.deb",
        description="Build the agent for a Pi without internet: pi-agent-VERSION.pyz (one file: python3 "
                    "pi-agent.pyz --root ...) and pi-agent_VERSION_all.deb (sudo dpkg -i: the agent, its user, "
                    "unit and config). Nothing but the agent goes in: it needs only Python 3.9+.",
        epilog="Example:\n  fleet agent bundle --out dist/", formatter_class=argparse.RawDescriptionHelpFormatter)
    bundle.add_argument("--out", default="dist", metavar="DIR", help="where to write them (default dist/)")
    upgrade = actions.add_parser(
        "upgrade", parents=device_parents, help="upgrade the agents themselves, in waves",
        description="Push a new agent bundle to the devices in waves, with a deploy's canary, batches and limits. "
                    "Each device's launcher (the .deb's unit) starts the new agent and keeps it only once it is up; "
                    "otherwise it goes back to the previous one and the device counts as failed.",
        epilog="Example:\n  fleet agent upgrade --bundle dist/pi-agent-0.2.0.pyz --tag cams --canary 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    upgrade.add_argument("--bundle", default=None, metavar="FILE",
                         help="the agent bundle (.pyz) to install (default: built now from this installation)")
    add_plan_options(upgrade)


def run(args: argparse.Namespace, emit: Emit) -> int:
    out = Path(args.out)
    pyz = build_pyz(out)
    deb = build_deb(out)
    built = {"pyz": str(pyz), "deb": str(deb), "sha256": {pyz.name: sha256_of(pyz), deb.name: sha256_of(deb)}}
    emit(built, lines([f"built {pyz} and {deb}",
                       "on a Pi (from a USB stick): sudo dpkg -i " + deb.name + "   (README: 'Installing the agent "
                       "on a Pi')"]))
    return 0


async def cmd_upgrade(fleet: Any, inventory: Any, ids: List[str], args: argparse.Namespace, out: Any) -> int:
    """``fleet agent upgrade``: the waves of ``fleet/agent_upgrade.py``, printed like a deploy."""
    import tempfile

    from .agent_upgrade import upgrade
    from .cli_rollouts import announce, finish, plan_from, signing_key

    plan = plan_from(args)
    key = signing_key(args)
    with tempfile.TemporaryDirectory(prefix="pifleet-upgrade-") as tmp:
        bundle = Path(args.bundle) if args.bundle else build_pyz(Path(tmp))
        if not bundle.is_file():
            from .errors import ConfigError

            raise ConfigError(f"--bundle {bundle}: file not found (`fleet agent bundle` builds one)")
        announce(f"agent bundle {bundle.name} ({sha256_of(bundle)[:8]})", len(ids), plan)
        report = await upgrade(fleet, bundle, ids, plan, out.progress(len(ids)), key)
    return finish(report, out)
