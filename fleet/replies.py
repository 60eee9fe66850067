"""What the controller expects devices to answer: a reply is untrusted data until it fits.

A broken or compromised Pi can answer anything. Every reply is checked here,
where it arrives and before anything reads it, against the shape of the
command it answers: each field the controller reads must have the type it
expects. Fields an older agent does not send may be absent; the few the
tables index directly are required. A reply that does not fit makes that one
device ``FAILED`` with ``protocol_error`` and a short description of what did
not fit; the rest of the fleet is served as usual.

The shapes are the wire contract's (``agent/contract.py``): the agent's
tests check its replies against the same ones.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from agent.contract import ANY_COMMAND, SHAPES


def reply_problem(command: str, reply: Dict[str, Any]) -> Optional[str]:
    """What about ``reply`` (to ``command``) does not fit what the controller reads, or None."""
    return SHAPES.get(command.lower(), ANY_COMMAND).problem(reply, "")
