"""The live command table: which handler modules are loaded and what they offer.

Modules are built as fresh module objects compiled from exact bytes, never via
``importlib.reload`` (which keeps the old globals around the new code) and
never from a ``.pyc`` that may be stale. The command table is a plain dict
that is *replaced*, not edited, so a request always sees either the old table
or the new one, never half of each.

The registry runs on the event loop thread; only ``compile_module`` (which
executes module code) is meant to run in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from .errors import LoadFailed
from .handler_table import TableError, collect_commands, is_async_handler

log = logging.getLogger(__name__)

MODULE_NAMESPACE = "pi_agent_handlers"


@dataclass(frozen=True)
class Handler:
    """One command offered by a handler module."""

    command: str
    module_name: str
    func: Callable[..., Any]
    is_async: bool


@dataclass
class LoadedModule:
    """A handler module that is live in the agent."""

    name: str  # "camera_handlers"
    module: types.ModuleType
    sha256: str
    commands: Dict[str, Callable[..., Any]]
    loaded_at: float = field(default_factory=time.time)
    release: Optional[int] = None  # the controller's release this version came with, when it said

    @property
    def filename(self) -> str:
        return f"{self.name}.py"

    def describe(self) -> Dict[str, Any]:
        return {
            "file": self.filename,
            "sha256": self.sha256,
            "commands": sorted(self.commands),
            "loaded_at": self.loaded_at,
            "release": self.release,
        }


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compile_module(name: str, text: str, version: str, path: str) -> LoadedModule:
    """Execute ``text`` as a new module object and collect its command table.

    ``text`` is the source decoded once by ``source.decode_source``, the same
    text the checks and the import test saw; ``version`` is the sha256 of its
    bytes.

    Raises ``LoadFailed`` with a one-line reason; the caller decides whether
    that reason goes to the log, to ``get_status`` or into a reply. The module
    is in ``sys.modules`` while its code runs (as the import-test child does,
    so code such as ``dataclasses`` finds it); afterwards the entry is put back
    as it was, and only ``Registry.install`` makes the new module the one there.
    """
    qualname = f"{MODULE_NAMESPACE}.{name}"
    module = types.ModuleType(qualname)
    module.__file__ = path
    before = sys.modules.get(qualname)
    sys.modules[qualname] = module
    try:
        code = compile(text, path, "exec", dont_inherit=True)
        exec(code, module.__dict__)
        commands = collect_commands(module)
    except TableError as exc:
        raise LoadFailed(f"{name}.py: {exc}") from None
    except SyntaxError as exc:
        raise LoadFailed(f"{name}.py: syntax error at line {exc.lineno}: {exc.msg}") from None
    except BaseException as exc:  # noqa: BLE001 - module code may raise anything, even SystemExit
        raise LoadFailed(f"{name}.py: {type(exc).__name__} at import: {exc}") from None
    finally:
        if before is None:
            sys.modules.pop(qualname, None)
        else:
            sys.modules[qualname] = before
    return LoadedModule(name=name, module=module, sha256=version, commands=commands)


class Registry:
    """Loaded modules, modules that failed to load, and the merged command table."""

    def __init__(self) -> None:
        self.builtin_commands: frozenset = frozenset()
        self.modules: Dict[str, LoadedModule] = {}
        self.failed: Dict[str, str] = {}
        self.table: Dict[str, Handler] = {}

    def reserve(self, builtin_commands: Iterable[str]) -> None:
        """The agent's own command names: a handler module may not offer them."""
        self.builtin_commands = frozenset(builtin_commands)

    def conflicts(self, name: str, commands: Iterable[str]) -> List[str]:
        """Reasons why module ``name`` offering ``commands`` would clash; empty when it fits."""
        problems = []
        for command in sorted(commands):
            if command in self.builtin_commands:
                problems.append(f"{name}.py defines {command!r}, which is a built-in command of the agent")
                continue
            owner = self.table.get(command)
            if owner is not None and owner.module_name != name:
                problems.append(
                    f"command {command!r} is offered by both {owner.module_name}.py and {name}.py"
                )
        return problems

    def install(self, loaded: LoadedModule) -> Optional[LoadedModule]:
        """Make ``loaded`` live, replacing any module of the same name. Returns the previous one."""
        problems = self.conflicts(loaded.name, loaded.commands)
        if problems:
            raise LoadFailed("; ".join(problems))
        previous = self.modules.get(loaded.name)
        modules = dict(self.modules)
        modules[loaded.name] = loaded
        self._swap(modules)
        self.failed.pop(loaded.name, None)
        sys.modules[loaded.module.__name__] = loaded.module
        return previous

    def remove(self, name: str) -> Optional[LoadedModule]:
        """Unload a module's commands. Returns the module that was live, if any."""
        previous = self.modules.get(name)
        if previous is not None:
            modules = dict(self.modules)
            del modules[name]
            self._swap(modules)
            sys.modules.pop(previous.module.__name__, None)
        self.failed.pop(name, None)
        return previous

    def mark_failed(self, name: str, reason: str) -> None:
        self.failed[name] = reason

    def _swap(self, modules: Dict[str, LoadedModule]) -> None:
        table: Dict[str, Handler] = {}
        for module_name, loaded in modules.items():
            for command, func in loaded.commands.items():
                table[command] = Handler(command, module_name, func, is_async_handler(func))
        # Two plain assignments: readers on the loop thread see old or new, never a mix.
        self.modules = modules
        self.table = table

    def all_commands(self) -> List[str]:
        return sorted(set(self.builtin_commands) | set(self.table))
