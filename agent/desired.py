"""The release the controller left for this device at the broker, applied here with no controller running.

The controller publishes each device's desired release as a retained
message (``pifleet/ID/desired``: the release number and, per file, its sha256
and signature) and each file's code once under ``pifleet/blobs/SHA256``. The
broker hands the desired release to the agent when it connects and whenever
it changes; the agent compares it with what it runs and pushes each file that
differs to itself, through the same ``update_handler`` as a push over the
wire: the same checks, import test, backups, crash-safe activation and, with
``--trusted-keys``, signature check. If one file fails, the files already
changed are put back, so the device stays on its previous release, whole.
Either way the outcome goes to the retained ``pifleet/ID/reported``.

Files the release does not name are left alone, as a deploy leaves them.
Whoever may write this device's desired topic at the broker can deploy to
it: the broker's access list (``fleet broker config``) is the boundary, and
signed releases guard against the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from . import contract
from .protocol import parse_request

if TYPE_CHECKING:
    from .broker_link import BrokerLink
    from .dispatch import Dispatcher

log = logging.getLogger(__name__)

BLOB_TIMEOUT = 60.0  # seconds to wait for a file's code from the broker


def parse_desired(payload: bytes) -> Optional[Dict[str, Any]]:
    """``{"release": N, "files": {"name.py": {"sha256": ..., "signature": ..., "key_id": ...}}}``, or None."""
    try:
        desired = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(desired, dict) or not isinstance(desired.get("files"), dict):
        return None
    files = desired["files"]
    if not all(contract.handler_name(name)[0] and isinstance(spec, dict) and isinstance(spec.get("sha256"), str)
               for name, spec in files.items()):
        return None
    return desired


class DesiredState:
    """Applies the newest desired release, one at a time; a newer one that arrives meanwhile goes next."""

    def __init__(self, link: "BrokerLink", dispatcher: "Dispatcher", running: Callable[[], Dict[str, str]]) -> None:
        self._link = link
        self._dispatcher = dispatcher
        self._running = running  # file name -> sha256 of what this agent runs now
        self._next: Optional[Dict[str, Any]] = None
        self._worker: Optional["asyncio.Task[None]"] = None
        self.applied = 0  # releases applied (with at least one file changed): a test waits for this

    def offer(self, payload: bytes) -> None:
        if not payload:  # the controller cleared it: nothing to converge to
            return
        desired = parse_desired(payload)
        if desired is None:
            log.error("ignored a desired release that is not {\"release\": N, \"files\": {NAME.py: {\"sha256\": ...}}}")
            return
        self._next = desired
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work())

    async def _work(self) -> None:
        while self._next is not None:
            desired, self._next = self._next, None
            try:
                report = await self._apply(desired)
            except Exception:  # our bug: say so in the report, keep serving
                log.exception("applying desired release %s failed", desired.get("release"))
                report = {"state": "failed", "error": "internal error while applying (see the agent's log)"}
            self._report(desired, report)

    async def _apply(self, desired: Dict[str, Any]) -> Dict[str, Any]:
        files: Dict[str, Dict[str, Any]] = desired["files"]
        running = self._running()
        todo = [name for name in sorted(files) if running.get(name) != files[name]["sha256"]]
        changed: List[Tuple[str, Optional[str]]] = []  # (file, the version it ran before; None: it was not there)
        for name in todo:
            spec = files[name]
            code = await self._link.fetch_blob(spec["sha256"], BLOB_TIMEOUT)
            if code is None:
                await self._put_back(changed, files)
                return {"state": "failed", "file": name, "error": f"the code of {name} ({spec['sha256'][:12]}) is "
                                                                   "not at the broker"}
            reply = await self._call({"command": "update_handler", "filename": name, "code": code.decode("utf-8"),
                                      "sha256": spec["sha256"], "release": desired.get("release"),
                                      **{k: spec[k] for k in ("signature", "key_id") if spec.get(k)}})
            if reply.get("success") is not True:
                await self._put_back(changed, files)
                return {"state": "failed", "file": name, "code": reply.get("code"), "error": reply.get("error")}
            changed.append((name, running.get(name)))
        names = [name for name, _ in changed]
        if changed:
            self.applied += 1
            log.warning("applied desired release %s from the broker: %s", desired.get("release"), ", ".join(names))
        return {"state": "current", "changed": names}

    async def _put_back(self, changed: List[Tuple[str, Optional[str]]], files: Dict[str, Dict[str, Any]]) -> None:
        """Undo this release's changes, newest first: the device stays on its previous release, whole (a file
        the release added is deleted, with a backup)."""
        for name, before in reversed(changed):
            undo: Dict[str, Any] = {"filename": name, "if_version": files[name]["sha256"]}
            undo.update({"command": "delete_handler", "backup": True} if before is None else
                        {"command": "rollback_handler", "to_version": before})
            reply = await self._call(undo)
            if reply.get("success") is not True:
                log.error("could not put %s back after a failed release: %s", name, reply.get("error"))

    async def _call(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """A request to this agent itself, through its dispatcher: the path a request over the wire takes."""
        outcome = self._dispatcher.handle(parse_request(json.dumps(request).encode()), authorized=True)
        line = outcome if isinstance(outcome, bytes) else await outcome
        reply: Dict[str, Any] = json.loads(line)
        return reply

    def _report(self, desired: Dict[str, Any], outcome: Dict[str, Any]) -> None:
        report = {"release": desired.get("release"), "files": self._running(), "at": time.time(), **outcome}
        self._link.publish(contract.REPORTED_TOPIC, json.dumps(report).encode(), retain=True)
