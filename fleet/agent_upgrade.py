"""``fleet agent upgrade``: a new agent bundle to the fleet, in waves, with the plan, limits and table of a deploy.

Each device gets the bundle (``upgrade_agent``; signed with the release key
where there is one), its agent exits for the launcher (``agent/launcher.py``),
and the controller waits for the device to answer again: on the new bundle it
is ``OK``; back on the previous one (the new agent did not come up, and the
launcher returned to the old) it is ``FAILED``, and failures count against
``--max-failures`` as in a deploy, so a bad bundle stops at the canary. It
reuses ``Rollout``'s waves and halts; only the preflight and the push differ.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from agent.protocol import encode_shared_request
from agent.upgrade import BUNDLE_NAME

from .fileset import FileSet, HandlerFile
from .fleet import Fleet, ResultCallback, attempt
from .keys import SigningKey
from .results import DeviceResult, Status
from .rollout import Rollout, RolloutPlan, RolloutReport

POLL = 0.25  # seconds between looks at a device that is switching agents
SETTLE = 3.0  # after it answers on the new agent, look again this much later (the launcher's own check is 2 s)


class AgentUpgrade(Rollout):
    """A rollout whose one "file" is the agent bundle; see the module's docstring."""

    def __init__(self, fleet: Fleet, bundle: bytes, targets: Sequence[str], plan: RolloutPlan,
                 on_result: Optional[ResultCallback] = None, key: Optional[SigningKey] = None) -> None:
        self.bundle_sha = hashlib.sha256(bundle).hexdigest()
        marker = FileSet.of([HandlerFile(BUNDLE_NAME, "", self.bundle_sha)])
        super().__init__(fleet, {device_id: marker for device_id in targets}, plan, on_result)
        request: Dict[str, Any] = {"command": "upgrade_agent", "bundle": base64.b64encode(bundle).decode("ascii"),
                                   "sha256": self.bundle_sha}
        if key is not None:
            request.update(signature=key.sign(BUNDLE_NAME, self.bundle_sha), key_id=key.key_id)
        self._body = encode_shared_request(request)
        self.wait_limit = max(plan.timeout or 0.0, 120.0)

    def _sort(self, device_id: str, reply: Dict[str, Any]) -> bool:
        running = (reply.get("bundle") or {}).get("sha256")
        if running == self.bundle_sha:
            self.current.append(device_id)
            self._finish(DeviceResult(device_id, Status.SKIPPED, old_version=running, new_version=running,
                                      note="already runs this agent"))
            return False
        self.before[device_id] = {"bundle": {"sha256": running, "started_at": reply.get("started_at")}}
        return True

    async def _push(self, device_id: str) -> DeviceResult:
        started = time.perf_counter()
        before = self.before[device_id]["bundle"]
        result = await attempt(self.fleet.send_encoded(device_id, self._body, "upgrade_agent",
                                                       timeout=self.plan.timeout), device_id, self.fleet.device(device_id))
        result.old_version = before["sha256"]
        if result.status is Status.OK:
            await self._wait_for_the_switch(device_id, result, before.get("started_at"))
        result.seconds = time.perf_counter() - started
        return result

    async def _status(self, device_id: str) -> Optional[Dict[str, Any]]:
        status = await attempt(self.fleet.send(device_id, {"command": "get_status"}, timeout=5.0), device_id)
        return status.reply if status.status is Status.OK else None

    async def _wait_for_the_switch(self, device_id: str, result: DeviceResult, old_start: Any) -> None:
        """Until an agent other than the one that took the upgrade answers (it says when it started): on the
        new bundle, and still there a moment later, it is done; on any other, the launcher went back."""
        deadline = time.monotonic() + self.wait_limit
        while time.monotonic() < deadline:
            reply = await self._status(device_id)
            if reply is None or reply.get("started_at") == old_start:
                await asyncio.sleep(POLL)  # still the old agent, or none yet
                continue
            running = (reply.get("bundle") or {}).get("sha256")
            if running == self.bundle_sha:
                await asyncio.sleep(SETTLE)  # the launcher keeps it only if it stays up
                again = await self._status(device_id)
                if again is not None and again.get("started_at") == reply.get("started_at"):
                    result.new_version, result.changed = running, True
                    result.note = f"agent {again.get('agent_version')} running"
                    return
                continue  # it went down again: see what the launcher does next
            result.status, result.code, result.new_version = Status.FAILED, "agent_not_up", running
            result.error = ("the new agent did not come up; the launcher went back to the previous one "
                            "(its history: ROOT/.state/agent/history.jsonl)")
            return
        result.status, result.code = Status.TIMEOUT, "timeout"
        result.error = f"the device did not answer on any agent within {self.wait_limit:g} s of the upgrade"

    async def _roll_back(self) -> None:
        """An upgraded device stays upgraded after a halt: its new agent came up. Nothing to undo."""


async def upgrade(fleet: Fleet, bundle: Path, targets: Sequence[str], plan: RolloutPlan,
                  on_result: Optional[ResultCallback] = None, key: Optional[SigningKey] = None) -> RolloutReport:
    return await AgentUpgrade(fleet, Path(bundle).read_bytes(), targets, plan, on_result, key).run()
