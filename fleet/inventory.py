"""The fleet inventory: ``devices.json``, the Python twin of the seed's ``configDevices.js``.

    {
      "defaults": {"port": 3000, "token_env": "PI_AGENT_TOKEN", "timeout": 30, "connect_timeout": 5},
      "raspberryPiDevices": [
        {"id": "raspi_main", "name": "Main camera", "host": "192.168.1.100", "port": 3000,
         "type": "camera", "description": "Finish line", "tags": ["cams"], "token_env": "MAIN_TOKEN"}
      ]
    }

A bad file is refused at load time with the file, the entry and the field
named, so a typo never surfaces halfway through a rollout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from agent.contract import broker_address

from .errors import ConfigError
from .tls import ClientTLS

DEFAULT_PORT = 3000
DEFAULT_TOKEN_ENV = "PI_AGENT_TOKEN"
# Timeouts (seconds)
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DEVICE_KEYS = {"id", "name", "host", "port", "type", "description", "tags", "token", "token_env", "token_file",
                "tls", "ca", "cert", "key", "crl", "transport", "broker"}
_DEFAULT_KEYS = {"port", "token_env", "timeout", "connect_timeout", "tls", "ca", "cert", "key", "crl", "transport",
                 "broker"}
TRANSPORTS = ("tcp", "mqtt")
_TLS_FILES = ("ca", "cert", "key")  # with "tls": true, the fleet CA and this controller's certificate and key


@dataclass(frozen=True)
class BrokerRoute:
    """How a device behind NAT is reached: through this MQTT broker (``fleet/broker.py``)."""

    url: str  # mqtts://HOST[:PORT] or mqtt://HOST[:PORT]
    tls: Optional[ClientTLS] = None  # with mqtts: the fleet CA, and this controller's certificate and key


@dataclass(frozen=True)
class Device:
    id: str
    host: str
    port: int = DEFAULT_PORT
    name: str = ""
    type: str = ""
    description: str = ""
    tags: Tuple[str, ...] = ()
    token: Optional[str] = field(default=None, repr=False)  # never printed
    token_source: str = ""  # where the token comes from, for messages: "$CAM_TOKEN (not set)"
    tls: Optional[ClientTLS] = None  # reached over mutual TLS (fleet/tls.py)
    broker: Optional[BrokerRoute] = None  # reached through an MQTT broker, not by connecting to host:port

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise ValueError("'id' must be 1-64 letters, digits, '_', '.' or '-'")
        if self.broker is None and (not isinstance(self.host, str) or not self.host.strip()):
            raise ValueError("'host' must be a hostname or an IP address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"'port' must be a whole number from 1 to 65535, got {self.port!r}")
        if not all(isinstance(t, str) and t for t in self.tags):
            raise ValueError("'tags' must be a list of non-empty strings")

    @property
    def address(self) -> str:
        return self.broker.url if self.broker is not None else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class Inventory:
    devices: Tuple[Device, ...]
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    source: str = "<memory>"

    def get(self, device_id: str) -> Device:
        for device in self.devices:
            if device.id == device_id:
                return device
        known = ", ".join(d.id for d in self.devices) or "none"
        raise ConfigError(f"{self.source}: no device {device_id!r} (known: {known})")

    def select(self, only: Optional[Sequence[str]] = None, tags: Optional[Sequence[str]] = None) -> List[Device]:
        """Devices named in ``only`` (in inventory order) and carrying any of ``tags``; all by default."""
        chosen = list(self.devices)
        if only:
            for device_id in only:
                self.get(device_id)  # an unknown id is a usage error, not an empty selection
            chosen = [d for d in chosen if d.id in set(only)]
        if tags:
            chosen = [d for d in chosen if set(tags) & set(d.tags)]
            if not chosen:
                raise ConfigError(f"{self.source}: no device has tag {', '.join(tags)}")
        return chosen


def load_inventory(path: Path, environ: Optional[Mapping[str, str]] = None) -> Inventory:
    """Read and validate ``devices.json``; raise ``ConfigError`` naming file, entry and field."""
    environ = os.environ if environ is None else environ
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found (pass -d PATH to use another inventory)") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    return parse_inventory(data, source=source, environ=environ, base=Path(path).resolve().parent)


def parse_inventory(data: Any, *, source: str = "<memory>", environ: Optional[Mapping[str, str]] = None,
                    base: Optional[Path] = None, check_files: bool = True) -> Inventory:
    """``base``: the folder that relative TLS paths start from (the inventory's; default the current one);
    ``check_files`` False: token files are not read (checking an inventory before they are written)."""
    environ = os.environ if environ is None else environ
    base = Path(".") if base is None else base
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be an object with a \"raspberryPiDevices\" list")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: \"defaults\" must be an object")
    unknown = set(defaults) - _DEFAULT_KEYS
    if unknown:
        raise ConfigError(f"{source}: defaults: unknown field(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(_DEFAULT_KEYS))})")
    timeout = _positive(defaults.get("timeout", DEFAULT_TIMEOUT), f"{source}: defaults.timeout")
    connect_timeout = _positive(defaults.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
                                f"{source}: defaults.connect_timeout")
    entries = data.get("raspberryPiDevices")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: \"raspberryPiDevices\" must be a list of devices")
    devices: List[Device] = []
    seen: Dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: raspberryPiDevices[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: each device must be an object")
        if isinstance(entry.get("id"), str):
            where += f" ({entry['id']})"
        for required in ("id",) if _transport(entry, defaults, where) == "mqtt" else ("id", "host"):
            if required not in entry:
                raise ConfigError(f"{where}: missing required field {required!r}")
        unknown = set(entry) - _DEVICE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(_DEVICE_KEYS))})")
        device = _device(entry, defaults, where, environ, base, check_files)
        if device.id in seen:
            raise ConfigError(f"{where}: duplicate id {device.id!r} (also raspberryPiDevices[{seen[device.id]}])")
        seen[device.id] = index
        devices.append(device)
    return Inventory(tuple(devices), timeout=timeout, connect_timeout=connect_timeout, source=source)


def _transport(entry: Dict[str, Any], defaults: Dict[str, Any], where: str) -> str:
    transport = entry.get("transport", defaults.get("transport", "tcp"))
    if transport not in TRANSPORTS:
        raise ConfigError(f"{where}: field 'transport' must be \"tcp\" (connect to host:port) or \"mqtt\" (through "
                          "the broker named in 'broker')")
    return str(transport)


def _broker(entry: Dict[str, Any], defaults: Dict[str, Any], where: str, base: Path) -> Optional[BrokerRoute]:
    """``"transport": "mqtt"`` with ``"broker": "mqtts://HOST:8883"`` (TLS with ``ca``, ``cert``, ``key``)."""
    if _transport(entry, defaults, where) == "tcp":
        return None
    url = entry.get("broker", defaults.get("broker"))
    if not isinstance(url, str):
        raise ConfigError(f"{where}: with \"transport\": \"mqtt\", 'broker' must name the broker (in the entry or "
                          "in defaults), for example \"mqtts://broker.example.com:8883\"")
    try:
        secure, _host, _port = broker_address(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return BrokerRoute(url, _tls_files(entry, defaults, where, base) if secure else None)


def _tls(entry: Dict[str, Any], defaults: Dict[str, Any], where: str, base: Path) -> Optional[ClientTLS]:
    """``"tls": true`` with ``ca``, ``cert`` and ``key`` (in the entry or in defaults; relative to the inventory)."""
    enabled = entry.get("tls", defaults.get("tls", False))
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: field 'tls' must be true or false")
    if not enabled:
        return None
    return _tls_files(entry, defaults, where, base)


def _tls_files(entry: Dict[str, Any], defaults: Dict[str, Any], where: str, base: Path) -> ClientTLS:
    paths = {}
    for name in _TLS_FILES:
        value = entry.get(name, defaults.get(name))
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: with TLS, {name!r} must name a file (in the entry or in "
                              "defaults): the fleet CA's certificate (ca), and this controller's certificate and key "
                              "(cert, key) from `fleet ca issue-controller`")
        paths[name] = base / Path(value).expanduser()
    crl = entry.get("crl", defaults.get("crl"))
    if crl is not None and (not isinstance(crl, str) or not crl):
        raise ConfigError(f"{where}: field 'crl' must name the fleet CA's revocation list (crl.pem)")
    return ClientTLS(paths["ca"], paths["cert"], paths["key"], base / Path(crl).expanduser() if crl else None)


def _token_from_file(value: Any, where: str, base: Path) -> Tuple[str, str]:
    """``token_file``: the first line of a file (relative to the inventory), as ``fleet provision`` writes it."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: field 'token_file' must name a file holding the device's token")
    path = base / Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read its token file {path}: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"{where}: its token file {path} is empty")
    return text.splitlines()[0].strip(), f"its token file {path}"


