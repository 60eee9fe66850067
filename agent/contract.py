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
from typing import Optional, Tuple

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


# The line pi-agent prints once it accepts connections: "pi-agent 0.1.0 listening on 127.0.0.1:3000 (...)"
LISTENING = "listening on"

_FILENAME = re.compile(r"^(?:handlers/)?([A-Za-z][A-Za-z0-9_]*)\.py$")


def listening_address(line: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` from the line pi-agent prints once it accepts connections; None for any other line.

    What starts an agent with ``--port 0`` (the demo, the tests) reads the port it got from here.
    """
    if LISTENING not in line:
        return None
    host, _, port = line.split(LISTENING, 1)[1].split()[0].rpartition(":")
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
