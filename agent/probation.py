"""Probation: watching a freshly deployed module for bugs that only show up at runtime.

For a while after a deploy (by default 10 minutes or 50 calls, whichever ends
first) every call to the new module's handlers is counted. If enough of them
*fail* (raise, time out, return something that is not a JSON object; a
handler that answers ``success: false`` has not failed), the watch fires and
recovery rolls the module back to what ran before, without anyone having
to send ``rollback_handler``. That is the seed's "bug that only shows up at
runtime", caught on the device.

All methods run on the event loop thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .errors import BadRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbationRule:
    seconds: float
    calls: int
    failures: int

    def as_dict(self) -> Dict[str, Any]:
        return {"seconds": self.seconds, "calls": self.calls, "failures": self.failures}


@dataclass
class Watch:
    name: str
    version: str
    backup: Optional[str]  # what to go back to; None when the module is new
    rule: ProbationRule
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    calls: int = 0
    failures: int = 0
    last_error: Optional[str] = None

    def expired(self, now: float) -> bool:
        return now - self.started >= self.rule.seconds

    def as_dict(self) -> Dict[str, Any]:
        return {
            "file": f"{self.name}.py",
            "version": self.version,
            "started_at": self.started_at,
            "seconds_left": max(0.0, round(self.rule.seconds - (time.monotonic() - self.started), 1)),
            "calls": self.calls,
            "failures": self.failures,
            "last_error": self.last_error,
            "rule": self.rule.as_dict(),
        }


class Probation:
    def __init__(self, default: ProbationRule, on_failed: Callable[[Watch], None]) -> None:
        self.default = default
        self._on_failed = on_failed
        self.watches: Dict[str, Watch] = {}

    def rule_from(self, value: Any) -> Optional[ProbationRule]:
        """The rule a push asks for: absent or ``true`` = default, ``false`` = none, or an object."""
        if value is None or value is True:
            return self.default
        if value is False:
            return None
        if not isinstance(value, dict):
            raise BadRequest("'probation' must be true, false, or {\"seconds\": s, \"calls\": n, \"failures\": n}")
        unknown = set(value) - {"seconds", "calls", "failures"}
        if unknown:
            raise BadRequest(f"'probation' has unknown keys: {', '.join(sorted(unknown))}")
        seconds = value.get("seconds", self.default.seconds)
        calls = value.get("calls", self.default.calls)
        failures = value.get("failures", self.default.failures)
        for key, number in (("seconds", seconds), ("calls", calls), ("failures", failures)):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
                raise BadRequest(f"'probation.{key}' must be a positive number, got {number!r}")
        return ProbationRule(float(seconds), int(calls), int(failures))

    def start(self, name: str, version: str, backup: Optional[str], rule: Optional[ProbationRule]) -> Optional[Watch]:
        self.watches.pop(name, None)
        if rule is None:
            return None
        watch = Watch(name=name, version=version, backup=backup, rule=rule)
        self.watches[name] = watch
        return watch

    def stop(self, name: str) -> None:
        self.watches.pop(name, None)

    def record(self, module_name: str, command: str, error: Optional[str]) -> None:
        """Dispatcher listener: one handler call of ``module_name`` ended, failed if ``error``."""
        watch = self.watches.get(module_name)
        if watch is None:
            return
        if watch.expired(time.monotonic()):
            self._passed(watch)
            return
        watch.calls += 1
        if error is not None:
            watch.failures += 1
            watch.last_error = f"{command}: {error}"
            if watch.failures >= watch.rule.failures:
                del self.watches[module_name]
                log.warning("%s.py failed probation: %d of %d calls failed", module_name, watch.failures, watch.calls)
                self._on_failed(watch)
                return
        if watch.calls >= watch.rule.calls:
            self._passed(watch)

    def _passed(self, watch: Watch) -> None:
        self.watches.pop(watch.name, None)
        log.info("%s.py passed probation (%d calls, %d failures)", watch.name, watch.calls, watch.failures)

    def status(self) -> List[Dict[str, Any]]:
        now = time.monotonic()
        for watch in [w for w in self.watches.values() if w.expired(now)]:
            self._passed(watch)
        return [self.watches[name].as_dict() for name in sorted(self.watches)]
