"""Check 1: the handler file name. Only plain ``NAME.py`` files inside ``handlers/``.

The system the seed documents wrote ``../main.py`` wherever it pointed; here
``..``, absolute paths, other folders, names starting with ``_`` and names
that are not identifiers are refused before anything else happens.
"""

from __future__ import annotations

import keyword
import re

from .errors import BadRequest

_FILENAME = re.compile(r"^(?:handlers/)?([A-Za-z][A-Za-z0-9_]*)\.py$")

def module_name_from_filename(raw: object) -> str:
    """Check 1: ``NAME.py`` or ``handlers/NAME.py`` with NAME a plain identifier; return NAME."""
    if not isinstance(raw, str) or not raw:
        raise BadRequest("'filename' is required, for example \"camera_handlers.py\"")
    match = _FILENAME.match(raw)
    if match is None or keyword.iskeyword(match.group(1)):
        raise BadRequest(f"bad filename {raw!r}: {_why_bad_filename(raw)}")
    return match.group(1)


def _why_bad_filename(raw: str) -> str:
    if "\x00" in raw:
        return "it contains a NUL byte"
    if raw.startswith("/") or raw.startswith("\\") or re.match(r"^[A-Za-z]:", raw):
        return "absolute paths are not allowed; give a plain NAME.py"
    if ".." in raw.replace("\\", "/").split("/"):
        return "'..' is not allowed; handler files live only in handlers/"
    if "/" in raw.replace("\\", "/").replace("handlers/", "", 1):
        return "other folders are not allowed; handler files live only in handlers/"
    if not raw.endswith(".py"):
        return "handler files must end in .py"
    base = raw.rsplit("/", 1)[-1][:-3]
    if base.startswith("_"):
        return "names starting with '_' are reserved"
    return "NAME must be a plain Python identifier (letters, digits, '_'; not starting with a digit or a keyword)"
