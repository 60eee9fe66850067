"""The static checks on pushed handler code: filename, syntax, dangerous calls,
protected imports and dependencies (checks 1 to 5 of the deploy pipeline; the
import and runtime tests run in a separate process, see ``isolation``).

These checks catch *mistakes*: a handler that shells out with ``shell=True``,
a copy-pasted ``rm -rf``, an import of the agent's own internals, a module
that is not installed on the device. They are not a sandbox, and a determined
author can always write Python that a static check misses. What keeps
strangers from pushing code at all is the agent's token.

Dangerous calls are found on the syntax tree, not by substring: import
aliases and ``from`` imports are resolved (``import os as o; o.system(...)``
and ``from os import system as s; s(...)`` are both ``os.system``), as are
simple re-bindings (``run = os.system``) and ``getattr(os, "system")``.
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
from typing import Any, Dict, Iterable, List, Optional, Set

from .errors import BadRequest

# The agent's own packages, and the names the seed's agent used for its core.
PROTECTED_PACKAGES = frozenset({"agent", "core"})

# ast.parse is not safe to call from two threads at once on CPython 3.11 and
# some 3.12 releases: the AST constructor keeps its recursion depth in shared
# interpreter state, and concurrent parses fail with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905). Deploys of
# different files run checks in parallel worker threads, so parses take turns.
_PARSE_LOCK = threading.Lock()

_FILENAME = re.compile(r"^(?:handlers/)?([A-Za-z][A-Za-z0-9_]*)\.py$")

BLOCKED_CALLS = frozenset({
    "os.system", "os.popen", "os.fork", "os.forkpty",
    "eval", "exec", "compile", "__import__",
    "importlib.import_module", "importlib.__import__",
    "pickle.loads", "pickle.load", "_pickle.loads", "_pickle.load",
    "subprocess.getoutput", "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell", "pty.spawn",
})
BLOCKED_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
SHELL_CAPABLE = frozenset({
    "subprocess.run", "subprocess.call", "subprocess.check_call",
    "subprocess.check_output", "subprocess.Popen",
})
REMOVERS = frozenset({"shutil.rmtree", "os.remove", "os.unlink", "os.rmdir", "os.removedirs"})
BLOCKED_MODULES = frozenset({"ctypes", "_ctypes"})
ATTRIBUTE_FUNCS = frozenset({"getattr", "setattr", "delattr"})
# Module names that are the same module under another name.
_SAME_MODULE = {"posix": "os", "builtins": "", "__builtins__": ""}

_RM_FLAG = re.compile(r"^-(?:[a-zA-Z]*[rR][a-zA-Z]*|-recursive)$")
_RM_STRING = re.compile(
    r"(?:^|[\s;&|(`])(?:/usr)?(?:/bin/)?rm\s+(?:-\S+\s+)*?(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(?:\s|$)"
)
_STAR_BLOCKED = frozenset({"os", "posix", "subprocess", "shutil", "pickle", "importlib", "builtins", "pty"})
_IMPORT_GUARDS = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


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


@dataclass(frozen=True)
class Issue:
    check: str  # "syntax", "dangerous", "protected_import", "dependency", "runtime", "style"
    message: str
    line: Optional[int] = None

    def text(self) -> str:
        return f"{self.message} (line {self.line})" if self.line else self.message

    def as_dict(self) -> Dict[str, object]:
        return {"check": self.check, "message": self.message, "line": self.line}


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
    scanner = _Scanner()
    scanner.scan(tree)
    report.errors.extend(scanner.errors)
    report.warnings.extend(scanner.warnings)
    _check_dependencies(scanner, report)
    return report


def _check_dependencies(scanner: "_Scanner", report: CheckReport) -> None:
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


class _Scanner(ast.NodeVisitor):
    """One walk over the tree: resolves names and records what it finds."""

    def __init__(self) -> None:
        self.aliases: Dict[str, str] = {}
        self.errors: List[Issue] = []
        self.warnings: List[Issue] = []
        self.required_imports: Dict[str, int] = {}
        self.optional_imports: Dict[str, int] = {}
        self._guarded_depth = 0
        self._async_depth = 0
        self._seen: Set[tuple] = set()
        self._call_funcs: Set[int] = set()
        self._docstrings: Set[int] = set()

    def scan(self, tree: ast.AST) -> None:
        self._collect_aliases(tree)
        self.visit(tree)

    # Pass 1: what each name stands for

    def _collect_aliases(self, tree: ast.AST) -> None:
        rebindings = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
                    else:
                        root = alias.name.split(".")[0]
                        self.aliases[root] = root
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    if alias.name != "*":
                        self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                self._docstrings.add(id(node.value))
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, (ast.Name, ast.Attribute, ast.Call))):
                rebindings.append(node)
        # Simple re-bindings (``run = os.system``), to a fixed point (chains of up to three).
        for _ in range(3):
            for node in rebindings:
                target = self.resolve(node.value)
                if target is not None and ("." in target or target in BLOCKED_CALLS):
                    self.aliases[node.targets[0].id] = target  # type: ignore[attr-defined]

    def resolve(self, node: ast.AST) -> Optional[str]:
        """The dotted name an expression refers to, as far as the aliases tell, else None."""
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return _normalise(self.aliases[node.id])
            if node.id == "__builtins__":
                return "builtins"
            return node.id if node.id in BLOCKED_CALLS or node.id in ATTRIBUTE_FUNCS else None
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is None:
                return None
            return _normalise(f"{base}.{node.attr}" if base else node.attr)
        if isinstance(node, ast.Call) and self.resolve(node.func) == "getattr" and len(node.args) >= 2:
            name = node.args[1]
            base = self.resolve(node.args[0])
            if base is not None and isinstance(name, ast.Constant) and isinstance(name.value, str):
                return _normalise(f"{base}.{name.value}" if base else name.value)
        return None

    # Pass 2: the findings

    def _error(self, message: str, node: ast.AST, check: str = "dangerous") -> None:
        line = getattr(node, "lineno", None)
        key = (message, line)
        if key not in self._seen:
            self._seen.add(key)
            self.errors.append(Issue(check, message, line))

    def _dangerous(self, what: str, node: ast.AST) -> None:
        self._error(f"Dangerous pattern detected: {what}", node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_import(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._error("Relative imports are not supported in handler modules", node, "protected_import")
            return
        module = node.module or ""
        self._check_import(module, node)
        for alias in node.names:
            # A star import hides which names it binds, so aliases cannot be resolved.
            if alias.name == "*" and module.split(".")[0] in _STAR_BLOCKED:
                self._dangerous(f"from {module} import *", node)

    def _check_import(self, dotted: str, node: ast.AST) -> None:
        root = dotted.split(".")[0]
        if root in PROTECTED_PACKAGES:
            self._error(
                f"Protected import detected: {dotted} (the agent's own code cannot be imported by handlers)",
                node, "protected_import",
            )
            return
        if root in BLOCKED_MODULES:
            self._dangerous(f"import {dotted}", node)
        imports = self.optional_imports if self._guarded_depth else self.required_imports
        imports.setdefault(root, getattr(node, "lineno", 0))

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(handler) for handler in node.handlers)
        if guarded:
            self._guarded_depth += 1
        for stmt in node.body:
            self.visit(stmt)
        if guarded:
            self._guarded_depth -= 1
        for part in node.handlers + node.orelse + node.finalbody:
            self.visit(part)

    def visit_TryStar(self, node: Any) -> None:  # except* (3.11+): same rules
        self.visit_Try(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._async_depth += 1
        self.generic_visit(node)
        self._async_depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        depth, self._async_depth = self._async_depth, 0
        self.generic_visit(node)
        self._async_depth = depth

    def visit_Call(self, node: ast.Call) -> None:
        self._call_funcs.add(id(node.func))
        name = self.resolve(node.func)
        if name is not None:
            self._check_call(name, node)
        self.generic_visit(node)

    def _check_call(self, name: str, node: ast.Call) -> None:
        if name in BLOCKED_CALLS or _is_blocked_prefix(name):
            self._dangerous(f"{name}(", node)
        elif name in SHELL_CAPABLE and _shell_true(node):
            self._dangerous(f"{name}(shell=True)", node)
        elif name in REMOVERS and node.args and _rooted_literal(node.args[0]):
            self._dangerous(f"{name}({node.args[0].value!r})", node)  # type: ignore[attr-defined]
        elif name in ATTRIBUTE_FUNCS and node.args:
            target = self.resolve(node.args[0])
            literal = len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
            if name == "setattr" and target == "builtins":
                self._dangerous("write to builtins", node)
            elif target is not None and not literal and target.split(".")[0] in self._module_roots():
                self._dangerous(f"{name}({target}, <computed name>)", node)
        elif name == "time.sleep" and self._async_depth:
            self.warnings.append(Issue(
                "style", "time.sleep( in an async handler blocks the agent's event loop; use await asyncio.sleep(",
                node.lineno,
            ))

    def _module_roots(self) -> Set[str]:
        return {target.split(".")[0] for target in self.aliases.values()} | {"builtins"}

    def visit_Name(self, node: ast.Name) -> None:
        self._check_reference(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_reference(node)
        if isinstance(node.ctx, (ast.Store, ast.Del)) and self.resolve(node.value) == "builtins":
            self._dangerous("write to builtins", node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            target = self.resolve(node.value)
            if target in ("builtins", "builtins.__dict__", "__dict__"):
                self._dangerous("write to builtins", node)
        self.generic_visit(node)

    def _check_reference(self, node: ast.AST) -> None:
        """A blocked function passed around without being called (``Thread(target=os.system)``)."""
        if id(node) in self._call_funcs or not isinstance(getattr(node, "ctx", None), ast.Load):
            return
        name = self.resolve(node)
        if name is not None and (name in BLOCKED_CALLS or _is_blocked_prefix(name)):
            self._dangerous(f"{name}(", node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self._docstrings and _RM_STRING.search(node.value):
            self._dangerous("rm -rf", node)

    def visit_List(self, node: ast.List) -> None:
        self._check_rm_list(node.elts, node)
        self.generic_visit(node)

    def visit_Tuple(self, node: ast.Tuple) -> None:
        self._check_rm_list(node.elts, node)
        self.generic_visit(node)

    def _check_rm_list(self, elts: Iterable[ast.expr], node: ast.AST) -> None:
        words = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None for e in elts]
        for i, word in enumerate(words):
            if word is not None and (word == "rm" or word.endswith("/rm")):
                if any(w is not None and _RM_FLAG.match(w) for w in words[i + 1:]):
                    self._dangerous("rm -rf", node)
                return


def _normalise(dotted: str) -> str:
    root, _, rest = dotted.partition(".")
    if root in _SAME_MODULE:
        replacement = _SAME_MODULE[root]
        if not rest:
            return "builtins" if replacement == "" else replacement
        return f"{replacement}.{rest}" if replacement else rest
    return dotted


def _is_blocked_prefix(name: str) -> bool:
    return name.startswith(BLOCKED_PREFIXES)


def _shell_true(node: ast.Call) -> bool:
    for keyword_arg in node.keywords:
        if keyword_arg.arg == "shell":
            value = keyword_arg.value
            return not (isinstance(value, ast.Constant) and not value.value)
    return False


def _rooted_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in _IMPORT_GUARDS for t in types)
