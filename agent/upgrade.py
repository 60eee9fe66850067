"""``upgrade_agent``: stage a new agent bundle for the launcher to try (``agent/launcher.py``).

The bundle (a ``.pyz``, base64 on the wire) is checked first: its sha256,
and with ``--trusted-keys`` its signature (for the name ``pi-agent.pyz``);
then written whole under ``ROOT/.state/agent/bundles/``, and the trial record
is written durably. Only then does the agent answer, and a moment later exit
with status 76: the launcher starts the new bundle and keeps it only if it
comes up. An agent not started by the launcher refuses: nothing would try the
new bundle, or fall back from it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import BadRequest, ChecksumMismatch
from .launcher import BUNDLE_ENV, LAUNCHER_ENV, state_folder, write_durably

BUNDLE_NAME = "pi-agent.pyz"  # the name a bundle's signature is made for


def stage(root: Path, args: Dict[str, Any], trust: Any) -> Dict[str, Any]:
    """Check and stage the bundle in ``args``; what the reply says. Raises ``BadRequest`` and friends."""
    if not os.environ.get(LAUNCHER_ENV):
        raise BadRequest("this agent was not started by pi-agent's launcher (the .deb's unit runs it), so nothing "
                         "would try a new agent or fall back from it: upgrade this device by hand")
    expected = args.get("sha256")
    if not isinstance(expected, str):
        raise BadRequest("'sha256' (hex) of the bundle is required")
    try:
        data = base64.b64decode(str(args.get("bundle")), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'bundle' must be the agent bundle (.pyz), base64") from None
    version = hashlib.sha256(data).hexdigest()
    if version != expected.lower():
        raise ChecksumMismatch(f"the bundle received hashes to {version}, not {expected}: nothing was changed")
    if not data.startswith(b"#!") and not data.startswith(b"PK"):
        raise BadRequest("'bundle' is not an agent bundle (a .pyz from `fleet agent bundle`)")
    if trust is not None:
        trust.keys.verify(BUNDLE_NAME, version, args.get("signature"), args.get("key_id"))
    state = state_folder(root)
    bundle = state / "bundles" / f"{version}.pyz"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    temporary = bundle.with_suffix(".tmp")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, bundle)
    write_durably(state / "trial.json", json.dumps({"bundle": str(bundle), "sha256": version,
                                                    "from": os.environ.get(BUNDLE_ENV)}))
    return {"staged": str(bundle), "sha256": version, "restarting": True,
            "message": "new agent staged: the launcher starts it now and keeps it only if it comes up"}


def running_bundle() -> Optional[Dict[str, Any]]:
    """For ``get_status``: the bundle this agent runs from, when the launcher started it."""
    path = os.environ.get(BUNDLE_ENV)
    return _bundle_at(path) if path else None


@functools.lru_cache(maxsize=1)
def _bundle_at(path: str) -> Dict[str, Any]:
    """Read and hashed once: a bundle never changes under its agent (get_status is asked often)."""
    try:
        with open(path, "rb") as stream:
            return {"path": path, "sha256": hashlib.sha256(stream.read()).hexdigest()}
    except OSError:
        return {"path": path, "sha256": None}
