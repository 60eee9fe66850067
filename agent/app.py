"""The agent: wires the registry, dispatcher, deployer and server together.

This is the agent's core wiring, and it deliberately lives outside anything
that can be reloaded: in the system the seed documents, reloading handlers
re-ran the module that held the updater reference and reset it to ``None``.
Here the only code that is ever replaced is a handler module's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import platform
import shutil
import socket
import time
from typing import Any, Dict, Optional, Tuple

from . import __version__
from .config import AgentConfig
from .deploy import Deployer
from .dispatch import Dispatcher
from .errors import BadRequest
from .protocol import Request
from .registry import Registry
from .server import AgentServer

log = logging.getLogger(__name__)

# Limits
AGENT_WORK_THREADS = 4  # file I/O and module loading for built-ins, never shared with handlers


class Agent:
    """One agent: ``await start()``, serve until told to stop, ``await close()``."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self.address: Optional[Tuple[str, int]] = None
        self._closed = False
        self.registry = Registry()
        self.dispatcher = Dispatcher(
            self.registry,
            token=config.token,
            handler_timeout=config.handler_timeout,
            handler_threads=config.handler_threads,
        )
        self._work_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=AGENT_WORK_THREADS, thread_name_prefix="agent-work"
        )
        self.deployer = Deployer(config, self.registry, self._work_pool)
        self.dispatcher.add_result_listener(self.deployer.probation.record)
        self.server = AgentServer(
            self.dispatcher,
            max_connections=config.max_connections,
            max_line_bytes=config.max_line_bytes,
            max_pipelined=config.max_pipelined,
            idle_timeout=config.idle_timeout,
        )
        self._register_builtins()

    def _register_builtins(self) -> None:
        d = self.dispatcher
        d.add_quick_builtin("ping", self.ping)
        d.add_quick_builtin("get_status", self.get_status)
        d.add_quick_builtin("list_commands", self.list_commands)
        d.add_quick_builtin("handler_stats", self.handler_stats)
        d.add_builtin("reload_handler", self.deployer.reload_handler)
        d.add_builtin("update_handler", self.deployer.update_handler)
        d.add_builtin("rollback_handler", self.deployer.rollback_handler)
        d.add_builtin("delete_handler", self.deployer.delete_handler)
        d.add_builtin("list_backups", self.deployer.list_backups)
        d.add_builtin("update_log", self.deployer.update_log)
        self.registry.reserve(d.builtin_names)

    # Lifecycle

    async def start(self) -> Tuple[str, int]:
        """Create the folders, load the handlers, then start listening."""
        await self.deployer.start()
        self.address = await self.server.start(self.config.host, self.config.port)
        log.info(
            "agent %s listening on %s:%d with %d handler module(s), %d failed",
            __version__, self.address[0], self.address[1],
            len(self.registry.modules), len(self.registry.failed),
        )
        return self.address

    async def close(self) -> None:
        """Stop serving and release everything; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        await self.server.close(self.config.shutdown_grace)
        await self.deployer.close()
        self.dispatcher.close()
        self._work_pool.shutdown(wait=False, cancel_futures=True)

    # Built-in commands

    def ping(self, request: Request) -> Dict[str, Any]:
        return {"type": "pong", "message": "pong"}

    def get_status(self, request: Request) -> Dict[str, Any]:
        registry = self.registry
        return {
            "type": "status",
            "agent_version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started_monotonic, 3),
            "started_at": self.started_at,
            "python_version": platform.python_version(),
            "hostname": socket.gethostname(),
            "modules": [registry.modules[name].describe() for name in sorted(registry.modules)],
            "failed_modules": [
                {"file": f"{name}.py", "error": reason} for name, reason in sorted(registry.failed.items())
            ],
            "command_count": len(registry.all_commands()),
            "connections": len(self.server.connections),
            "handler_threads": self.dispatcher.handler_threads,
            "stuck_handler_calls": self.dispatcher.stuck_calls,
            "stuck_handler_calls_total": self.dispatcher.stuck_total,
            "disk": self._disk(),
            **self.deployer.status(),
        }

    def _disk(self) -> Optional[Dict[str, int]]:
        """Space on the storage that holds the handlers: a full card is what makes deploys fail."""
        try:
            usage = shutil.disk_usage(self.config.root)
        except OSError:
            return None
        return {"free_bytes": usage.free, "total_bytes": usage.total}

    def list_commands(self, request: Request) -> Dict[str, Any]:
        handlers = {cmd: f"{h.module_name}.py" for cmd, h in sorted(self.registry.table.items())}
        return {
            "type": "commands",
            "commands": self.registry.all_commands(),
            "builtin": self.dispatcher.builtin_names,
            "handlers": handlers,
        }

    def handler_stats(self, request: Request) -> Dict[str, Any]:
        command = request.args.get("name")
        stats = self.dispatcher.stats
        if command is not None:
            if not isinstance(command, str):
                raise BadRequest("'name' must be a command name")
            stats = {k: v for k, v in stats.items() if k == command.lower()}
        return {"type": "handler_stats", "stats": {k: v.as_dict() for k, v in sorted(stats.items())}}

