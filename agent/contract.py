"""What the agent and every client must agree on, in one place: codes, the file name rule, the listening line.

Standard library only, with no imports from the rest of the agent, so that
the fleet controller (and any Python client) imports this module alone for
the wire's vocabulary instead of reaching into the agent's internals. The
Node.js client mirrors the same values (``clients/node``). The shapes of the
replies the controller reads are checked in ``fleet/replies.py``.

Error codes are the ``code`` field of a failed reply (``success: false``).
The agent makes the first group; the controller makes the second for what
happens on its side of the wire (a device that never answered, a check after
a push that failed), so that a table or a script sees one vocabulary.
"""

from __future__ import annotations

import keyword
import re
from typing import Any, Dict, Optional, Tuple

# Codes the agent puts in failed replies
BAD_REQUEST = "bad_request"  # malformed or missing arguments
INVALID_JSON = "invalid_json"  # the line is not UTF-8 JSON
UNKNOWN_COMMAND = "unknown_command"
UNAUTHORIZED = "unauthorized"  # missing or wrong token
TOO_LARGE = "too_large"  # request line over the limit
NOT_FOUND = "not_found"  # no such file, module or backup
BUSY = "busy"  # a limit is reached; retry later
TIMEOUT = "timeout"  # a call passed its time limit (the controller uses it too: no reply in time)
HANDLER_ERROR = "handler_error"  # a handler raised or misbehaved
VALIDATION_FAILED = "validation_failed"  # pushed code failed a check
CHECKSUM_MISMATCH = "checksum_mismatch"  # pushed code does not hash to the given sha256
IMPORT_FAILED = "import_failed"  # pushed code failed its import test
LOAD_FAILED = "load_failed"  # a module could not be loaded live
QUARANTINED = "quarantined"  # this version killed or hung the agent when loaded
STORAGE_ERROR = "storage_error"  # the device could not write a file
SHUTTING_DOWN = "shutting_down"  # the agent is stopping
UNSIGNED = "unsigned"  # this agent requires signed code (--trusted-keys) and the version has no signature
BAD_SIGNATURE = "bad_signature"  # the signature does not verify, or its key is not one this agent trusts
INTERNAL_ERROR = "internal_error"  # a bug (the agent's, or the controller's own)

# Codes the controller makes for what happened on its side
UNREACHABLE = "unreachable"  # no connection (refused, timed out, no route)
CONNECTION_LOST = "connection_lost"  # the connection dropped with a request unanswered: it may have run
PROTOCOL_ERROR = "protocol_error"  # the device answered something that does not fit the protocol
TLS_FAILED = "tls_failed"  # the TLS handshake failed: a certificate refused, revoked, expired, or no TLS there
WRONG_DEVICE = "wrong_device"  # over TLS, the agent's certificate names another device
COMMANDS_MISSING = "commands_missing"  # pushed, but its commands are not live
VERIFY_FAILED = "verify_failed"  # the rollout's --verify command failed
ROLLBACK_FAILED = "rollback_failed"  # a device this rollout changed could not be put back

# Signed releases: what a release-signing key (Ed25519) signs for each handler file, and how a key is named.
SIGNED_PREFIX = b"pifleet-handler-file-v1\n"


def signed_message(filename: str, sha256: str) -> bytes:
    """The bytes signed for one handler file: its plain name (``camera_handlers.py``) and the code's sha256,
    so a signature for one file cannot pass for another, nor for other code."""
    return SIGNED_PREFIX + f"{filename.rsplit('/', 1)[-1]}\n{sha256.lower()}".encode("utf-8")


