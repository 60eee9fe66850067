"""Handler source: one set of bytes, one decoding, one text that everything uses.

The checks, the isolated import test and the real load must all see the same
program. Python reads *bytes* through a PEP 263 coding declaration, but reads
a *str* as it is: a file declaring ``# -*- coding: utf_7 -*-`` is a comment to
anything that decodes it as UTF-8 and code to anything that compiles its
bytes. So the agent decodes a handler's bytes once, here, by one rule (UTF-8,
and any other declared encoding is refused), and every later step compiles
the resulting text, never the bytes.
"""

from __future__ import annotations

import re

from .errors import ValidationFailed

_BOM = "\ufeff"
# PEP 263: a comment on line 1 or 2 that contains coding: NAME or coding=NAME.
_COOKIE = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_BLANK_OR_COMMENT = re.compile(r"^[ \t\f]*(?:[#\r\n]|$)")


def decode_source(name: str, data: bytes) -> str:
    """The text of handler ``name`` from its bytes; ``ValidationFailed`` if it is not plain UTF-8.

    A UTF-8 byte-order mark is dropped (Python drops it too). The error says
    what to change, in the seed's ``Code validation failed: ...`` shape.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"Code validation failed: {name}.py is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith(_BOM):
        text = text[len(_BOM):]
    declared = declared_encoding(text)
    if declared is not None and not _is_utf8(declared):
        raise ValidationFailed(
            f"Code validation failed: {name}.py declares the encoding {declared!r}; handler code must be "
            "UTF-8: remove the coding line or make it '# -*- coding: utf-8 -*-'")
    return text


def declared_encoding(text: str) -> "str | None":
    """The encoding a PEP 263 declaration on line 1 or 2 names, or None."""
    lines = text.split("\n", 2)[:2]
    for number, line in enumerate(lines):
        match = _COOKIE.match(line)
        if match is not None:
            return match.group(1)
        if number == 0 and not _BLANK_OR_COMMENT.match(line):
            return None  # line 2 counts only below a blank or comment-only line 1
    return None


def _is_utf8(encoding: str) -> bool:
    """The names Python itself reads as UTF-8 (its tokenizer's normalisation)."""
    normal = encoding.lower().replace("_", "-")
    return normal in ("utf-8", "utf8") or normal.startswith("utf-8-")
