"""Rollouts the store remembers: deploy, converge, and rollback to a release.

Every one of them is the same thing underneath: each target device has a
release it should end on, and a ``Rollout`` takes it there in waves. What
differs is where the release comes from:

    deploy      the device's desired release with the given files laid over it: a new release
                (or an identical old one), so a device that missed an earlier deploy gets that too
    converge    the device's desired release, as it stands (and interrupted rollouts finished first)
    rollback    the release named (``--to-release N``), whatever each device ran before

The store records it as it goes: the rollout and its targets first, then each
wave's desired release just before the wave is pushed, each device's result as
it arrives, and the outcome. A halted rollout leaves the devices it did not
reach on their previous desired release (with ``rollback_on_failure``, the
ones it reached too). Devices offline throughout get the new desired release
when the rollout ends without a halt, so a converge brings them up when they
come back. A controller killed half way leaves a rollout with no outcome and
no lock: ``fleet converge`` gives its remaining targets their release and
pushes only to devices not already on it.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .fileset import FileSet, HandlerFile
from .fleet import Fleet, ResultCallback
from .keys import SigningKey
from .results import DeviceResult, Status
from .rollout import Rollout, RolloutPlan, RolloutReport
from .state import StateStore


def deploy_targets(store: StateStore, ids: Sequence[str], files: Sequence[HandlerFile], *, message: str,
                   author: str, key: Optional[SigningKey] = None) -> Dict[str, FileSet]:
    """Each device's release after a deploy of ``files``: its desired release with ``files`` laid over it.

    Devices with the same desired release share one new release; most
    deploys make exactly one. An identical release is reused, not made again.
    """
    desired = store.desired(ids)
    made: Dict[Optional[int], FileSet] = {}
    targets = {}
    for device_id in ids:
        base = desired.get(device_id)
        if base not in made:
            contents = {name: store.content(sha) for name, sha in (store.release(base).files if base else {}).items()}
            contents.update({f.name: f.code.encode("utf-8") for f in files})
            release, _ = store.record_release(contents, message=message, author=author)
            made[base] = fileset_of(store, release.number, key)
        targets[device_id] = made[base]
    return targets


def fileset_of(store: StateStore, number: int, key: Optional[SigningKey] = None) -> FileSet:
    """Release ``number``'s files, each with its signature (made now with ``key`` where it has none by it)."""
    files = store.release(number).files
    if key is not None:
        for name, sha in files.items():
            signed = store.signature(name, sha, prefer=key.key_id)
            if signed is None or signed[0] != key.key_id:
                store.add_signature(name, sha, key.key_id, key.sign(name, sha))
    prefer = key.key_id if key is not None else None
    return FileSet.from_release(number, files, store.content, lambda name, sha: store.signature(name, sha, prefer))


def desired_targets(store: StateStore, ids: Iterable[str], cache: Optional[Dict[int, FileSet]] = None,
                    key: Optional[SigningKey] = None) -> Dict[str, FileSet]:
    """Each device's desired release, for the devices that have one. ``cache`` keeps the releases read
    (they never change) for the next call: a watch reads each release once, not once per device."""
    cache = {} if cache is None else cache
    targets = {}
    for device_id, number in store.desired(ids).items():
        if number not in cache:
            cache[number] = fileset_of(store, number, key)
        targets[device_id] = cache[number]
    return targets


