"""Check 2, dangerous code, and the import census for checks 3 and 4: one walk over the syntax tree.

This catches the *mistakes* people make: a copy-pasted ``shell=True``, a
``sh -c`` hidden in an argument list, an ``rm -rf`` on a variable. It is not a
sandbox, and a determined author can write Python it misses: the box and
crash-safe activation are what stand between pushed code and the device.
Precise both ways: a false alarm (``os.unlink('/tmp/camera.lock')``, a log
message that says "rm -rf", a parameter named ``exec``) teaches people to
distrust the check, so each rule says what makes a use harmful.

Names are resolved, not matched as text: import aliases, ``from`` imports,
re-bindings (``run = os.system``, ``o = os``), ``getattr(os, "system")``,
``sys.modules["os"]``, ``vars(os)[...]``, ``os.__dict__[...]``,
``operator.attrgetter``/``methodcaller`` and ``pkgutil.resolve_name`` with a
literal name. A name bound in the module or a function (a parameter called
``exec``) is not the builtin of that name.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Dict, Iterable, List, Optional, Set

from .lint_names import bound_names, collect, function_bindings, resolve
from .lint_rules import BUILTIN_NAMES, check_call, is_blocked
from .report import Issue

BLOCKED_MODULES = frozenset({"ctypes", "_ctypes"})
_RM_FLAG = re.compile(r"^-(?:[a-zA-Z]*[rR][a-zA-Z]*|-recursive)$")
_STAR_BLOCKED = frozenset({"os", "posix", "subprocess", "shutil", "pickle", "importlib", "builtins", "pty"})
_IMPORT_GUARDS = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


class Scanner(ast.NodeVisitor):
    """One walk: resolves names, records dangerous uses and the modules imported."""

    def __init__(self, protected: Iterable[str]) -> None:
        self.protected = frozenset(protected)
        self.aliases: Dict[str, str] = {}
        self.errors: List[Issue] = []
        self.warnings: List[Issue] = []
        self.required_imports: Dict[str, int] = {}
        self.optional_imports: Dict[str, int] = {}
        self.strings: Dict[str, List[str]] = {}  # names assigned string literals (an rm -rf on its way)
        self.shell_kwargs: Set[str] = set()  # names of dicts that carry shell=True
        # The module and each enclosing function, with the names each binds once someone asks:
        # only a builtin's name (exec, getattr, ...) needs them, and most modules never use one.
        self._scopes: List[List[Any]] = []  # [node, bound names or None]
        self._guarded_depth = 0
        self._async_depth = 0
        self._seen: Set[tuple] = set()
        self._call_funcs: Set[int] = set()

    def scan(self, tree: ast.Module) -> None:
        collect(self, tree)
        self._scopes.append([tree, None])
        self.visit(tree)

    # Resolving names

    def resolve(self, node: ast.AST) -> Optional[str]:
        """The dotted name an expression refers to, as far as the aliases tell, else None."""
        return resolve(self, node)

    def shadowed(self, name: str) -> bool:
        """Whether ``name`` (a builtin's) is bound by the module or an enclosing function."""
        if name not in BUILTIN_NAMES:
            return False
        for scope in self._scopes:
            if scope[1] is None:
                node = scope[0]
                scope[1] = (bound_names(node.body) - set(self.aliases) if isinstance(node, ast.Module)
                            else function_bindings(node))
            if name in scope[1]:
                return True
        return False

    # Findings

    def _error(self, message: str, node: ast.AST, check: str = "dangerous") -> None:
        line = getattr(node, "lineno", None)
        if (message, line) not in self._seen:
            self._seen.add((message, line))
            self.errors.append(Issue(check, message, line))

    def dangerous(self, what: str, node: ast.AST) -> None:
        self._error(f"Dangerous pattern detected: {what}", node)

    def warn(self, check: str, message: str, node: ast.AST) -> None:
        self.warnings.append(Issue(check, message, getattr(node, "lineno", None)))

    @property
    def in_async(self) -> bool:
        return self._async_depth > 0

    def module_roots(self) -> Set[str]:
        """Top-level names of what the module imported (and builtins)."""
        return {target.split(".")[0] for target in self.aliases.values()} | {"builtins"}

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
                self.dangerous(f"from {module} import *", node)

    def _check_import(self, dotted: str, node: ast.AST) -> None:
        root = dotted.split(".")[0]
        if root in self.protected:
            self._error(f"Protected import detected: {dotted} (the agent's own code cannot be imported by handlers)",
                        node, "protected_import")
            return
        if root in BLOCKED_MODULES:
            self.dangerous(f"import {dotted}", node)
        imports = self.optional_imports if self._guarded_depth else self.required_imports
        imports.setdefault(root, getattr(node, "lineno", 0))

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(handler) for handler in node.handlers)
        self._guarded_depth += guarded
        for stmt in node.body:
            self.visit(stmt)
        self._guarded_depth -= guarded
        for part in node.handlers + node.orelse + node.finalbody:
            self.visit(part)

    def visit_TryStar(self, node: ast.AST) -> None:  # except* (3.11+): same rules
        self.visit_Try(node)  # type: ignore[arg-type]

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._in_function(node, async_depth=0)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._in_function(node, async_depth=self._async_depth + 1)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._in_function(node, async_depth=self._async_depth)

    def _in_function(self, node: ast.AST, *, async_depth: int) -> None:
        depth, self._async_depth = self._async_depth, async_depth
        self._scopes.append([node, None])
        self.generic_visit(node)
        self._scopes.pop()
        self._async_depth = depth

    def visit_Call(self, node: ast.Call) -> None:
        self._call_funcs.add(id(node.func))
        check_call(self, node)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._check_reference(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_reference(node)
        if isinstance(node.ctx, (ast.Store, ast.Del)) and self.resolve(node.value) == "builtins":
            self.dangerous("write to builtins", node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            if self.resolve(node.value) in ("builtins", "builtins.__dict__", "__dict__"):
                self.dangerous("write to builtins", node)
        else:
            self._check_reference(node)
        self.generic_visit(node)

    def _check_reference(self, node: ast.AST) -> None:
        """A blocked function passed around without being called (``Thread(target=os.system)``)."""
        if id(node) in self._call_funcs or not isinstance(getattr(node, "ctx", None), ast.Load):
            return
        name = self.resolve(node)
        if name is not None and is_blocked(name):
            self.dangerous(f"{name}(", node)

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
                    self.dangerous("rm -rf", node)
                return


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in _IMPORT_GUARDS for t in types)
