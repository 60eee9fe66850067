"""Rolling a handler out to many devices in waves.

    preflight   get_status from every target: offline devices are reported
                (not waited for), devices already on this version are skipped
    canary      the first wave (default 1 device)
    batches     the rest, in waves of a size or a percentage
    each wave   push (with sha256, so a corrupted transfer is refused), then
                check the commands are live, then the optional verify command
    halt        when failures pass ``max_failures`` (counted over the whole
                rollout, not per wave) or unreachable devices pass
                ``max_unreachable``; the devices not yet reached are SKIPPED
    rollback    with ``rollback_on_failure``, every device this rollout
                changed is put back to exactly what it ran before (the backup
                that this rollout's own push created on it)
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Dict, List, Optional, Sequence, Set, Union

from agent.filenames import module_name_from_filename
from agent.errors import BadRequest
from agent.protocol import encode_shared_request

from .errors import ConfigError
from .fleet import Fleet, ResultCallback, attempt
from .results import DeviceResult, Status, short

_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Amount:
    """A count (``10``) or a share of the targeted devices (``"25%"``)."""

    value: float
    percent: bool = False

    @classmethod
    def parse(cls, raw: Union[str, int, "Amount", None], what: str) -> "Amount":
        if isinstance(raw, Amount):
            return raw
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            return cls(float(raw))
        match = _AMOUNT.match(str(raw))
        if match is None or (match.group(2) and float(match.group(1)) > 100):
            raise ConfigError(f"{what} must be a whole number like 10 or a percentage like 25%, got {raw!r}")
        if not match.group(2) and float(match.group(1)) != int(float(match.group(1))):
            raise ConfigError(f"{what} must be a whole number of devices, got {raw!r}")
        return cls(float(match.group(1)), bool(match.group(2)))

    def of(self, total: int) -> int:
        return int(math.floor(total * self.value / 100)) if self.percent else int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"

    def describe(self, total: int) -> str:
        """``"2"`` for a count; ``"10% (2 of 20 devices)"`` for a share: what a limit comes to, in words."""
        return f"{self} ({self.of(total)} of {total} devices)" if self.percent else str(self)


@dataclass(frozen=True)
class RolloutPlan:
    canary: int = 1
    # Counts or percentages: 10, "10", "25%" or an Amount; normalised to Amount on creation.
    batch: Union[Amount, str, int] = Amount(25, percent=True)
    max_failures: Union[Amount, str, int] = Amount(0)
    max_unreachable: Union[Amount, str, int, None] = None  # None: offline devices never halt the rollout
    verify: Optional[str] = None
    verify_args: Dict[str, Any] = field(default_factory=dict)
    rollback_on_failure: bool = False
    dry_run: bool = False
    probation: bool = True
    force: bool = False  # push even a version a device quarantined (it killed or hung that agent once)
    release: Optional[int] = None  # the release this push belongs to, told to each agent
    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.canary, bool) or not isinstance(self.canary, int) or self.canary < 0:
            raise ConfigError(f"canary must be a whole number of devices (0 for none), got {self.canary!r}")
        object.__setattr__(self, "batch", Amount.parse(self.batch, "batch"))
        object.__setattr__(self, "max_failures", Amount.parse(self.max_failures, "max-failures"))
        if self.max_unreachable is not None:
            object.__setattr__(self, "max_unreachable", Amount.parse(self.max_unreachable, "max-unreachable"))
        if self.batch_amount.value <= 0:
            raise ConfigError("batch must be at least 1 device or more than 0%")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("timeout must be a positive number of seconds")

    # Typed views of the fields above (which __post_init__ has already turned into Amounts).

    @property
    def batch_amount(self) -> Amount:
        return Amount.parse(self.batch, "batch")

    @property
    def failure_limit(self) -> Amount:
        return Amount.parse(self.max_failures, "max-failures")

    @property
    def unreachable_limit(self) -> Optional[Amount]:
        return None if self.max_unreachable is None else Amount.parse(self.max_unreachable, "max-unreachable")


@dataclass
class RolloutReport:
    filename: str
    version: str
    results: Dict[str, DeviceResult]
    waves: List[List[str]]
    halted: bool = False
    halt_reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.halted and all(r.ok for r in self.results.values())

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for result in self.results.values():
            counts[result.status.value] = counts.get(result.status.value, 0) + 1
        return counts

    def tally(self) -> str:
        """``1 FAILED, 3 OK, 1 UNREACHABLE``: the outcomes, counted, for a summary line."""
        return ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items()))

    def as_dict(self) -> Dict[str, Any]:
        return {
            "file": self.filename,
            "version": self.version,
            "ok": self.ok,
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "counts": self.counts(),
            "waves": self.waves,
            "seconds": round(self.seconds, 3),
            "devices": [r.as_dict() for r in self.results.values()],
        }


def read_handler(path: Path) -> tuple:
    """``(filename, code)`` of a handler file, its name checked by the agent's own rule before anything is sent."""
    try:
        module_name_from_filename(path.name)
    except BadRequest as exc:
        raise ConfigError(f"{path}: {exc.message}") from None
    try:
        return path.name, path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