def key_id(raw_public_key: bytes) -> str:
    """A public key's short name: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    import hashlib

    return hashlib.sha256(raw_public_key).hexdigest()[:16]


# TLS roles: the organizational unit of a certificate's subject says what it is for. An agent accepts only
# controllers as clients, so the certificate of a lost or stolen Pi cannot push code to the other Pis.
CONTROLLER_ROLE = "pifleet controller"
DEVICE_ROLE = "pifleet device"
BROKER_ROLE = "pifleet broker"  # an MQTT broker's server certificate: it commands nothing


# The line pi-agent prints once it accepts connections: "pi-agent 0.1.0 listening on 127.0.0.1:3000 (...)"
LISTENING = "listening on"

_FILENAME = re.compile(r"^(?:handlers/)?([A-Za-z][A-Za-z0-9_]*)\.py$")

# Through an MQTT broker (agent/broker_link.py, fleet/broker.py): each device has a topic tree of its own, so a
# broker's access list can give each device's identity its own tree and nothing else (deploy/mosquitto/).
TOPIC_ROOT = "pifleet"
REQUEST_TOPIC = "req"  # pifleet/<id>/req: requests to the device, each naming its reply topic in "reply_to"
REPLY_TOPIC = "reply"  # pifleet/<id>/reply/<controller>: the device's replies, matched by "id"
STATUS_TOPIC = "status"  # retained: {"online": true, ...} from the device; its last will says false
DESIRED_TOPIC = "desired"  # retained: the release the device should run, from the controller
REPORTED_TOPIC = "reported"  # retained: the release the device runs, from the device
BLOB_TOPIC = "blobs"  # pifleet/blobs/<sha256>, retained: one file's code, shared by every device that runs it
DEVICE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # also the rule for devices.json ids: no MQTT wildcards
BROKER_PORTS = {"mqtt": 1883, "mqtts": 8883}


def device_topic(device_id: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{leaf}"


def reply_topic(device_id: str, controller: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{REPLY_TOPIC}/{controller}"


def blob_topic(sha256: str) -> str:
    return f"{TOPIC_ROOT}/{BLOB_TOPIC}/{sha256}"


def broker_address(url: str) -> Tuple[bool, str, int]:
    """``(tls, host, port)`` from ``mqtts://HOST[:PORT]`` or ``mqtt://HOST[:PORT]``; ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in BROKER_PORTS:
        raise ValueError(f"broker {url!r}: give mqtts://HOST[:PORT] (TLS, port 8883 by default) or mqtt://HOST[:PORT]")
    host, colon, port = rest.rstrip("/").rpartition(":") if rest.count(":") == 1 else (rest.rstrip("/"), "", "")
    if not colon:
        host, port = rest.rstrip("/"), str(BROKER_PORTS[scheme])
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"broker {url!r}: expected {scheme}://HOST[:PORT] with a port from 1 to 65535")
    return scheme == "mqtts", host, int(port)



BROKER_MARK = "broker"  # ... "listening on broker mqtts://HOST:8883 as ID (...)": --no-listen, no TCP port


