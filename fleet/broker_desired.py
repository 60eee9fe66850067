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

import json
from typing import Dict, Sequence

from agent import contract

from .converge import desired_targets
from .errors import DeviceError
from .fileset import FileSet
from .fleet import Fleet
from .state import StateStore


def desired_message(fileset: FileSet) -> bytes:
    files = {f.name: {"sha256": f.sha256, **({"signature": f.signature, "key_id": f.key_id} if f.signature else {})}
             for f in fileset.files}
    return json.dumps({"release": fileset.release, "files": files}, sort_keys=True).encode()


async def leave_desired(fleet: Fleet, store: StateStore, ids: Sequence[str]) -> Dict[str, str]:
    """Publish the desired release of each of ``ids`` that is reached through a broker; per device that could
    not be given it, why (its broker is unreachable: the next converge tries again)."""
    behind = [d for d in ids if fleet.broker_session(d) is not None]
    problems: Dict[str, str] = {}
    sessions = set()
    for device_id, fileset in desired_targets(store, behind).items():
        session = fleet.broker_session(device_id)
        assert session is not None
        try:
            await session.connect()
            for file in fileset.files:
                if file.sha256 not in session.blobs_published:
                    session.publish(contract.blob_topic(file.sha256), file.code.encode("utf-8"), retain=True)
                    session.blobs_published.add(file.sha256)
            session.publish(contract.device_topic(device_id, contract.DESIRED_TOPIC), desired_message(fileset),
                            retain=True)
        except DeviceError as exc:
            problems[device_id] = exc.message
        sessions.add(session)
    for session in sessions:
        await session.flush()
    return problems
