"""Where a device stands against its desired release: current, behind, ahead, diverged, unreachable.

Pure functions of what the device reported (``get_status``: each handler
file's sha256, and the release it came with) and what the store knows (the
desired release, and which releases hold each version). Only the files of the
desired release count; other handler files on the device are not its business.

    current     every file of the desired release runs at its version
    behind      what differs is older: versions of earlier releases, or files missing
    ahead       what differs is newer: versions only later releases hold
    diverged    a version no release holds (changed by hand, pushed outside a release),
                or older and newer files at once
    unreachable the device did not answer
    refused     it answered, but refused to say (a wrong token, say): reachable, standing unknown
    unmanaged   it has no desired release yet (no deploy has targeted it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

CURRENT, BEHIND, AHEAD, DIVERGED, UNREACHABLE, REFUSED, UNMANAGED = \
    "current", "behind", "ahead", "diverged", "unreachable", "refused", "unmanaged"

Known = Mapping[Tuple[str, str], Set[int]]  # (file name, sha256) -> the releases holding that version


@dataclass(frozen=True)
class Standing:
    state: str
    desired_release: Optional[int]
    reported_release: Optional[int]  # the release the device runs, as far as anyone can tell
    files: Tuple[str, ...] = ()  # the files that differ from the desired release

    def as_dict(self) -> Dict[str, Any]:
        return {"state": self.state, "desired_release": self.desired_release,
                "reported_release": self.reported_release, "differs": list(self.files)}


def standing(desired: Optional[int], desired_files: Mapping[str, str], modules: Optional[Iterable[Dict[str, Any]]],
             known: Known, releases: Mapping[int, Mapping[str, str]]) -> Standing:
    """``modules``: the device's ``get_status`` modules, or None when it did not answer.

    ``desired_files`` are the desired release's files (name -> sha256);
    ``releases`` every release's files, for naming the release a device runs.
    """
    if modules is None:
        return Standing(UNREACHABLE, desired, None)
    running = {str(m.get("file")): m for m in modules}
    reported = reported_release(running, releases, known)
    if desired is None:
        return Standing(UNMANAGED, None, reported)
    differs = sorted(name for name, sha in desired_files.items() if running.get(name, {}).get("sha256") != sha)
    if not differs:
        return Standing(CURRENT, desired, desired)
    sides = {_side(name, running.get(name), desired, known) for name in differs}
    side = sides.pop() if len(sides) == 1 else None
    state = side if side is not None else DIVERGED
    return Standing(state, desired, reported, tuple(differs))


def _side(name: str, module: Optional[Dict[str, Any]], desired: int, known: Known) -> Optional[str]:
    """BEHIND or AHEAD for one file that differs from the desired release; None for a version no release holds."""
    if module is None:
        return BEHIND  # a file the desired release has and the device lacks: not there yet
    holders = known.get((name, str(module.get("sha256"))), set())
    if not holders:
        return None
    tag = module.get("release")  # the release the device says this version came with
    release = tag if tag in holders else max(holders)
    return AHEAD if release > desired else BEHIND


def reported_release(running: Mapping[str, Dict[str, Any]], releases: Mapping[int, Mapping[str, str]],
                     known: Known) -> Optional[int]:
    """The newest release whose every file runs on the device at its version; else the newest release
    any of its files says it came with (the agent keeps that number even for a controller that never
    saw this device); else None."""
    versions = {name: m.get("sha256") for name, m in running.items()}
    candidates: Set[int] = set()
    for name, sha in versions.items():
        candidates |= set(known.get((name, str(sha)), ()))
    for number in sorted(candidates, reverse=True):
        if all(versions.get(name) == sha for name, sha in releases[number].items()):
            return number
    tags = [int(m["release"]) for m in running.values() if isinstance(m.get("release"), int)]
    return max(tags) if tags else None


def count(standings: Iterable[Standing]) -> List[Tuple[str, int]]:
    """``[("current", 3), ("behind", 1)]``, in a fixed order: for the line under the status table."""
    states = [s.state for s in standings]
    order = (CURRENT, BEHIND, AHEAD, DIVERGED, UNREACHABLE, REFUSED, UNMANAGED)
    return [(state, states.count(state)) for state in order if state in states]
