"""Each broker device's desired release, left in its broker: what it converges to with no controller running.

After every rollout the store remembers (deploy, converge, rollback to a
release), the desired release of each device behind a broker is published
retained at ``pifleet/ID/desired``, with each file's code retained once at
``pifleet/blobs/SHA256`` for every device that runs it. A device offline at
the time gets it from the broker when it connects (``agent/desired.py``);
one that was just pushed finds it already runs it. Publishing it again is
harmless, so ``fleet converge`` does it for every device: a broker that lost
its retained messages gets them back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Dict, List, Sequence

from agent import contract

from .converge import desired_targets
from .errors import DeviceError
from .fileset import FileSet
from .fleet import Fleet
from .state import StateStore

log = logging.getLogger(__name__)


def desired_message(fileset: FileSet) -> bytes:
    files = {f.name: {"sha256": f.sha256, **({"signature": f.signature, "key_id": f.key_id} if f.signature else {})}
             for f in fileset.files}
    return json.dumps({"release": fileset.release, "files": files}, sort_keys=True).encode()


async def leave_desired(fleet: Fleet, store: StateStore, ids: Sequence[str]) -> Dict[str, str]:
    """Publish the desired release of each of ``ids`` that is reached through a broker, and wait for the broker to
    acknowledge it; a broker that stops acknowledging gets a new connection and a second try. Per device that
    could not be given it, why (the next ``fleet converge`` tries again)."""
    behind = [d for d in ids if fleet.broker_session(d) is not None]
    targets = desired_targets(store, behind)
    problems = await _publish(fleet, targets)
    if problems:
        log.warning("the broker did not take the desired release of %d device(s) (%s): connecting again",
                    len(problems), next(iter(problems.values())))
        for session in {s for s in map(fleet.broker_session, problems) if s is not None}:
            try:
                await session.reconnect()
            except DeviceError:
                pass
        problems = await _publish(fleet, {d: targets[d] for d in problems})
    return problems


async def _publish(fleet: Fleet, targets: Dict[str, FileSet]) -> Dict[str, str]:
    problems: Dict[str, str] = {}
    sends: Dict[str, List["asyncio.Future[None]"]] = {}
    for device_id, fileset in targets.items():
        session = fleet.broker_session(device_id)
        assert session is not None
        try:
            await session.connect()
            sends[device_id] = [session.publish_blob(f.sha256, f.code.encode("utf-8")) for f in fileset.files]
            sends[device_id].append(session.publish(contract.device_topic(device_id, contract.DESIRED_TOPIC),
                                                    desired_message(fileset), retain=True))
        except DeviceError as exc:
            problems[device_id] = exc.message
    for device_id, waiting in sends.items():
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if isinstance(failed, asyncio.CancelledError):
            problems[device_id] = "the connection to the broker dropped before it acknowledged it"
        elif failed is not None:
            problems[device_id] = f"the broker did not acknowledge it: {failed}"
    return problems