class Rollout:
    """One rollout of one handler file to a set of devices. Use ``await Rollout(...).run()``."""

    def __init__(self, fleet: Fleet, filename: str, code: str, targets: Sequence[str], plan: RolloutPlan,
                 on_result: Optional[ResultCallback] = None) -> None:
        self.fleet = fleet
        self.filename = filename
        self.version = hashlib.sha256(code.encode("utf-8")).hexdigest()
        self.targets = list(targets)
        self.plan = plan
        self.on_result = on_result
        self.results: Dict[str, DeviceResult] = {}
        self.old_versions: Dict[str, Optional[str]] = {}
        self.old_commands: Dict[str, List[str]] = {}  # what this file offered on each device before the push
        self._unsure: Set[str] = set()  # pushes sent but never answered (timeout, connection lost): may have landed
        self._checkable: Set[str] = set()  # agents that honour if_version/to_version (older ones ignore them)
        # An undo may queue on the device behind a push still running there, so it waits at least as long.
        self._undo_timeout = max(plan.timeout or 0.0, fleet.request_timeout)
        # Encoded once for the whole fleet: the code is the bulk of every push.
        self._push_body = encode_shared_request({"command": "update_handler", "filename": filename, "code": code,
                                       "sha256": self.version, "dry_run": plan.dry_run, "probation": plan.probation,
                                                  **({"force": True} if plan.force else {}),
                                                  **({"release": plan.release} if plan.release else {})})
        self._list_body = encode_shared_request({"command": "list_commands"})
        self._verify_body = encode_shared_request({**plan.verify_args, "command": plan.verify}) if plan.verify else b""

    async def run(self) -> RolloutReport:
        started = time.perf_counter()
        candidates = await self._preflight()
        waves = self._waves(candidates)
        report = RolloutReport(self.filename, self.version, self.results, waves)
        # The preflight already knows who is offline: past a limit, nothing is pushed at all.
        reason = self._over_limits()
        halted_at: Optional[int] = -1 if reason else None
        for index, wave in enumerate(waves if halted_at is None else []):
            await self.fleet.run_each(wave, self._push, self._finish)
            reason = self._over_limits()
            if reason:
                halted_at = index
                break
        if halted_at is not None:
            report.halted, report.halt_reason = True, reason
            for wave in waves[halted_at + 1:]:
                for device_id in wave:
                    self._finish(DeviceResult(device_id, Status.SKIPPED, old_version=self.old_versions.get(device_id),
                                              note=f"not attempted: rollout halted ({report.halt_reason})"))
            if self.plan.rollback_on_failure and not self.plan.dry_run:
                await self._roll_back()
        report.results = {d: self.results[d] for d in self.targets}
        report.seconds = time.perf_counter() - started
        return report

    async def _attempt(self, awaitable: Awaitable[Any], device_id: str) -> DeviceResult:
        return await attempt(awaitable, device_id, self.fleet.device(device_id))

    def _finish(self, result: DeviceResult) -> None:
        self.results[result.device_id] = result
        if self.on_result is not None:
            self.on_result(result)

    async def _preflight(self) -> List[str]:
        statuses = await self.fleet.send_all({"command": "get_status"}, self.targets, timeout=self.plan.timeout)
        candidates = []
        for device_id in self.targets:
            status = statuses[device_id]
            if status.status is not Status.OK:
                status.note = "offline at start: not attempted" if status.status is Status.UNREACHABLE \
                    else "preflight get_status failed: not attempted"
                self._finish(status)
                continue
            modules = {m.get("file"): m for m in (status.reply or {}).get("modules", [])}
            old = modules.get(self.filename, {}).get("sha256")
            self.old_versions[device_id] = old
            self.old_commands[device_id] = list(modules.get(self.filename, {}).get("commands") or [])
            if "if_version" in (status.reply or {}).get("deploy_features", ()):
                self._checkable.add(device_id)
            if old == self.version:
                self._finish(DeviceResult(device_id, Status.SKIPPED, old_version=old, new_version=old,
                                          commands=list(modules[self.filename].get("commands", [])),
                                          note="already at this version"))
            else:
                candidates.append(device_id)
        return candidates

    def _waves(self, candidates: List[str]) -> List[List[str]]:
        canary = candidates[:self.plan.canary]
        rest = candidates[self.plan.canary:]
        size = max(1, self.plan.batch_amount.of(len(self.targets)))
        waves = [canary] if canary else []
        waves += [rest[i:i + size] for i in range(0, len(rest), size)]
        return waves

    def _over_limits(self) -> str:
        total = len(self.targets)
        failures = sum(r.status in (Status.FAILED, Status.TIMEOUT) for r in self.results.values())
        unreachable = sum(r.status is Status.UNREACHABLE for r in self.results.values())
        failure_limit, unreachable_limit = self.plan.failure_limit, self.plan.unreachable_limit
        if failures > failure_limit.of(total):
            return f"{failures} device(s) failed, more than max-failures {failure_limit.describe(total)} allows"
        if unreachable_limit is not None and unreachable > unreachable_limit.of(total):
            return (f"{unreachable} device(s) unreachable, "
                    f"more than max-unreachable {unreachable_limit.describe(total)} allows")
        return ""

    async def _push(self, device_id: str) -> DeviceResult:
        started = time.perf_counter()
        old = self.old_versions.get(device_id)
        result = await self._attempt(self.fleet.send_encoded(device_id, self._push_body, "update_handler",
                                                       timeout=self.plan.timeout), device_id)
        result.old_version = old
        reply = result.reply or {}
        details = reply.get("validation_details") or reply.get("validation") or {}
        result.validation_errors = list(details.get("errors") or [])
        result.validation_warnings = list(details.get("warnings") or [])
        if result.status is Status.OK:
            result.new_version = reply.get("version")
            result.commands = list((reply.get("reload") or {}).get("commands") or [])
            result.removed_commands = [c for c in self.old_commands.get(device_id, ()) if c not in result.commands]
            result.changed = not reply.get("unchanged") and not reply.get("dry_run")
            result.backup = reply.get("backup_created")
            result.note = "dry run: passed every check" if reply.get("dry_run") else \
                ("already at this version" if reply.get("unchanged") else "deployed")
            if not self.plan.dry_run:
                await self._check_live(device_id, result)
        elif result.status is Status.FAILED and reply.get("rolled_back"):
            result.note = "refused at load; the device put the previous version back"
        elif not self.plan.dry_run and (result.status is Status.TIMEOUT or result.code == "connection_lost"):
            self._unsure.add(device_id)
            result.note = "sent, but not answered: it may still complete there (fleet status shows what runs)"
        result.seconds = time.perf_counter() - started
        return result

    async def _check_live(self, device_id: str, result: DeviceResult) -> None:
        """The wave check: the pushed commands are in the device's table, and verify passes."""
        listed = await self._attempt(self.fleet.send_encoded(device_id, self._list_body, "list_commands",
                                                       timeout=self.plan.timeout), device_id)
        if listed.status is not Status.OK:
            result.status, result.error, result.code = listed.status, f"after the push, list_commands: {listed.error}", listed.code
            return
        live = set((listed.reply or {}).get("commands", []))
        missing = [c for c in result.commands if c not in live]
        if missing:
            result.status, result.code = Status.FAILED, "commands_missing"
            result.error = f"pushed, but these commands are not live: {', '.join(missing)}"
            return
        if self.plan.verify:
            check = await self._attempt(self.fleet.send_encoded(device_id, self._verify_body, self.plan.verify,
                                                          timeout=self.plan.timeout), device_id)
            if check.status is not Status.OK:
                result.status, result.code = check.status, check.code or "verify_failed"
                result.error = f"verify {self.plan.verify} failed: {check.error}"
                return
            result.note += f", verify {self.plan.verify} ok"

    async def _roll_back(self) -> None:
        """Put every device this rollout changed, or may have changed, back to what it ran before.

        Each undo names the version this rollout pushed (``if_version``), so the
        agent changes nothing if the device runs something else by then: a push
        that never landed, or a deploy made since. For a push whose reply never
        came, the undo queues on the device behind that push, if it is still
        running, and then finds the old version by its sha256 (``to_version``).
        """
        targets = [d for d, r in self.results.items() if r.changed or d in self._unsure & self._checkable]
        for device_id in sorted(self._unsure - self._checkable):
            # Without if_version the undo could roll back past what the device ran before: leave it alone.
            self.results[device_id].note = ("sent, but not answered, and this agent is too old to check safely "
                                             "whether it landed: see fleet status")
        await self.fleet.run_each(targets, self._undo, self._finish)

    async def _undo(self, device_id: str) -> DeviceResult:
        result = self.results[device_id]
        unsure = device_id in self._unsure
        old = result.old_version
        command: Dict[str, Any] = {"filename": self.filename, "if_version": self.version}
        if old is None:
            command.update(command="delete_handler", backup=True)
        elif unsure:
            command.update(command="rollback_handler", to_version=old)
        else:
            command.update(command="rollback_handler", backup=result.backup)
        undone = await self._attempt(self.fleet.send(device_id, command, timeout=self._undo_timeout), device_id)
        reply = undone.reply or {}
        if undone.status is not Status.OK:
            # The device may stay on the new version while the others went back: that must stand out.
            state = f"may still run {short(self.version)}" if unsure else f"still on {short(self.version)}"
            reason = f"rollback failed, {state}: {undone.error}"
            result.status, result.code = Status.FAILED, "rollback_failed"
            result.error = f"{result.error}; {reason}" if result.error else reason
        elif not reply.get("unchanged"):
            result.status, result.new_version, result.removed_commands = Status.ROLLED_BACK, old, ()
            back = f"rolled back to {short(old)}" if old else "rolled back: the new file was removed"
            result.note = f"the push had landed after all; {back}" if unsure else back
        elif reply.get("version") == old:
            if not unsure:  # the agent's probation, or someone, already put it back
                result.status, result.new_version, result.removed_commands = Status.ROLLED_BACK, old, ()
            result.note = f"checked: it still runs what it ran before ({short(old)}); the push did not land or was undone"
        else:
            result.note = (f"not rolled back: it runs {short(reply.get('version'))} now, "
                           "which neither this rollout pushed nor it ran before")
        return result


async def deploy(fleet: Fleet, path: Union[str, Path], targets: Optional[Sequence[str]] = None,
                 plan: Optional[RolloutPlan] = None, on_result: Optional[ResultCallback] = None) -> RolloutReport:
    """Roll the handler file at ``path`` out to ``targets`` (default: the whole fleet)."""
    filename, code = read_handler(Path(path))
    ids = list(targets) if targets is not None else [d.id for d in fleet.devices]
    return await Rollout(fleet, filename, code, ids, plan or RolloutPlan(), on_result).run()