def listening_address(line: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` from the line pi-agent prints once it accepts connections; None for any other line, and
    for an agent reachable only through a broker (``--no-listen``).

    What starts an agent with ``--port 0`` (the demo, the tests) reads the port it got from here.
    """
    if LISTENING not in line:
        return None
    where = line.split(LISTENING, 1)[1].split()[0]
    if where == BROKER_MARK:
        return None
    host, _, port = where.rpartition(":")
    return host, int(port)


def handler_name(raw: object) -> Tuple[Optional[str], str]:
    """The file name rule: ``(NAME, "")`` for ``NAME.py`` or ``handlers/NAME.py`` with NAME a plain
    identifier, else ``(None, why it is refused)``. Only plain files inside ``handlers/``: the system the
    seed documents wrote ``../main.py`` wherever it pointed."""
    if not isinstance(raw, str) or not raw:
        return None, "'filename' is required, for example \"camera_handlers.py\""
    match = _FILENAME.match(raw)
    if match is None or keyword.iskeyword(match.group(1)):
        return None, f"bad filename {raw!r}: {_why_bad_filename(raw)}"
    return match.group(1), ""


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


def json_type(value: Any) -> str:
    """A JSON value's kind as a message names it: ``a string``, ``an object``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# Replies: the fields the controller reads, and their types. Fields an older agent does not send may
# be absent; the few that tables index directly are required. A field the agent adds is added here
# when a client starts to read it.

class Spec:
    """A value's expected shape; ``problem`` says what does not fit, or None."""

    def problem(self, value: Any, where: str) -> Optional[str]:
        raise NotImplementedError


class Kind(Spec):
    def __init__(self, name: str, *types: type) -> None:
        self.name, self.types = name, types

    def problem(self, value: Any, where: str) -> Optional[str]:
        if isinstance(value, bool) and bool not in self.types:
            return f"{where} is a boolean, not {self.name}"
        return None if isinstance(value, self.types) else f"{where} is {json_type(value)}, not {self.name}"


class Opt(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def problem(self, value: Any, where: str) -> Optional[str]:
        return None if value is None else self.inner.problem(value, where)


class ListOf(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def problem(self, value: Any, where: str) -> Optional[str]:
        if not isinstance(value, list):
            return f"{where} is {json_type(value)}, not a list"
        return next((p for i, item in enumerate(value) if (p := self.inner.problem(item, f"{where}[{i}]"))), None)


class DictOf(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def problem(self, value: Any, where: str) -> Optional[str]:
        if not isinstance(value, dict):
            return f"{where} is {json_type(value)}, not an object"
        return next((p for k, item in value.items() if (p := self.inner.problem(item, f"{where}.{k}"))), None)


class Obj(Spec):
    def __init__(self, fields: Dict[str, Spec], required: Tuple[str, ...] = ()) -> None:
        self.fields, self.required = fields, required

    def problem(self, value: Any, where: str) -> Optional[str]:
        if not isinstance(value, dict):
            return f"{where} is {json_type(value)}, not an object"
        for name in self.required:
            if name not in value:
                return f"{where} has no {name!r}"
        for name, spec in self.fields.items():
            if name in value:
                found = spec.problem(value[name], f"{where}.{name}" if where else name)
                if found:
                    return found
        return None


TEXT = Kind("a string", str)
NUMBER = Kind("a number", int, float)
COUNT = Kind("a whole number", int)
FLAG = Kind("true or false", bool)
TEXTS = ListOf(TEXT)
REPORT = Obj({"valid": FLAG, "errors": TEXTS, "warnings": TEXTS})

COMMON = {"success": FLAG, "error": TEXT, "code": TEXT, "message": TEXT, "type": TEXT, "timestamp": NUMBER,
          "validation_details": REPORT}
CHANGE = {"filename": TEXT, "version": Opt(TEXT), "previous_version": Opt(TEXT), "backup_created": Opt(TEXT),
          "unchanged": FLAG, "dry_run": FLAG, "rolled_back": FLAG, "quarantined": FLAG, "restored_from": Opt(TEXT),
          "validation": REPORT, "removed_commands": TEXTS, "warnings": TEXTS,
          "reload": Obj({"success": FLAG, "command_count": COUNT, "commands": TEXTS})}
STATUS = {
    "agent_version": TEXT, "uptime_seconds": NUMBER, "started_at": NUMBER, "python_version": TEXT,
    "hostname": TEXT, "command_count": COUNT, "connections": COUNT, "deploy_features": TEXTS,
    "modules": ListOf(Obj({"file": TEXT, "sha256": TEXT, "commands": TEXTS, "loaded_at": NUMBER},
                          required=("file", "sha256"))),
    "failed_modules": ListOf(Obj({"file": TEXT, "error": TEXT}, required=("file",))),
    "integrity": ListOf(Obj({"file": TEXT, "status": TEXT, "detail": TEXT})),
    "auto_rollbacks": ListOf(Obj({"file": TEXT, "time": NUMBER, "reason": TEXT, "outcome": TEXT})),
    "quarantine": ListOf(Obj({"file": TEXT, "version": TEXT, "reason": TEXT, "time": NUMBER})),
    "disk": Opt(Obj({"free_bytes": COUNT, "total_bytes": COUNT})),
    "isolation": Opt(Obj({"active": DictOf(TEXT), "missing": DictOf(TEXT)})),
    "signatures": Obj({"required": FLAG, "trusted_keys": TEXTS}),
    "bundle": Opt(Obj({"path": TEXT, "sha256": Opt(TEXT)})),
}
SHAPES: Dict[str, Obj] = {
    "get_status": Obj({**COMMON, **STATUS}),
    "update_handler": Obj({**COMMON, **CHANGE}),
    "rollback_handler": Obj({**COMMON, **CHANGE}),
    "reload_handler": Obj({**COMMON, **CHANGE}),
    "delete_handler": Obj({**COMMON, **CHANGE}),
    "list_backups": Obj({**COMMON, "keep": COUNT, "backups": ListOf(Obj(
        {"backup": TEXT, "path": TEXT, "file": TEXT, "created": NUMBER, "size": COUNT, "sha256": Opt(TEXT)},
        required=("backup", "file")))}),
    "update_log": Obj({**COMMON, "entries": ListOf(Obj(
        {"time": NUMBER, "action": TEXT, "file": TEXT, "version": Opt(TEXT), "previous_version": Opt(TEXT),
         "outcome": TEXT, "reason": TEXT, "backup": TEXT, "commands": TEXTS},
        required=("action", "file")))}),
    "list_commands": Obj({**COMMON, "commands": TEXTS, "builtin": TEXTS, "handlers": DictOf(TEXT)}),
    "update_crl": Obj({**COMMON, "crl": TEXT, "changed": FLAG}),
    "upgrade_agent": Obj({**COMMON, "staged": TEXT, "sha256": TEXT, "restarting": FLAG}),
}
ANY_COMMAND = Obj(COMMON)  # a handler's reply: only what every reply carries
