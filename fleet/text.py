"""Text that came from a device (or from devices.json) made safe for a terminal: shown, never obeyed.

A device can put terminal escape sequences in any string it sends (its
version, an error, a file name): printed as they are, they recolour, retitle
or clear the operator's terminal, or hide lines of a rollout table. Every
printer builds its output with ``grid`` (tables) and ``lines`` (text under
them), which pass each cell and each line through ``visible``: control
characters, including newlines inside a cell or line, and the Unicode marks
that reorder text are written out as escapes (``\\x1b``). ``--json`` output
needs none of this: JSON escapes them itself, and stays exact.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from tabulate import tabulate

# C0 and C1 controls, DEL, and the bidirectional marks and overrides (which reorder what a line shows).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: Any) -> str:
    """``text`` with every control character written out (``\\x1b``, ``\\n``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, str(text))


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: "re.Match[str]") -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def grid(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A table (tabulate, simple format) whose every text cell is ``visible``."""
    safe = [[visible(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    return tabulate(safe, headers=[visible(h) for h in headers], tablefmt="simple")


def lines(items: Iterable[Any]) -> str:
    """One ``visible`` line per item: a newline a device sent cannot start a line of its own."""
    return "\n".join(visible(item) for item in items)
