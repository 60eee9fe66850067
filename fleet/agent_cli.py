"""``fleet agent bundle``: build the offline agent bundle (``.pyz``) and its Debian package (``.deb``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List

from .bundle import build_pyz, sha256_of
from .debian import build_deb
from .text import lines

Emit = Callable[[Dict[str, Any], str], None]


def add_commands(sub: Any, make: Any, parents: List[argparse.ArgumentParser]) -> None:
    agent = make(sub, "agent")
    actions = agent.add_subparsers(dest="action", metavar="ACTION", required=True)
    bundle = actions.add_parser(
        "bundle", parents=parents, help="build pi-agent-VERSION.pyz and pi-agent_VERSION_all.deb",
        description="Build the agent for a Pi without internet: pi-agent-VERSION.pyz (one file: python3 "
                    "pi-agent.pyz --root ...) and pi-agent_VERSION_all.deb (sudo dpkg -i: the agent, its user, "
                    "unit and config). Nothing but the agent goes in: it needs only Python 3.9+.",
        epilog="Example:\n  fleet agent bundle --out dist/", formatter_class=argparse.RawDescriptionHelpFormatter)
    bundle.add_argument("--out", default="dist", metavar="DIR", help="where to write them (default dist/)")


def run(args: argparse.Namespace, emit: Emit) -> int:
    out = Path(args.out)
    pyz = build_pyz(out)
    deb = build_deb(out)
    built = {"pyz": str(pyz), "deb": str(deb), "sha256": {pyz.name: sha256_of(pyz), deb.name: sha256_of(deb)}}
    emit(built, lines([f"built {pyz} and {deb}",
                       "on a Pi (from a USB stick): sudo dpkg -i " + deb.name + "   (README: 'Installing the agent "
                       "on a Pi')"]))
    return 0
