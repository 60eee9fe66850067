"""The agent: wires the registry, dispatcher, deploy pipeline and server together.

This is the agent's core wiring, and it deliberately lives outside anything
that can be reloaded: in the system the seed documents, reloading handlers
re-ran the module that held the updater reference and reset it to ``None``.
Here the only code that is ever replaced is a handler module's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from . import __version__
from .activation import ActivationRecords, Quarantine
from .admission import Deadlines
from .config import AgentConfig
from .deploy_commands import DeployCommands
from .dispatch import Dispatcher
from .errors import BadRequest
from .isolation import ImportTester
from .loader import Loader
from .pipeline import DeployPipeline
from .probation import Probation, ProbationRule
from .protocol import Request
from .recovery import Recovery
from .registry import Registry
from .root_lock import RootLock
from .upgrade import running_bundle
from .server import AgentServer
from .store import HandlerStore

if TYPE_CHECKING:
    import ssl

    from .broker_link import BrokerLink
    from .desired import DesiredState
    from .signatures import Trust
    from .tls import ServerTLS

log = logging.getLogger(__name__)

# Limits
AGENT_WORK_THREADS = 4  # file I/O and module loading for built-ins, never shared with handlers
UPGRADE_EXIT_DELAY = 0.3  # seconds between answering upgrade_agent and exiting for the launcher


class Agent:
    """One agent: ``await start()``, serve until told to stop, ``await close()``."""

    def __init__(self, config: AgentConfig, *, tester: Optional[ImportTester] = None) -> None:
        """``tester``: an import tester to share (a bench running many agents in one process)."""
        self.config = config
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self.address: Optional[Tuple[str, int]] = None
        self._probe: "Optional[asyncio.Future[None]]" = None
        self.tls: "Optional[ServerTLS]" = None  # with --tls-*: the listener's context, re-read on CRL changes
        self.broker_link: "Optional[BrokerLink]" = None  # with --broker
        self.desired: "Optional[DesiredState]" = None  # with --broker: the release left for it there
        self._root_lock = RootLock(config.root)
        self._closed = False
        # Set when stuck threads pass the limit under a supervisor: the agent should exit and be restarted.
        self.restart_needed = asyncio.Event()
        self.upgrade_staged = asyncio.Event()  # a new bundle waits: exit for the launcher to try it
        self.registry = Registry()
        self.dispatcher = Dispatcher(
            self.registry,
            token=config.token,
            handler_timeout=config.handler_timeout,
            handler_threads=config.handler_threads,
            on_stuck=self._check_stuck,
        )
        self._work_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=AGENT_WORK_THREADS, thread_name_prefix="agent-work"
        )
        self._build_deploy_side(config, tester)
        self.dispatcher.add_result_listener(self.probation.record)
        self.server = AgentServer(
            self.dispatcher,
            max_connections=config.max_connections,
            max_line_bytes=config.max_line_bytes,
            max_pipelined=config.max_pipelined,
            deadlines=Deadlines(line=config.line_timeout, unauthenticated_idle=config.unauthenticated_timeout,
                                idle=config.idle_timeout),
            max_buffered_bytes=config.max_buffered_bytes,
        )
        self._register_builtins()

    def _build_deploy_side(self, config: AgentConfig, tester: Optional[ImportTester]) -> None:
        state = config.root / ".state"
        self.store = HandlerStore(config.root, keep_backups=config.keep_backups,
                                  max_backup_bytes=config.max_backup_bytes)
        self.quarantine = Quarantine(state)
        self.tester = tester or ImportTester(timeout=config.import_timeout, memory_mb=config.import_memory_mb,
                                             agent_root=config.root, sandbox_user=config.sandbox_user,
                                             hide=[str(config.token_file)] if config.token_file else [])
        self.loader = Loader(ActivationRecords(state), self._work_pool, on_stuck=self._check_stuck)
        self.probation = Probation(
            ProbationRule(config.probation_seconds, config.probation_calls, config.probation_failures),
            on_failed=lambda watch: self.recovery.probation_failed(watch),
        )
        self.pipeline = DeployPipeline(config=config, registry=self.registry, store=self.store, tester=self.tester,
                                       loader=self.loader, quarantine=self.quarantine, probation=self.probation,
                                       work_pool=self._work_pool, trust=_trust(config))
        self.recovery = Recovery(self.pipeline, self.loader.records, self.quarantine)
        self.deploy = DeployCommands(self.pipeline, self.recovery, self.quarantine, self.tester)

    def _register_builtins(self) -> None:
        d = self.dispatcher
        d.add_quick_builtin("ping", self.ping)
        d.add_quick_builtin("get_status", self.get_status)
        d.add_quick_builtin("list_commands", self.list_commands)
        d.add_quick_builtin("handler_stats", self.handler_stats)
        d.add_builtin("reload_handler", self.deploy.reload_handler)
        d.add_builtin("update_handler", self.deploy.update_handler)
        d.add_builtin("rollback_handler", self.deploy.rollback_handler)
        d.add_builtin("delete_handler", self.deploy.delete_handler)
        d.add_builtin("list_backups", self.deploy.list_backups)
        d.add_builtin("update_log", self.deploy.update_log)
        d.add_builtin("update_crl", self.update_crl)
        d.add_builtin("upgrade_agent", self.upgrade_agent)
        self.registry.reserve(d.builtin_names)

    # Lifecycle

    async def start(self) -> Optional[Tuple[str, int]]:
        """Claim the root, recover and load the handlers, then start listening (and with --broker, connect out).
        Returns the TCP address it listens on; None with --no-listen."""
        self._root_lock.acquire()  # RootInUse: another agent runs here
        await self.recovery.start()
        tls = self._tls_context()
        if self.config.listen:
            self.address = await self.server.start(self.config.host, self.config.port, tls=tls)
        if self.config.broker is not None:
            self._start_broker_link()
        # Which of the box's protections hold: known already if handlers were import-tested at start,
        # else learned in the background, so that a box being set up never delays the first reply.
        self._probe = asyncio.ensure_future(self._report_isolation())
        where = f"listening on {self.address[0]}:{self.address[1]}" if self.address else "serving"
        if self.config.broker:
            where += f"{' and' if self.address else ''} through {self.config.broker}"
        log.info("agent %s %s with %d handler module(s), %d failed", __version__, where,
                 len(self.registry.modules), len(self.registry.failed))
        return self.address

    def _start_broker_link(self) -> None:
        from .broker_link import BrokerLink
        from .desired import DesiredState

        assert self.config.broker is not None and self.config.device_id is not None
        self.broker_link = BrokerLink(self.config.broker, self.config.device_id, self.dispatcher,
                                      birth=self._birth, tls=self.config.tls, max_in_flight=self.config.max_pipelined,
                                      max_request_bytes=self.config.max_line_bytes)
        self.desired = DesiredState(self.broker_link, self.dispatcher, self._running_files)
        self.broker_link.on_desired = self.desired.offer
        self.broker_link.start()

    def _running_files(self) -> Dict[str, str]:
        modules = self.registry.modules
        return {f"{name}.py": modules[name].sha256 for name in sorted(modules)}

    def _birth(self) -> Dict[str, Any]:
        """What the broker's retained status says of this agent while it is online. What it runs is not here, where
        the next push would leave it stale: the agent reports it each time it compares itself with its desired
        release (``agent/desired.py``), and ``get_status`` says it live."""
        return {"agent_version": __version__, "started_at": self.started_at}

    def _tls_context(self) -> "Optional[ssl.SSLContext]":
        if self.config.tls is None:
            return None
        from .tls import ServerTLS, not_a_controller

        self.tls = ServerTLS(self.config.tls)
        self.server.tls_role_check = not_a_controller
        return self.tls.context

    async def _report_isolation(self) -> None:
        isolation = self.tester.isolation
        if isolation is None:
            probe = await self.pipeline.probe_box()
            isolation = probe.isolation
            if isolation is None:
                log.error("import test box: %s", probe.error)
                return
        log.info("import test box: %s", describe_isolation(isolation))

    async def close(self) -> None:
        """Stop serving and release everything; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
        closing = [self.server.close(self.config.shutdown_grace)]
        if self.broker_link is not None:
            closing.append(self.broker_link.close(self.config.shutdown_grace))
        await asyncio.gather(*closing)
        self.recovery.close()
        self.pipeline.close()
        await asyncio.get_running_loop().run_in_executor(self._work_pool, self.tester.close)
        self.dispatcher.close()
        self._work_pool.shutdown(wait=False, cancel_futures=True)
        self._root_lock.release()

    # Built-in commands

    def ping(self, request: Request) -> Dict[str, Any]:
        return {"type": "pong", "message": "pong"}

    async def upgrade_agent(self, request: Request) -> Dict[str, Any]:
        """A new agent bundle: staged for the launcher, then this agent exits (status 76) to let it try."""
        from .upgrade import stage

        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self._work_pool, stage, self.config.root, request.args, self.pipeline.trust)
        loop.call_later(UPGRADE_EXIT_DELAY, self.upgrade_staged.set)  # the reply goes out first
        return reply

    async def update_crl(self, request: Request) -> Dict[str, Any]:
        """A new TLS revocation list from the controller (``fleet ca revoke``, then a deploy or converge)."""
        from .tls import replace_crl

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._work_pool, replace_crl, self.tls, request.args.get("crl"))

    def get_status(self, request: Request) -> Dict[str, Any]:
        registry = self.registry
        return {
            "type": "status",
            "agent_version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started_monotonic, 3),
            "started_at": self.started_at,
            "python_version": "%d.%d.%d" % sys.version_info[:3],
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
            "stuck_threads": self._stuck_threads(),
            "disk": self._disk(),
            "signatures": self.pipeline.trust.describe() if self.pipeline.trust else {"required": False},
            "bundle": running_bundle(),
            **self.deploy.status(),
        }

    def _stuck_threads(self) -> Dict[str, Any]:
        handler_calls, loads = self.dispatcher.stuck_calls, self.loader.stuck
        return {"handler_calls": handler_calls, "loads": loads, "limit": self.config.max_stuck_threads,
                "over_limit": handler_calls + loads > self.config.max_stuck_threads}

    def _check_stuck(self) -> None:
        """Called when a thread gets stuck. Past the limit, under a supervisor, ask for a clean restart.

        A stuck thread cannot be stopped in Python; a restart frees them all,
        and any load that was stuck is quarantined by the activation record.
        """
        stuck = self._stuck_threads()
        if not stuck["over_limit"]:
            return
        total = stuck["handler_calls"] + stuck["loads"]
        if not self.config.supervised:
            log.error("%d threads are stuck (limit %d); restart the agent to free them", total, stuck["limit"])
            return
        log.error("%d threads are stuck (limit %d): exiting so that the supervisor restarts the agent clean",
                  total, stuck["limit"])
        self.restart_needed.set()

    def _disk(self) -> Optional[Dict[str, int]]:
        """Space on the storage that holds the handlers: a full card is what makes deploys fail."""
        import shutil  # here, not at the top: the agent's start time is mostly imports

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



def describe_isolation(isolation: Dict[str, Any]) -> str:
    """One line for the log: which of the box's protections hold here, and why the others do not."""
    active = ", ".join(sorted(isolation.get("active", {})))
    missing = "; ".join(f"{name} ({why})" for name, why in sorted(isolation.get("missing", {}).items()))
    return f"active: {active or 'none'}; missing: {missing or 'none'}"


def _trust(config: AgentConfig) -> "Optional[Trust]":
    """With ``--trusted-keys``: what the pipeline asks before running code (``agent/signatures.py``)."""
    if config.trusted_keys is None:
        return None
    from .signatures import Trust, TrustedKeys

    return Trust(TrustedKeys(config.trusted_keys), config.root / ".state")