async def run_recorded(fleet: Fleet, store: StateStore, kind: str, targets: Mapping[str, FileSet],
                       plan: RolloutPlan, on_result: Optional[ResultCallback] = None, *,
                       record_idle: bool = True) -> RolloutReport:
    """Run a rollout of ``targets`` and keep it in ``store`` as it goes (see the module's docstring).

    The record starts at the rollout's first change (its first wave, or a
    device that did not answer); with ``record_idle`` False, a rollout that
    found every device already on its release leaves no record at all.
    """
    recorder = _Recorder(store, kind, targets, plan)

    def recorded(result: DeviceResult) -> None:
        recorder.result(result)
        if on_result is not None:
            on_result(result)

    # With the first wave, the devices already on their release have it as their desired release too.
    runner = Rollout(fleet, targets, plan, recorded, on_wave=lambda wave: recorder.give([*runner.current, *wave]))
    report = await runner.run()
    if report.halted:
        if plan.rollback_on_failure and recorder.rollout is not None:
            store.restore_desired(recorder.rollout, recorder.given)
    elif recorder.rollout is not None or record_idle:
        recorder.give(targets)  # the devices that were offline: a converge brings them up when they return
    if recorder.rollout is not None:
        store.finish_rollout(recorder.rollout, outcome(report))
    report.rollout = recorder.rollout
    from .broker_desired import leave_desired  # here: that module builds on this one

    report.desired_problems = await leave_desired(fleet, store, list(targets))  # for devices behind a broker
    return report


class _Recorder:
    """One rollout's record in the store: started at its first change, each result kept as it arrives."""

    def __init__(self, store: StateStore, kind: str, targets: Mapping[str, FileSet], plan: RolloutPlan) -> None:
        self.store, self.kind, self.targets, self.plan = store, kind, targets, plan
        self.rollout: Optional[int] = None
        self.given: Dict[str, None] = {}  # devices whose desired release this rollout set, in order
        self._waiting: List[DeviceResult] = []  # results of devices already current, before the record starts

    def start(self) -> int:
        if self.rollout is None:
            targets = self.targets
            names = sorted({name for fileset in targets.values() for name in fileset.names})
            releases = sorted({fileset.release for fileset in targets.values() if fileset.release})
            versions = {f.sha256 for fileset in targets.values() for f in fileset.files}
            self.rollout = self.store.start_rollout(
                kind=self.kind, file=", ".join(names), version=versions.pop() if len(versions) == 1 else "",
                release=releases[0] if len(releases) == 1 else None, plan={**vars(self.plan), "releases": releases},
                targets={d: f.release for d, f in targets.items() if f.release})
            for result in self._waiting:
                self._keep(result)
        return self.rollout

    def give(self, devices: Iterable[str]) -> None:
        rollout = self.start()
        fresh = [d for d in devices if d not in self.given]
        self.store.set_desired({d: self.targets[d].release for d in fresh}, rollout)
        self.given.update(dict.fromkeys(fresh))

    def result(self, result: DeviceResult) -> None:
        """Kept as it arrives, before its progress line: a kill loses none."""
        if self.rollout is None and result.status is Status.SKIPPED:
            self._waiting.append(result)
            return
        self.start()
        self._keep(result)

    def _keep(self, result: DeviceResult) -> None:
        assert self.rollout is not None
        self.store.record_result(self.rollout, result.device_id, result.status.value, old_version=result.old_version,
                                 new_version=result.new_version, detail=result.error or result.note)


def outcome(report: RolloutReport) -> str:
    return f"halted: {report.halt_reason}" if report.halted else (report.tally() or "no devices")


async def converge(fleet: Fleet, store: StateStore, ids: Sequence[str], plan: RolloutPlan,
                   on_result: Optional[ResultCallback] = None, key: Optional[SigningKey] = None) -> "ConvergeReport":
    """Bring each of ``ids`` that has a desired release to it, finishing interrupted rollouts first."""
    adopted = store.adopt_interrupted(by="fleet converge")
    targets = desired_targets(store, ids, key=key)
    unmanaged = [d for d in ids if d not in targets]
    report = await run_recorded(fleet, store, "converge", targets, plan, on_result) if targets else None
    return ConvergeReport(report, adopted, unmanaged)


class ConvergeReport:
    """A converge's rollout (None when no device has a desired release), and what it found to do first."""

    def __init__(self, rollout: Optional[RolloutReport], adopted: Dict[int, List[str]], unmanaged: List[str]) -> None:
        self.rollout = rollout
        self.adopted = adopted  # interrupted rollout -> the devices it gave their release
        self.unmanaged = unmanaged  # targets with no desired release: nothing to converge to

    @property
    def ok(self) -> bool:
        return self.rollout is None or self.rollout.ok
