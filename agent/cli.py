"""``pi-agent`` / ``python -m agent``: start one agent and serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from . import __version__
from .contract import BROKER_MARK, LISTENING
from .launcher import EXIT_UPGRADE
from .root_lock import RootInUse

if TYPE_CHECKING:
    from .tls import TLSFiles
from .app import Agent
from .config import (
    DEFAULT_HANDLER_THREADS,
    DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IMPORT_MEMORY_MB,
    DEFAULT_IMPORT_TIMEOUT,
    DEFAULT_KEEP_BACKUPS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_STUCK_THREADS,
    DEFAULT_PORT,
    DEFAULT_PROBATION_CALLS,
    DEFAULT_PROBATION_FAILURES,
    DEFAULT_PROBATION_SECONDS,
    DEFAULT_SANDBOX_USER,
    DEFAULT_SHUTDOWN_GRACE,
    TOKEN_ENV,
    AgentConfig,
    ConfigError,
    read_token,
    take_token_from_environment,
)
from .admission import DEFAULT_LINE_TIMEOUT, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_UNAUTHENTICATED_IDLE
from .protocol import DEFAULT_MAX_LINE_BYTES
from .store import DEFAULT_MAX_BACKUP_BYTES, DEFAULT_MAX_HANDLER_FILES

log = logging.getLogger("agent")

# Timeouts
STUCK_THREAD_GRACE = 1.0  # seconds for idle worker threads to finish at exit
EXIT_RESTART = 75  # EX_TEMPFAIL: stuck threads passed the limit under a supervisor; restart me


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pi-agent",
        description=(
            "Run the pi-agent: a TCP server (newline-delimited JSON) that runs commands from "
            "hot-loaded handler modules in ROOT/handlers/ and accepts new handler code over the wire."
        ),
        epilog=(
            f"The token is read from --token-file or the {TOKEN_ENV} environment variable. Without "
            "one, and without TLS, the agent listens on loopback only, unless --insecure is given. "
            "Examples: pi-agent --host 0.0.0.0 --port 3000 --root /var/lib/pi-agent --token-file /etc/pi-agent/token; "
            "pi-agent --host 0.0.0.0 --root /var/lib/pi-agent --tls-cert /etc/pi-agent/device.crt "
            "--tls-key /etc/pi-agent/device.key --tls-ca /etc/pi-agent/ca.crt"
        ),
    )
    parser.add_argument("--version", action="version", version=f"pi-agent {__version__}")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port; 0 picks a free one (default {DEFAULT_PORT})")
    net.add_argument("--root", default=os.environ.get("PI_AGENT_ROOT", str(Path.home() / "pi-agent")),
                     help="folder for handlers/, .backups/ and the agent's state; created if missing "
                          "(default $PI_AGENT_ROOT or ~/pi-agent)")
    net.add_argument("--token-file", help="file whose first line is the shared secret every request must carry")
    net.add_argument("--insecure", action="store_true",
                     help="allow listening beyond loopback without a token or TLS (anyone who can connect can "
                          "push code)")
    _add_security_options(parser)
    timeouts = parser.add_argument_group("timeouts (seconds)")
    timeouts.add_argument("--handler-timeout", type=float, default=DEFAULT_HANDLER_TIMEOUT,
                          help=f"time limit of one handler call; a request's 'timeout' may lower it (default {DEFAULT_HANDLER_TIMEOUT:g})")
    timeouts.add_argument("--import-timeout", type=float, default=DEFAULT_IMPORT_TIMEOUT,
                          help=f"time limit of the isolated import test of pushed code (default {DEFAULT_IMPORT_TIMEOUT:g})")
    timeouts.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE,
                          help="on SIGTERM, how long running requests may take to finish before they are "
                               f"refused (default {DEFAULT_SHUTDOWN_GRACE:g})")
    _add_connection_options(parser)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--handler-threads", type=int, default=DEFAULT_HANDLER_THREADS,
                        help=f"threads for plain (non-async) handlers (default {DEFAULT_HANDLER_THREADS})")
    limits.add_argument("--import-memory-mb", type=int, default=DEFAULT_IMPORT_MEMORY_MB,
                        help=f"address-space limit of the import test process (default {DEFAULT_IMPORT_MEMORY_MB})")
    limits.add_argument("--keep-backups", type=int, default=DEFAULT_KEEP_BACKUPS,
                        help=f"backups kept per handler file (default {DEFAULT_KEEP_BACKUPS})")
    limits.add_argument("--max-backup-bytes", type=int, default=DEFAULT_MAX_BACKUP_BYTES,
                        help="all backups together; older versions of the files with the most go first, the newest "
                             f"of each file stays (default {DEFAULT_MAX_BACKUP_BYTES})")
    limits.add_argument("--max-handler-files", type=int, default=DEFAULT_MAX_HANDLER_FILES,
                        help=f"handler files on the device; a push of one more is refused (default {DEFAULT_MAX_HANDLER_FILES})")
    limits.add_argument("--max-stuck-threads", type=int, default=DEFAULT_MAX_STUCK_THREADS,
                        help="handler calls and module loads still running past their time limits before "
                             f"get_status says so (and --supervised exits) (default {DEFAULT_MAX_STUCK_THREADS})")
    _add_device_safety_options(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging detail on stderr (default INFO)")
    return parser


def _add_security_options(parser: argparse.ArgumentParser) -> None:
    """Who may talk to the agent, and what code it runs: mutual TLS, and signed code (``--trusted-keys``)."""
    tls = parser.add_argument_group(
        "TLS", "Mutual TLS: the agent speaks TLS 1.2+ only and takes commands only from a controller's certificate from --tls-ca "
               "(`fleet ca issue DEVICE_ID` writes all three files). The token is then optional; with both, "
               "both are checked.")
    tls.add_argument("--tls-cert", metavar="FILE", help="this device's certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="this device's private key (PEM)")
    tls.add_argument("--tls-ca", metavar="FILE", help="the fleet CA's certificate: clients must present one it signed")
    tls.add_argument("--tls-crl", metavar="FILE",
                     help="revoked certificates (PEM CRL from `fleet ca revoke`), re-read when the file changes")
    broker = parser.add_argument_group(
        "broker", "Also serve through an MQTT broker, for a device the controller cannot reach (NAT, 4G): the agent "
                  "connects out, keeps the connection, and applies the release the controller left for it there. "
                  "Over mqtts the --tls-* files are its identity at the broker. Needs python3-paho-mqtt (the agent "
                  "bundle carries it)")
    broker.add_argument("--broker", metavar="URL", help="mqtts://HOST[:8883], or mqtt://HOST[:1883] on loopback")
    broker.add_argument("--device-id", metavar="ID", help="this device's id, as in the controller's devices.json")
    broker.add_argument("--no-listen", action="store_true",
                        help="no TCP listener: reachable through the broker only (--host and --port are ignored)")
    parser.add_argument("--trusted-keys", metavar="DIR",
                        help="run only handler code signed by one of the release keys in DIR (*.pub, from `fleet "
                             "keys init`): unsigned or badly signed pushes, rollbacks and files found at start are "
                             "refused. Needs python3-cryptography")


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    """What a stranger on the LAN cannot exhaust: connections, time, memory (see agent/admission.py)."""
    conns = parser.add_argument_group(
        "connections", "At the limit, a new connection evicts one that has not authenticated, or the one idle "
                       "longest, so the operator always gets in. The defaults let a 4 MiB push take 130 s "
                       "(256 kbit/s) with time to spare.")
    conns.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       help=f"connections open at once (default {DEFAULT_MAX_CONNECTIONS})")
    conns.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                       help=f"largest request line (default {DEFAULT_MAX_LINE_BYTES})")
    conns.add_argument("--max-buffered-bytes", type=int, default=DEFAULT_MAX_BUFFERED_BYTES,
                       help="unfinished request lines of all connections together; past it the connections "
                            f"holding the most are closed (default {DEFAULT_MAX_BUFFERED_BYTES}, for a 512 MB Pi)")
    conns.add_argument("--line-timeout", type=float, default=DEFAULT_LINE_TIMEOUT,
                       help="seconds a request line may take from its first byte to its last; a client that "
                            f"trickles cannot reset it (default {DEFAULT_LINE_TIMEOUT:g})")
    conns.add_argument("--unauthenticated-timeout", type=float, default=DEFAULT_UNAUTHENTICATED_IDLE,
                       help="close a connection silent this long before its first authenticated request "
                            f"(default {DEFAULT_UNAUTHENTICATED_IDLE:g})")
    conns.add_argument("--idle-timeout", type=float, default=None,
                       help="close authenticated connections silent this long (default: off, controllers "
                            "keep connections open)")


def _add_device_safety_options(parser: argparse.ArgumentParser) -> None:
    """What keeps a device alive through bad pushes: the import test's box, restarts, probation."""
    safety = parser.add_argument_group("safety")
    safety.add_argument("--sandbox-user", default=DEFAULT_SANDBOX_USER,
                        help="when the agent runs as root, the import test of pushed code runs as this user "
                             f"(default {DEFAULT_SANDBOX_USER})")
    safety.add_argument("--supervised", action="store_true",
                        help="a supervisor (systemd) restarts the agent: exit with status "
                             f"{EXIT_RESTART} when stuck threads pass --max-stuck-threads, to restart clean")
    probation = parser.add_argument_group("probation after a deploy")
    probation.add_argument("--probation-seconds", type=float, default=DEFAULT_PROBATION_SECONDS,
                           help=f"how long a new module is watched (default {DEFAULT_PROBATION_SECONDS:g})")
    probation.add_argument("--probation-calls", type=int, default=DEFAULT_PROBATION_CALLS,
                           help=f"or for how many calls (default {DEFAULT_PROBATION_CALLS})")
    probation.add_argument("--probation-failures", type=int, default=DEFAULT_PROBATION_FAILURES,
                           help=f"failed calls that trigger an automatic rollback (default {DEFAULT_PROBATION_FAILURES})")


