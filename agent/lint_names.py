"""What a name in handler code refers to: imports, re-bindings, and the ways Python reaches a module by name.

The scanner (``lint``) asks ``resolve`` for the dotted name behind an
expression (``o.system`` with ``import os as o`` is ``os.system``) and
learns before its walk what the module binds (``collect_aliases``,
``collect_values``) and what each scope binds (``bound_names``,
``function_bindings``): a parameter called ``exec`` is not the builtin.
"""

from __future__ import annotations

import ast
from typing import Any, Iterable, Iterator, List, Optional, Set

from .lint_rules import BUILTIN_NAMES, carries_shell

_SAME_MODULE = {"posix": "os", "builtins": "", "__builtins__": ""}
_DICT = ".__dict__"


def normalise(dotted: str) -> str:
    root, _, rest = dotted.partition(".")
    if root in _SAME_MODULE:
        replacement = _SAME_MODULE[root]
        if not rest:
            return "builtins" if replacement == "" else replacement
        return f"{replacement}.{rest}" if replacement else rest
    return dotted


def resolve(scanner: Any, node: ast.AST) -> Optional[str]:
    """The dotted name ``node`` refers to, as far as the module's bindings tell, else None."""
    if isinstance(node, ast.Name):
        if node.id in scanner.aliases:
            return normalise(scanner.aliases[node.id])
        if node.id == "__builtins__":
            return "builtins"
        return node.id if node.id in BUILTIN_NAMES and not scanner.shadowed(node.id) else None
    if isinstance(node, ast.Attribute):
        base = resolve(scanner, node.value)
        return None if base is None else normalise(f"{base}.{node.attr}" if base else node.attr)
    if isinstance(node, ast.Subscript):  # sys.modules["os"], vars(os)["system"], os.__dict__["system"]
        return _member(resolve(scanner, node.value), _key(node.slice))
    if isinstance(node, ast.Call):
        return _call_result(scanner, node)
    return None


def _call_result(scanner: Any, node: ast.Call) -> Optional[str]:
    """What a call that looks a name up yields: ``getattr(os, "system")`` yields ``os.system``."""
    func = node.func
    if isinstance(func, ast.Call) and resolve(scanner, func.func) == "operator.attrgetter" and func.args and node.args:
        base = resolve(scanner, node.args[0])
        return _join(base, _key(func.args[0]))
    name = resolve(scanner, func)
    first = node.args[0] if node.args else None
    if name == "getattr" and len(node.args) >= 2:
        return _join(resolve(scanner, node.args[0]), _key(node.args[1]))
    if name == "vars" and first is not None:
        base = resolve(scanner, first)
        return None if base is None else f"{base}{_DICT}"
    if name == "pkgutil.resolve_name" and first is not None:
        key = _key(first)
        return normalise(key.replace(":", ".")) if key else None
    if isinstance(func, ast.Attribute) and func.attr == "get" and first is not None:
        return _member(resolve(scanner, func.value), _key(first))
    return None


def _member(base: Optional[str], key: Optional[str]) -> Optional[str]:
    if base is None or key is None:
        return None
    if base == "sys.modules":
        return normalise(key)
    if base.endswith(_DICT):
        return _join(base[:-len(_DICT)], key)
    return None


def _join(base: Optional[str], key: Optional[str]) -> Optional[str]:
    if base is None or key is None:
        return None
    return normalise(f"{base}.{key}" if base else key)


def _key(node: ast.AST) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def collect(scanner: Any, tree: ast.AST) -> None:
    """One walk before the scan: imports, re-bindings (``run = os.system``, ``o = os``) resolved to a
    fixed point (chains of three), names given string literals, dicts that carry ``shell=True``."""
    rebindings = []
    for node in ast.walk(tree):
        _collect_value(scanner, node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                scanner.aliases[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if alias.name != "*":
                    scanner.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, (ast.Name, ast.Attribute, ast.Call, ast.Subscript))):
            rebindings.append(node)
    for _ in range(3):
        for node in rebindings:
            target = resolve(scanner, node.value)
            if target is not None:
                scanner.aliases[node.targets[0].id] = target  # type: ignore[attr-defined]


def _collect_value(scanner: Any, node: ast.AST) -> None:
    """Names given string literals (``cmd = "rm -rf ..."``) and dicts that carry ``shell=True``."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target, value = node.targets[0], node.value
        if isinstance(target, ast.Name):
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                scanner.strings.setdefault(target.id, []).append(value.value)
            elif carries_shell(value, ()):
                scanner.shell_kwargs.add(target.id)
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and _key(target.slice) == "shell":
            scanner.shell_kwargs.add(target.value.id)  # options["shell"] = True
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
            and isinstance(node.func.value, ast.Name) and any(k.arg == "shell" for k in node.keywords)):
        scanner.shell_kwargs.add(node.func.value.id)  # options.update(shell=True)


def bound_names(body: Iterable[ast.stmt]) -> Set[str]:
    """Names a block binds (assignments, loops, with, def, class, except), not looking into functions."""
    bound: Set[str] = set()
    for node in _outside_functions(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def function_bindings(node: ast.AST) -> Set[str]:
    """A function's (or lambda's) parameters and the names its body binds."""
    args = node.args  # type: ignore[attr-defined]
    params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    body = node.body if isinstance(node.body, list) else []  # type: ignore[attr-defined]
    return params | bound_names(body)


def _outside_functions(body: Iterable[ast.stmt]) -> Iterator[ast.AST]:
    stack: List[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(node.decorator_list if not isinstance(node, ast.Lambda) else [])
            continue
        stack.extend(ast.iter_child_nodes(node))
