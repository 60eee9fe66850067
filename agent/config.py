"""The agent's settings: one frozen dataclass that validates itself.

Defaults live here as named constants so the CLI's ``--help``, the docs and
the code agree.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from .admission import DEFAULT_LINE_TIMEOUT, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_UNAUTHENTICATED_IDLE
from .protocol import DEFAULT_MAX_LINE_BYTES
from .store import DEFAULT_MAX_BACKUP_BYTES, DEFAULT_MAX_HANDLER_FILES

if TYPE_CHECKING:
    from .tls import TLSFiles

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
TOKEN_ENV = "PI_AGENT_TOKEN"

# Timeouts (seconds)
DEFAULT_HANDLER_TIMEOUT = 30.0
DEFAULT_IMPORT_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_GRACE = 5.0
# Limits
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_HANDLER_THREADS = 16
DEFAULT_MAX_PIPELINED = 64  # requests in flight on one connection before it stops reading
DEFAULT_IMPORT_MEMORY_MB = 512
DEFAULT_KEEP_BACKUPS = 20
DEFAULT_MAX_STUCK_THREADS = 8  # handler calls and loads still running past their time limits
DEFAULT_SANDBOX_USER = "nobody"
# Probation after a deploy
DEFAULT_PROBATION_SECONDS = 600.0
DEFAULT_PROBATION_CALLS = 50
DEFAULT_PROBATION_FAILURES = 5


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class AgentConfig:
    root: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: Optional[str] = None
    token_file: Optional[Path] = None  # hidden from the import test's box
    insecure: bool = False
    tls: Optional["TLSFiles"] = None  # mutual TLS (agent/tls.py); the certificate then identifies the client
    trusted_keys: Optional[Path] = None  # run only code signed by one of these keys (agent/signatures.py)
    broker: Optional[str] = None  # also serve through this MQTT broker (agent/broker_link.py), as device_id
    device_id: Optional[str] = None
    listen: bool = True  # False: no TCP listener, the broker only
    sandbox_user: str = DEFAULT_SANDBOX_USER  # the import test runs as this user when the agent is root
    supervised: bool = False  # a supervisor restarts the agent: exit when stuck threads pass the limit
    # Timeouts
    handler_timeout: float = DEFAULT_HANDLER_TIMEOUT
    import_timeout: float = DEFAULT_IMPORT_TIMEOUT
    idle_timeout: Optional[float] = None  # off: controllers keep connections open
    line_timeout: float = DEFAULT_LINE_TIMEOUT  # a request line must be complete this long after its first byte
    unauthenticated_timeout: float = DEFAULT_UNAUTHENTICATED_IDLE  # silence allowed before the first good request
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    # Limits
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES  # unfinished lines of all connections together
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pipelined: int = DEFAULT_MAX_PIPELINED
    handler_threads: int = DEFAULT_HANDLER_THREADS
    import_memory_mb: int = DEFAULT_IMPORT_MEMORY_MB
    keep_backups: int = DEFAULT_KEEP_BACKUPS
    max_backup_bytes: int = DEFAULT_MAX_BACKUP_BYTES  # all of .backups/ together
    max_handler_files: int = DEFAULT_MAX_HANDLER_FILES
    max_stuck_threads: int = DEFAULT_MAX_STUCK_THREADS
    # Probation
    probation_seconds: float = DEFAULT_PROBATION_SECONDS
    probation_calls: int = DEFAULT_PROBATION_CALLS
    probation_failures: int = DEFAULT_PROBATION_FAILURES

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the token is empty; put a secret in the token file or unset it")
        for name in ("handler_timeout", "import_timeout", "shutdown_grace", "probation_seconds", "line_timeout",
                     "unauthenticated_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ConfigError(f"idle_timeout must be positive or unset, got {self.idle_timeout}")
        for name in (
            "max_line_bytes", "max_buffered_bytes", "max_connections", "max_pipelined", "handler_threads",
            "import_memory_mb", "keep_backups", "max_backup_bytes", "max_handler_files", "probation_calls", "probation_failures", "max_stuck_threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not _user_exists(self.sandbox_user):
            raise ConfigError(f"no user {self.sandbox_user!r} on this system for the import test's box "
                              "(--sandbox-user); name an existing unprivileged user, such as nobody")
        self._check_broker()
        if not self.listen and self.broker is None:
            raise ConfigError("--no-listen leaves the agent no way to be reached: give --broker too")
        if self.listen and self.token is None and self.tls is None and not self.insecure \
                and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without a token or TLS: anyone on the network could "
                f"push code. Give --tls-cert/--tls-key/--tls-ca (mutual TLS), or --token-file or {TOKEN_ENV}, "
                "or pass --insecure if you really mean it"
            )


    def _check_broker(self) -> None:
        if self.broker is None:
            if self.device_id is not None:
                raise ConfigError("--device-id is this device's name at an MQTT broker: give --broker too")
            return
        from .contract import DEVICE_ID, broker_address

        try:
            secure, host, _port = broker_address(self.broker)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.device_id is None or not DEVICE_ID.match(self.device_id):
            raise ConfigError("--broker needs --device-id ID: 1-64 letters, digits, '_', '.' or '-', as in the "
                              "controller's devices.json")
        if not secure and not self.insecure and not is_loopback(host):
            raise ConfigError(f"refusing plain MQTT to {host}: whoever can reach that broker could command this "
                              "device. Use mqtts:// with --tls-cert/--tls-key/--tls-ca, or pass --insecure if you "
                              "really mean it")
        if secure and self.tls is None:
            raise ConfigError(f"{self.broker}: mqtts needs --tls-cert, --tls-key and --tls-ca (this device's "
                              "certificate is its identity at the broker)")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress  # here, not at the top: the agent's start time is mostly imports

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: Optional[str], environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The token from ``--token-file`` (first line, stripped) or from the environment."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    from_env = env.get(TOKEN_ENV)
    return from_env if from_env else None


def take_token_from_environment() -> None:
    """Remove the token from the agent's environment, so handlers and what they start never see it.

    ``/proc/PID/environ`` still shows the environment the process started
    with; only a token file keeps the token out of there.
    """
    os.environ.pop(TOKEN_ENV, None)
