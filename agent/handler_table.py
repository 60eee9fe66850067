"""What a handler module exports: the rules for its command table.

A handler module offers commands in two ways, which may be mixed:

- a ``COMMAND_HANDLERS`` dict mapping command names to callables, and
- module-level functions named ``handle_<name>``.

Each handler takes exactly one argument (the request dict) and returns a dict.
Names are matched case-insensitively, so they are stored lower-cased.

This file deliberately imports nothing from the rest of the agent: the
isolated import-test helper loads it by path, so that the agent and the helper
judge a module's table by exactly the same rules.
"""

from __future__ import annotations

import inspect
import re
from types import ModuleType
from typing import Any, Callable, Dict

HANDLER_PREFIX = "handle_"
COMMAND_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.\-]{0,63}$")


class TableError(ValueError):
    """The module's command table is malformed; the message names what and where."""


def collect_commands(module: ModuleType) -> Dict[str, Callable[..., Any]]:
    """Return ``{command: callable}`` for a loaded module, or raise ``TableError``."""
    table: Dict[str, Callable[..., Any]] = {}
    origin: Dict[str, str] = {}
    explicit = getattr(module, "COMMAND_HANDLERS", None)
    if explicit is not None:
        if not isinstance(explicit, dict):
            raise TableError(f"COMMAND_HANDLERS must be a dict of name -> function, not {type(explicit).__name__}")
        for key, func in explicit.items():
            if not isinstance(key, str):
                raise TableError(f"COMMAND_HANDLERS has a non-string key {key!r}")
            name = _command_name(key, f"COMMAND_HANDLERS[{key!r}]")
            if name in table:
                raise TableError(f"COMMAND_HANDLERS defines {name!r} twice (names are case-insensitive)")
            table[name] = _handler(func, f"COMMAND_HANDLERS[{key!r}]")
            origin[name] = f"COMMAND_HANDLERS[{key!r}]"
    for attr, func in list(vars(module).items()):
        if not attr.startswith(HANDLER_PREFIX) or len(attr) == len(HANDLER_PREFIX) or not callable(func):
            continue
        name = _command_name(attr[len(HANDLER_PREFIX):], attr)
        if name in table:
            if table[name] is not func:
                raise TableError(f"command {name!r} is defined by both {origin[name]} and {attr}()")
            continue
        table[name] = _handler(func, attr)
        origin[name] = f"{attr}()"
    return table


def _command_name(raw: str, where: str) -> str:
    name = raw.lower()
    if not COMMAND_NAME.match(name):
        raise TableError(
            f"{where}: {raw!r} is not a usable command name "
            "(letters, digits, '_', '.', '-'; at most 64 characters)"
        )
    return name


def _handler(func: Any, where: str) -> Callable[..., Any]:
    if not callable(func):
        raise TableError(f"{where} is {type(func).__name__}, not a function")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return func  # a builtin or C function: nothing to inspect, trust it
    try:
        signature.bind(object())
    except TypeError:
        raise TableError(f"{where} must take exactly one argument (the request dict); its signature is {signature}") from None
    return func


def is_async_handler(func: Callable[..., Any]) -> bool:
    """True for ``async def`` handlers, which the agent awaits instead of running in a thread."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))
