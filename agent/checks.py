"""The static checks on pushed handler code: filename, syntax, dangerous calls,
protected imports and dependencies (checks 1 to 5 of the deploy pipeline; the
import and runtime tests run in a separate process, see ``isolation``).

These checks catch *mistakes*: a handler that shells out with ``shell=True``,
a copy-pasted ``rm -rf``, an import of the agent's own internals, a module
that is not installed on the device. They are not a sandbox, and a determined
author can always write Python that a static check misses. What keeps
strangers from pushing code at all is the agent's token.

Dangerous calls are found on the syntax tree, not by substring (``lint``,
with its name resolution in ``lint_names`` and its rules in ``lint_rules``).
A comment or a string that merely mentions ``os.system`` is not a call and
passes.
"""

from __future__ import annotations

import ast
import importlib.util
import keyword
import re
import threading
from dataclasses import dataclass, field
from typing import Dict, List

from .errors import BadRequest
from .lint import Issue, Scanner

__all__ = ["CheckReport", "Issue", "check_code", "module_name_from_filename"]

# The agent's own packages, and the names the seed's agent used for its core.
PROTECTED_PACKAGES = frozenset({"agent", "core"})

# ast.parse is not safe to call from two threads at once on CPython 3.11 and
# some 3.12 releases: the AST constructor keeps its recursion depth in shared
# interpreter state, and concurrent parses fail with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905). Deploys of
# different files run checks in parallel worker threads, so parses take turns.
_PARSE_LOCK = threading.Lock()

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


@dataclass
class CheckReport:
    """What the checks found. ``errors`` refuse the push; ``warnings`` are reported only."""

    errors: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors

    def details(self) -> Dict[str, object]:
        """The ``validation_details`` reply field: the seed's three keys, plus structured issues."""
        return {
            "valid": self.valid,
            "errors": [issue.text() for issue in self.errors],
            "warnings": [issue.text() for issue in self.warnings],
            "issues": [issue.as_dict() for issue in self.errors + self.warnings],
        }


def check_code(code: str, path: str) -> CheckReport:
    """Checks 2 to 5 on the source text. Never raises for bad code: it reports."""
    report = CheckReport()
    try:
        with _PARSE_LOCK:
            tree = ast.parse(code, filename=path)
    except SyntaxError as exc:
        report.errors.append(Issue("syntax", f"Syntax Error at line {exc.lineno}: {exc.msg}", exc.lineno))
        return report
    except ValueError as exc:  # e.g. NUL bytes in the source
        report.errors.append(Issue("syntax", f"Syntax Error: {exc}"))
        return report
    scanner = Scanner(PROTECTED_PACKAGES)
    scanner.scan(tree)
    report.errors.extend(scanner.errors)
    report.warnings.extend(scanner.warnings)
    _check_dependencies(scanner, report)
    return report


def _check_dependencies(scanner: Scanner, report: CheckReport) -> None:
    for name in sorted(scanner.required_imports):
        if name in PROTECTED_PACKAGES or _module_exists(name):
            continue
        report.errors.append(
            Issue("dependency", f"Missing dependency: module {name!r} is not installed on this device "
                  "(install it there, or import it inside try/except ImportError if the handler can do without)",
                  scanner.required_imports[name])
        )
    for name in sorted(scanner.optional_imports):
        if name not in scanner.required_imports and not _module_exists(name):
            report.warnings.append(
                Issue("dependency", f"Optional module {name!r} is not installed on this device",
                      scanner.optional_imports[name])
            )


def _module_exists(name: str) -> bool:
    if name == "__future__":
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
