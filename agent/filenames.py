"""Check 1: the handler file name (the rule itself is the wire's, in ``contract``)."""

from __future__ import annotations

from .contract import handler_name
from .errors import BadRequest


def module_name_from_filename(raw: object) -> str:
    """Check 1: ``NAME.py`` or ``handlers/NAME.py`` with NAME a plain identifier; return NAME."""
    name, why = handler_name(raw)
    if name is None:
        raise BadRequest(why)
    return name
