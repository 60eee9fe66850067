"""``fleet keys init``: make the release-signing key pair (``fleet/keys.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List

from .keys import default_folder, init_key
from .text import lines

Emit = Callable[[Dict[str, Any], str], None]


def add_commands(sub: Any, make: Any, parents: List[argparse.ArgumentParser]) -> None:
    keys = make(sub, "keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser("init", parents=parents, help="make a release-signing key pair (Ed25519)",
                              description="Make a release-signing key pair: release.key (mode 0600: deploys and "
                                          "`fleet release create` sign with it) and release.pub (copy it into each "
                                          "agent's --trusted-keys folder).",
                              epilog="Example:\n  fleet keys init --out ~/.pifleet-keys",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    init.add_argument("--out", default=None, metavar="DIR",
                      help="where to write them (default: keys/ beside the state file, where deploys look for it)")


def run(args: argparse.Namespace, emit: Emit) -> int:
    folder = Path(args.out).expanduser() if args.out else default_folder(args.state_file)
    private, public, key_id = init_key(folder)
    emit({"key": str(private), "public": str(public), "key_id": key_id}, lines([
        f"made release-signing key {key_id}: {private} (mode 0600; keep it here, on a release manager's laptop or "
        f"in CI) and {public}",
        f"copy {public.name} into each agent's --trusted-keys folder (e.g. /etc/pi-agent/trusted-keys/); deploys sign "
        "with this key" + ("" if not args.out else f" when given --sign-key {private} (or $PIFLEET_SIGN_KEY)")]))
    return 0