def tls_files(args: argparse.Namespace) -> "Optional[TLSFiles]":
    """The TLS files given (all three of cert, key and CA, or none), checked by building a context from them."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given) and not args.tls_crl:
        return None
    if not all(given):
        raise ConfigError("TLS needs --tls-cert, --tls-key and --tls-ca together (`fleet ca issue DEVICE_ID` "
                          "writes them)")
    from .tls import TLSError, TLSFiles, server_context

    files = TLSFiles(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca),
                     Path(args.tls_crl) if args.tls_crl else None)
    try:
        server_context(files)
    except TLSError as exc:
        raise ConfigError(str(exc)) from None
    return files


def trusted_keys(args: argparse.Namespace) -> Optional[Path]:
    """``--trusted-keys DIR``, checked now (the package, and at least one usable key) so a bad one stops the start."""
    if not args.trusted_keys:
        return None
    from .signatures import TrustedKeys, TrustedKeysError

    try:
        TrustedKeys(Path(args.trusted_keys))
    except TrustedKeysError as exc:
        raise ConfigError(str(exc)) from None
    return Path(args.trusted_keys)


def broker_url(args: argparse.Namespace) -> Optional[str]:
    """``--broker URL``, with its MQTT client checked now: a missing package stops the start with how to install it."""
    if args.broker:
        from .broker_link import paho_client_module

        paho_client_module()
    return args.broker


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        root=Path(args.root).expanduser(),
        host=args.host,
        port=args.port,
        token=read_token(args.token_file),
        token_file=Path(args.token_file).resolve() if args.token_file else None,
        insecure=args.insecure,
        tls=tls_files(args),
        trusted_keys=trusted_keys(args),
        broker=broker_url(args),
        device_id=args.device_id,
        listen=not args.no_listen,
        sandbox_user=args.sandbox_user,
        supervised=args.supervised,
        max_stuck_threads=args.max_stuck_threads,
        handler_timeout=args.handler_timeout,
        import_timeout=args.import_timeout,
        idle_timeout=args.idle_timeout,
        line_timeout=args.line_timeout,
        unauthenticated_timeout=args.unauthenticated_timeout,
        max_buffered_bytes=args.max_buffered_bytes,
        shutdown_grace=args.shutdown_grace,
        max_line_bytes=args.max_line_bytes,
        max_connections=args.max_connections,
        handler_threads=args.handler_threads,
        import_memory_mb=args.import_memory_mb,
        keep_backups=args.keep_backups,
        max_backup_bytes=args.max_backup_bytes,
        max_handler_files=args.max_handler_files,
        probation_seconds=args.probation_seconds,
        probation_calls=args.probation_calls,
        probation_failures=args.probation_failures,
    )


async def serve(config: AgentConfig) -> int:
    """Run an agent until SIGTERM or SIGINT (exit status 0), or until it needs a restart (75)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent = Agent(config)
    try:
        address = await agent.start()
        where = f"{address[0]}:{address[1]}" if address else f"{BROKER_MARK} {config.broker} as {config.device_id}"
        print(f"pi-agent {__version__} {LISTENING} {where} (root {config.root})", flush=True)
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(agent.restart_needed.wait()),
                 asyncio.ensure_future(agent.upgrade_staged.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        log.info("stopping")
    finally:
        await agent.close()
    if agent.upgrade_staged.is_set():
        return EXIT_UPGRADE
    return EXIT_RESTART if agent.restart_needed.is_set() else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"pi-agent: {exc}", file=sys.stderr)
        return 2
    take_token_from_environment()
    try:
        status = asyncio.run(serve(config))
    except RootInUse as exc:
        print(f"pi-agent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is not None:  # a file or folder under --root, not the socket
            print(f"pi-agent: cannot use --root {config.root}: {exc.strerror or exc}: {exc.filename} "
                  "(it must be a folder the agent can create and write)", file=sys.stderr)
            return 1
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another program, perhaps another pi-agent, has this port: stop it or pick another --port)"
        elif exc.errno == errno.EACCES:
            hint = " (ports below 1024 need privileges: pick a --port of 1024 or more)"
        print(f"pi-agent: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return 1
    _exit_past_stuck_threads(status)
    return status


def _exit_past_stuck_threads(status: int) -> None:
    """Python joins worker threads at exit; a handler stuck in one would keep the process alive.

    Everything is closed by now, so exit without waiting for them (that is
    the only way to stop a thread that will not return).
    """
    deadline = time.monotonic() + STUCK_THREAD_GRACE
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in others:  # idle pool threads are still winding down; give them a moment
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in others if t.is_alive()]
    if stuck:
        log.warning("exiting with %d handler thread(s) still running: %s",
                    len(stuck), ", ".join(t.name for t in stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
