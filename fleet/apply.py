"""One device's part of a rollout: push each file that differs, check them live, verify; and undo.

A device is changed one file at a time, in name order, each push checked by
the agent like any other. If a file fails on a device, the files already
changed there in this rollout are put back at once: the device ends on what
it ran before (its previous release), never on half of the new one, and
counts as failed. Every undo names the version this rollout pushed
(``if_version``), so it never touches a file that has changed since.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from agent import contract
from agent.protocol import encode_shared_request

from .fileset import HandlerFile
from .fleet import Fleet, attempt
from .results import DeviceResult, Status, short


@dataclass
class Pushed:
    """A file this rollout pushed to a device, and what to put back."""

    file: HandlerFile
    old: Optional[str]  # the version it ran before (None: the file was not there)
    backup: Optional[str]  # the backup the push made on the device
    unsure: bool = False  # sent, but never answered: it may have landed


@functools.lru_cache(maxsize=32)
def push_body(file: HandlerFile, release: Optional[int], dry_run: bool, probation: bool, force: bool) -> bytes:
    """A push, encoded once for the whole fleet (the code is the bulk of it), and for the next rollouts of
    the same file: a watch converging devices in small batches encodes each version once."""
    return encode_shared_request({
        "command": "update_handler", "filename": file.name, "code": file.code, "sha256": file.sha256,
        "dry_run": dry_run, "probation": probation, **({"force": True} if force else {}),
        **({"release": release} if release else {}),
        **({"signature": file.signature, "key_id": file.key_id} if file.signature else {})})


class Applier:
    """Pushes and undoes for every device of one rollout; ``pushed`` is what it changed, per device."""

    def __init__(self, fleet: Fleet, plan: Any) -> None:
        self.fleet = fleet
        self.plan = plan
        self.pushed: Dict[str, List[Pushed]] = {}
        self.checkable: Set[str] = set()  # agents that honour if_version/to_version (older ones ignore them)
        # An undo may queue on the device behind a push still running there, so it waits at least as long.
        self.undo_timeout = max(plan.timeout or 0.0, fleet.request_timeout)
        self._list_body = encode_shared_request({"command": "list_commands"})
        self._verify_body = encode_shared_request({**plan.verify_args, "command": plan.verify}) if plan.verify else b""

    def unsure(self, device_id: str) -> List[Pushed]:
        return [p for p in self.pushed.get(device_id, ()) if p.unsure]

    def _body(self, file: HandlerFile, release: Optional[int]) -> bytes:
        plan = self.plan
        return push_body(file, release, plan.dry_run, plan.probation, plan.force)

    async def _attempt(self, device_id: str, body: bytes, command: str, timeout: Optional[float]) -> DeviceResult:
        return await attempt(self.fleet.send_encoded(device_id, body, command, timeout=timeout), device_id,
                             self.fleet.device(device_id))

    # Pushing

    async def apply(self, device_id: str, todo: List[HandlerFile], before: Dict[str, Dict[str, Any]],
                    release: Optional[int]) -> DeviceResult:
        """Push each file of ``todo`` (``before``: what the device ran, per file) and check the result."""
        started = time.perf_counter()
        result = DeviceResult(device_id, Status.OK, release=release, files={})
        pushed = self.pushed.setdefault(device_id, [])
        commands: List[str] = []
        for file in todo:
            step = await self._push(device_id, file, before.get(file.name, {}), release)
            result.validation_warnings = [*result.validation_warnings, *step.validation_warnings]
            _files(result)[file.name] = (step.old_version, step.new_version)
            if step.status is not Status.OK:
                self._take_failure(result, step)
                if any(not p.unsure for p in pushed):
                    await self._put_back(device_id, result)
                break
            if step.changed:
                pushed.append(Pushed(file, step.old_version, step.backup))
            result.reply, result.note = step.reply, step.note
            commands += step.commands
            result.removed_commands = [*result.removed_commands, *step.removed_commands]
        else:
            result.commands = commands
            result.changed = any(not p.unsure for p in pushed)
            if len(todo) > 1:
                result.note = "dry run: passed every check" if self.plan.dry_run else \
                    f"{len(pushed)} of {len(todo)} file(s) changed"
            if not self.plan.dry_run:
                await self._check_live(device_id, result)
        if len(todo) == 1:
            result.old_version, result.new_version = _files(result)[todo[0].name]
        result.seconds = time.perf_counter() - started
        return result

    async def _push(self, device_id: str, file: HandlerFile, before: Dict[str, Any],
                    release: Optional[int]) -> DeviceResult:
        old = before.get("sha256")
        result = await self._attempt(device_id, self._body(file, release), "update_handler", self.plan.timeout)
        result.old_version = old
        reply = result.reply or {}
        details = reply.get("validation_details") or reply.get("validation") or {}
        result.validation_errors = list(details.get("errors") or [])
        result.validation_warnings = list(details.get("warnings") or [])
        if result.status is Status.OK:
            result.new_version = reply.get("version")
            result.commands = list((reply.get("reload") or {}).get("commands") or [])
            result.removed_commands = [c for c in before.get("commands") or () if c not in result.commands]
            result.changed = not reply.get("unchanged") and not reply.get("dry_run")
            result.backup = reply.get("backup_created")
            result.note = "dry run: passed every check" if reply.get("dry_run") else \
                ("already at this version" if reply.get("unchanged") else "deployed")
        elif result.status is Status.FAILED and reply.get("rolled_back"):
            result.note = "refused at load; the device put the previous version back"
        elif not self.plan.dry_run and (result.status is Status.TIMEOUT or result.code == contract.CONNECTION_LOST):
            self.pushed.setdefault(device_id, []).append(Pushed(file, old, None, unsure=True))
            result.note = "sent, but not answered: it may still complete there (fleet status shows what runs)"
        return result

    @staticmethod
    def _take_failure(result: DeviceResult, step: DeviceResult) -> None:
        result.status, result.error, result.code, result.reply = step.status, step.error, step.code, step.reply
        result.validation_errors, result.note = step.validation_errors, step.note
        if len(_files(result)) > 1 and result.error:
            result.error = f"{list(_files(result))[-1]}: {result.error}"

    async def _check_live(self, device_id: str, result: DeviceResult) -> None:
        """The wave check: the pushed commands are in the device's table, and verify passes."""
        listed = await self._attempt(device_id, self._list_body, "list_commands", self.plan.timeout)
        if listed.status is not Status.OK:
            result.status, result.error, result.code = listed.status, f"after the push, list_commands: {listed.error}", listed.code
            return
        live = set((listed.reply or {}).get("commands", []))
        missing = [c for c in result.commands if c not in live]
        if missing:
            result.status, result.code = Status.FAILED, contract.COMMANDS_MISSING
            result.error = f"pushed, but these commands are not live: {', '.join(missing)}"
            return
        if self.plan.verify:
            check = await self._attempt(device_id, self._verify_body, self.plan.verify, self.plan.timeout)
            if check.status is not Status.OK:
                result.status, result.code = check.status, check.code or contract.VERIFY_FAILED
                result.error = f"verify {self.plan.verify} failed: {check.error}"
                return
            result.note += f", verify {self.plan.verify} ok"

    # Undoing

    async def _put_back(self, device_id: str, result: DeviceResult) -> None:
        """After one file failed: undo the files this rollout already changed on the device."""
        confirmed = [p for p in self.pushed[device_id] if not p.unsure]
        undone = await self._undo_each(device_id, confirmed, named=True)
        self.pushed[device_id] = self.unsure(device_id)
        failures = [text for _, kind, text in undone if kind == _FAILED]
        if failures:
            result.code = contract.ROLLBACK_FAILED
            result.error = f"{result.error}; could not put the device back on its previous release: {'; '.join(failures)}"
        else:
            notes = "; ".join(text for _, _, text in undone)
            result.note = "; ".join(n for n in (result.note, f"put back on its previous release: {notes}") if n)
        for p in confirmed:
            _files(result)[p.file.name] = (p.old, p.old)

    async def undo(self, device_id: str, result: DeviceResult) -> DeviceResult:
        """After a halt: put back every file this rollout changed, or may have changed, on the device.

        For a push whose reply never came, the undo queues on the device behind
        that push, if it is still running, and then finds the old version by
        its sha256 (``to_version``).
        """
        pushed = [p for p in self.pushed.get(device_id, ()) if not p.unsure or device_id in self.checkable]
        undone = await self._undo_each(device_id, pushed, named=len(_files(result)) > 1)
        failures = [text for _, kind, text in undone if kind == _FAILED]
        result.note = "; ".join(text for _, kind, text in undone if kind != _FAILED)
        if failures:
            reason = "; ".join(failures)
            result.status, result.code = Status.FAILED, contract.ROLLBACK_FAILED
            result.error = f"{result.error}; {reason}" if result.error else reason
        elif any(kind == _BACK or (kind == _SAME and not p.unsure) for p, kind, _ in undone):
            result.status, result.removed_commands = Status.ROLLED_BACK, ()
            for p in pushed:
                _files(result)[p.file.name] = (p.old, p.old)
            if len(_files(result)) == 1:
                result.new_version = result.old_version
        return result

    async def _undo_each(self, device_id: str, pushed: List[Pushed], *,
                         named: bool) -> List[Tuple[Pushed, str, str]]:
        """Undo ``pushed`` in reverse order: each one, how it went (``_BACK``...), and in words (``named``:
        each starting with its file's name)."""
        undone = []
        for p in reversed(pushed):
            kind, text = await self._undo_one(device_id, p)
            undone.append((p, kind, f"{p.file.name}: {text}" if named else text))
        return undone

    async def _undo_one(self, device_id: str, p: Pushed) -> Tuple[str, str]:
        command: Dict[str, Any] = {"filename": p.file.name, "if_version": p.file.sha256}
        if p.old is None:
            command.update(command="delete_handler", backup=True)
        elif p.unsure:
            command.update(command="rollback_handler", to_version=p.old)
        else:
            command.update(command="rollback_handler", backup=p.backup)
        undone = await attempt(self.fleet.send(device_id, command, timeout=self.undo_timeout), device_id)
        reply = undone.reply or {}
        if undone.status is not Status.OK:
            # The device may stay on the new version while the others went back: that must stand out.
            state = f"may still run {short(p.file.sha256)}" if p.unsure else f"still on {short(p.file.sha256)}"
            return _FAILED, f"rollback failed, {state}: {undone.error}"
        if not reply.get("unchanged"):
            back = f"rolled back to {short(p.old)}" if p.old else "rolled back: the new file was removed"
            return _BACK, f"the push had landed after all; {back}" if p.unsure else back
        if reply.get("version") == p.old:
            return _SAME, f"checked: it still runs what it ran before ({short(p.old)}); the push did not land or was undone"
        return _OTHER, (f"not rolled back: it runs {short(reply.get('version'))} now, "
                        "which neither this rollout pushed nor it ran before")


def _files(result: DeviceResult) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """The files a rollout touched on the device (made on first use: results of plain commands have none)."""
    if result.files is None:
        result.files = {}
    return result.files


# How an undo went
_BACK, _SAME, _OTHER, _FAILED = "back", "same", "other", "failed"
