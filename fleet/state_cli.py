"""The CLI faces of the state store (``state``): ``fleet release create|show``, ``fleet releases``, ``fleet history``.

A release is an immutable, numbered set of handler files. Making one pushes
nothing: it names a set of versions that a deploy or a rollback can then
refer to. The history is every rollout (deploy, converge, rollback to a release), with
each device's result, newest first.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List

from .keys import chosen_key
from .results import short
from .rollout import read_handler
from .state import Release, RolloutRecord, StateStore
from .tables import ago
from .text import grid, lines


def add_commands(sub: Any, make: Any, parents: List[argparse.ArgumentParser]) -> None:
    """Add ``release`` (``create``, ``show``) and ``releases``; ``make(sub, name)`` builds a subcommand,
    ``parents`` are the options every subcommand takes (``--state``, ``--json``, ...)."""
    release = make(sub, "release")
    actions = release.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", parents=parents, help="make a release from handler files (pushes nothing)",
                                description="Make a release: an immutable, numbered set of handler files. "
                                            "The same files make the same release.",
                                epilog="Example:\n  fleet release create handlers/camera_handlers.py "
                                       "handlers/system_handlers.py -m 'finish-line camera'",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    create.add_argument("files", nargs="+", metavar="FILE", help="handler files, e.g. handlers/camera_handlers.py")
    create.add_argument("-m", "--message", required=True, help="what this release is for")
    create.add_argument("--sign-key", default=None, metavar="PATH",
                        help="sign its files with this release key (default $PIFLEET_SIGN_KEY, or keys/release.key "
                             "beside the state file if it exists)")
    show = actions.add_parser("show", parents=parents, help="the files of one release", description="Show one release: its files "
                              "and their versions, its message, who made it and when.",
                              epilog="Example:\n  fleet release show 3", formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("number", type=int, help="release number (see `fleet releases`)")
    make(sub, "releases").add_argument("--limit", type=int, default=20, help="newest releases shown (default 20)")
    make(sub, "history").add_argument("--limit", type=int, default=20, help="newest rollouts shown (default 20)")


COMMANDS = ("release", "releases", "history")


Emit = Callable[[Dict[str, Any], str], None]  # the CLI's printer: one JSON document, or the text


def run(args: argparse.Namespace, store: StateStore, emit: Emit) -> int:
    if args.command == "history":
        rollouts = store.rollouts(args.limit)
        emit({"rollouts": [vars(r) for r in rollouts]}, history_table(rollouts))
    elif args.command == "releases":
        found = store.releases(args.limit)
        emit({"releases": [as_dict(r) for r in found]}, releases_table(found))
    elif args.action == "create":
        files = dict(read_handler(Path(path)) for path in args.files)
        release, created = store.record_release({name: code.encode("utf-8") for name, code in files.items()},
                                                message=args.message, author=author())
        key = chosen_key(args.sign_key, args.state_file, os.environ)
        if key is not None:
            for name, sha in release.files.items():
                store.add_signature(name, sha, key.key_id, key.sign(name, sha))
        summary = (f"release {release.number}: {len(release.files)} file(s)" if created else
                   f"release {release.number} already holds exactly these files; nothing new was made")
        emit({"release": as_dict(release), "created": created}, lines([summary]) + "\n" + show_text(release))
    else:
        release = store.release(args.number)
        emit({"release": as_dict(release)}, show_text(release))
    return 0


def author() -> str:
    """Who made a release, as ``user@host``: for people reading ``fleet releases`` later."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def as_dict(release: Release) -> Dict[str, Any]:
    return {"number": release.number, "message": release.message, "author": release.author,
            "created": release.created, "files": release.files}


def releases_table(releases: List[Release]) -> str:
    if not releases:
        return "no releases yet: `fleet release create FILE... -m MESSAGE` makes one"
    rows = [[r.number, ago(r.created), r.author, ", ".join(r.files), r.message] for r in releases]
    return grid(rows, ["release", "made", "by", "files", "message"])


def history_table(rollouts: List[RolloutRecord]) -> str:
    if not rollouts:
        return "no rollouts yet: `fleet deploy FILE` records each one here"
    rows = []
    for r in rollouts:
        tally = ", ".join(f"{count} {status}" for status, count in sorted(Counter(r.results.values()).items()))
        outcome = r.outcome or ("running" if r.running else
                                "interrupted: the controller stopped before the end (`fleet converge` finishes it)")
        version = f" {short(r.version)}" if r.version else ""
        rows.append([r.id, r.kind, ago(r.started), f"{r.file}{version}", r.release or "-",
                     f"{len(r.results)}/{r.targets}", tally or "-", outcome])
    return grid(rows, ["rollout", "kind", "started", "files", "release", "devices (results/targets)", "results",
                       "outcome"])


def show_text(release: Release) -> str:
    header = lines([f"release {release.number}: {release.message}",
                    f"made by {release.author}, {ago(release.created)}"])
    table = grid([[name, short(sha), sha] for name, sha in release.files.items()], ["file", "version", "sha256"])
    return f"{header}\n\n{table}"

