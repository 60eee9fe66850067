"""The static checks on pushed handler code: syntax, dangerous calls, protected
imports and dependencies (checks 2 to 5 of the deploy pipeline; check 1, the
filename, is ``filenames``; the import and runtime tests run in a box, see
``isolation``). The pipeline imports this module when it first checks code:
the lint is the largest part of the agent, and most starts never need it.

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
import threading

from .filenames import module_name_from_filename
from .lint import Scanner
from .report import CheckReport, Issue

__all__ = ["CheckReport", "Issue", "check_code", "module_name_from_filename"]

# The agent's own packages, and the names the seed's agent used for its core.
PROTECTED_PACKAGES = frozenset({"agent", "core"})

# ast.parse is not safe to call from two threads at once on CPython 3.11 and
# some 3.12 releases: the AST constructor keeps its recursion depth in shared
# interpreter state, and concurrent parses fail with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905). Deploys of
# different files run checks in parallel worker threads, so parses take turns.
_PARSE_LOCK = threading.Lock()

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
