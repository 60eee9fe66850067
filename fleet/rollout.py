"""Rolling handler files out to many devices in waves.

Each device has a set of files to end on (``FileSet``: one file for ``fleet
deploy FILE``, a whole release for a converge); devices may have different
sets (each its own release). Pushing to one device is ``apply.Applier``'s job.

    preflight   get_status from every target: offline devices are reported
                (not waited for), devices already on every version are skipped
    canary      the first wave (default 1 device)
    batches     the rest, in waves of a size or a percentage
    each wave   ``on_wave`` first (the store sets these devices' desired release);
                push each file that differs (with sha256, so a corrupted transfer
                is refused), then check the commands are live, then the optional
                verify command; a file that fails puts the device back
    halt        when failures pass ``max_failures`` (counted over the whole
                rollout, not per wave) or unreachable devices pass
                ``max_unreachable``; the devices not yet reached are SKIPPED
    rollback    with ``rollback_on_failure``, every device this rollout
                changed is put back to exactly what it ran before (the backup
                that this rollout's own push created on it)
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .apply import Applier
from .errors import ConfigError
from .fileset import FileSet, HandlerFile, read_handler, read_handlers
from .fleet import Fleet, ResultCallback
from .results import DeviceResult, Status

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
    filename: str  # the files rolled out, by name
    version: str  # the file's sha256, when it is one file ("" for several)
    results: Dict[str, DeviceResult]
    waves: List[List[str]]
    halted: bool = False
    halt_reason: str = ""
    seconds: float = 0.0
    releases: List[int] = field(default_factory=list)  # the releases rolled out (none outside the store)
    rollout: Optional[int] = None  # its number in the state store's history, when it was recorded
    # devices behind a broker whose desired release could not be left there, and why (fleet/broker_desired.py)
    desired_problems: Dict[str, str] = field(default_factory=dict)

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
            "release": self.releases[0] if len(self.releases) == 1 else None,
            "releases": self.releases,
            "ok": self.ok,
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "counts": self.counts(),
            "waves": self.waves,
            "seconds": round(self.seconds, 3),
            "devices": [r.as_dict() for r in self.results.values()],
            "desired_not_at_broker": self.desired_problems,
        }


WaveCallback = Callable[[List[str]], None]


class Rollout:
    """One rollout: each target device to its set of files. Use ``await Rollout(...).run()``.

    ``on_wave(device_ids)`` is called before each wave is pushed (the state
    store sets the wave's desired release there); ``on_result`` with each
    device's result as it arrives.
    """

    def __init__(self, fleet: Fleet, targets: Mapping[str, FileSet], plan: RolloutPlan,
                 on_result: Optional[ResultCallback] = None, on_wave: Optional[WaveCallback] = None) -> None:
        self.fleet = fleet
        self.targets = dict(targets)
        self.plan = plan
        self.on_result = on_result
        self.on_wave = on_wave
        self.results: Dict[str, DeviceResult] = {}
        self.before: Dict[str, Dict[str, Dict[str, Any]]] = {}  # what each device ran, per file (preflight)
        self.todo: Dict[str, List[HandlerFile]] = {}  # the files that differ, per device
        self.current: List[str] = []  # devices the preflight found already on every version
        self.applier = Applier(fleet, plan)

    async def run(self) -> RolloutReport:
        started = time.perf_counter()
        candidates = await self._preflight()
        waves = self._waves(candidates)
        names = sorted({name for fileset in self.targets.values() for name in fileset.names})
        versions = {f.sha256 for fileset in self.targets.values() for f in fileset.files}
        report = RolloutReport(", ".join(names), versions.pop() if len(names) == 1 and len(versions) == 1 else "",
                               self.results, waves,
                               releases=sorted({f.release for f in self.targets.values() if f.release}))
        # The preflight already knows who is offline: past a limit, nothing is pushed at all.
        reason = self._over_limits()
        halted_at: Optional[int] = -1 if reason else None
        for index, wave in enumerate(waves if halted_at is None else []):
            if self.on_wave is not None:
                self.on_wave(wave)
            await self.fleet.run_each(wave, self._push, self._finish)
            reason = self._over_limits()
            if reason:
                halted_at = index
                break
        if halted_at is not None:
            report.halted, report.halt_reason = True, reason
            for wave in waves[halted_at + 1:]:
                for device_id in wave:
                    self._finish(DeviceResult(device_id, Status.SKIPPED, note=f"not attempted: rollout halted ({reason})",
                                              old_version=self._old_version(device_id)))
            if self.plan.rollback_on_failure and not self.plan.dry_run:
                await self._roll_back()
        report.results = {d: self.results[d] for d in self.targets}
        report.seconds = time.perf_counter() - started
        return report

    def _finish(self, result: DeviceResult) -> None:
        self.results[result.device_id] = result
        if self.on_result is not None:
            self.on_result(result)

    def _old_version(self, device_id: str) -> Optional[str]:
        files = self.targets[device_id].files
        return self.before.get(device_id, {}).get(files[0].name, {}).get("sha256") if len(files) == 1 else None

    async def _preflight(self) -> List[str]:
        """get_status from every target: offline ones are reported, not waited for; ``_sort`` says which of the
        others need a push (and reports those that do not)."""
        statuses = await self.fleet.send_all({"command": "get_status"}, list(self.targets), timeout=self.plan.timeout)
        candidates = []
        for device_id in self.targets:
            status = statuses[device_id]
            if status.status is not Status.OK:
                status.note = "offline at start: not attempted" if status.status is Status.UNREACHABLE \
                    else "preflight get_status failed: not attempted"
                self._finish(status)
            elif self._sort(device_id, status.reply or {}):
                candidates.append(device_id)
        return candidates

    def _sort(self, device_id: str, reply: Dict[str, Any]) -> bool:
        """Whether the device needs a push; one that does not is reported SKIPPED here."""
        fileset = self.targets[device_id]
        modules = {m.get("file"): m for m in reply.get("modules", [])}
        self.before[device_id] = modules
        if "if_version" in reply.get("deploy_features", ()):
            self.applier.checkable.add(device_id)
        self.todo[device_id] = [f for f in fileset.files if modules.get(f.name, {}).get("sha256") != f.sha256]
        if self.todo[device_id]:
            return True
        self.current.append(device_id)
        current = DeviceResult(device_id, Status.SKIPPED, release=fileset.release,
                               note=f"already on release {fileset.release}" if fileset.release and len(fileset.files) > 1
                               else "already at this version")
        if len(fileset.files) == 1:
            module = modules[fileset.files[0].name]
            current.old_version = current.new_version = module.get("sha256")
            current.commands = list(module.get("commands", []))
        self._finish(current)
        return False

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
        return await self.applier.apply(device_id, self.todo[device_id], self.before[device_id],
                                        self.targets[device_id].release)

    async def _roll_back(self) -> None:
        """Put every device this rollout changed, or may have changed, back to what it ran before.

        Each undo names the version this rollout pushed (``if_version``), so the
        agent changes nothing if the device runs something else by then: a push
        that never landed, or a deploy made since.
        """
        applier = self.applier
        targets = [d for d, pushed in applier.pushed.items()
                   if any(not p.unsure or d in applier.checkable for p in pushed)]
        for device_id in sorted(d for d, pushed in applier.pushed.items() if pushed and d not in applier.checkable):
            if applier.unsure(device_id):
                # Without if_version the undo could roll back past what the device ran before: leave it alone.
                self.results[device_id].note = ("sent, but not answered, and this agent is too old to check safely "
                                                 "whether it landed: see fleet status")

        async def undo(device_id: str) -> DeviceResult:
            return await applier.undo(device_id, self.results[device_id])

        await self.fleet.run_each(targets, undo, self._finish)


async def deploy(fleet: Fleet, path: Union[str, Path, Sequence[Union[str, Path]]],
                 targets: Optional[Sequence[str]] = None, plan: Optional[RolloutPlan] = None,
                 on_result: Optional[ResultCallback] = None) -> RolloutReport:
    """Roll the handler file at ``path`` (or the files at several paths) out to ``targets`` (default: every device)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files = FileSet.of(read_handlers(Path(p) for p in paths))
    ids = list(targets) if targets is not None else [d.id for d in fleet.devices]
    return await Rollout(fleet, {device_id: files for device_id in ids}, plan or RolloutPlan(), on_result).run()


__all__ = ["Amount", "FileSet", "Rollout", "RolloutPlan", "RolloutReport", "deploy", "read_handler"]