def _device(entry: Dict[str, Any], defaults: Dict[str, Any], where: str, environ: Mapping[str, str],
            base: Path, check_files: bool = True) -> Device:
    tags = entry.get("tags", [])
    if not isinstance(tags, list):
        raise ConfigError(f"{where}: field 'tags' must be a list of strings")
    token = entry.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigError(f"{where}: field 'token' must be a non-empty string")
    if token is None and entry.get("token_file") is not None:
        token, token_source = _token_from_file(entry["token_file"], where, base) if check_files else ("-", "")
    elif token is None:
        token_env = entry.get("token_env", defaults.get("token_env", DEFAULT_TOKEN_ENV))
        if not isinstance(token_env, str):
            raise ConfigError(f"{where}: field 'token_env' must be the name of an environment variable")
        token = environ.get(token_env) or None
        token_source = f"${token_env}" + ("" if token else " (not set)")
    else:
        token_source = "'token' in its devices.json entry"
    broker = _broker(entry, defaults, where, base)
    tls = _tls(entry, defaults, where, base) if broker is None else None
    for text_field in ("name", "type", "description"):
        if not isinstance(entry.get(text_field, ""), str):
            raise ConfigError(f"{where}: field {text_field!r} must be a string")
    try:
        return Device(
            id=entry["id"],
            host=entry.get("host", ""),
            port=entry.get("port", defaults.get("port", DEFAULT_PORT)),
            name=entry.get("name", ""),
            type=entry.get("type", ""),
            description=entry.get("description", ""),
            tags=tuple(tags),
            token=token,
            token_source=token_source,
            tls=tls,
            broker=broker,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)
