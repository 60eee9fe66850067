"""Errors the agent turns into failed replies.

Every class carries a stable ``code`` (from ``contract``), which becomes the JSON ``code`` field;
the message becomes ``error`` and should be a sentence a person can act on.
``details`` are extra reply fields (for example ``validation_details``).

    AgentError
    +-- BadRequest          bad_request       malformed or missing arguments
    +-- InvalidJSON         invalid_json      the line is not UTF-8 JSON
    +-- UnknownCommand      unknown_command
    +-- Unauthorized        unauthorized      missing or wrong token
    +-- TooLarge            too_large         request line over the limit
    +-- NotFound            not_found         no such file, module or backup
    +-- Busy                busy              a limit is reached; retry later
    +-- Timeout             timeout           a call passed its time limit
    +-- HandlerFailed       handler_error     a handler raised or misbehaved
    +-- ValidationFailed    validation_failed pushed code failed a check
    +-- ChecksumMismatch    checksum_mismatch pushed code does not hash to the given sha256
    +-- ImportFailed        import_failed     pushed code failed its import test
    +-- LoadFailed          load_failed       a module could not be loaded live
    +-- Quarantined         quarantined       this version killed or hung the agent when loaded; push
    |                                         it with force to try again
    +-- StorageFailed       storage_error     the device could not write a file (disk full,
    |                                         read-only SD card)
    +-- ShuttingDown        shutting_down     the agent is stopping; the request did not run, or
    |                                         did not finish in time
    +-- InternalError       internal_error    a bug in the agent itself
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from . import contract


class AgentError(Exception):
    """Base class: a failure that is reported to the client, never raised past the server."""

    code = "agent_error"

    def __init__(self, message: str, *, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})

    def to_reply(self) -> Dict[str, Any]:
        reply: Dict[str, Any] = {"success": False, "error": self.message, "code": self.code}
        reply.update(self.details)
        return reply


class BadRequest(AgentError):
    code = contract.BAD_REQUEST


class InvalidJSON(AgentError):
    code = contract.INVALID_JSON


class UnknownCommand(AgentError):
    code = contract.UNKNOWN_COMMAND


class Unauthorized(AgentError):
    code = contract.UNAUTHORIZED


WRONG_TOKEN = "missing or wrong token: send the agent's token in the 'token' field of every request"


class TooLarge(AgentError):
    code = contract.TOO_LARGE


class NotFound(AgentError):
    code = contract.NOT_FOUND


class Busy(AgentError):
    code = contract.BUSY


class Timeout(AgentError):
    code = contract.TIMEOUT


class HandlerFailed(AgentError):
    code = contract.HANDLER_ERROR


class ValidationFailed(AgentError):
    code = contract.VALIDATION_FAILED


class ChecksumMismatch(AgentError):
    code = contract.CHECKSUM_MISMATCH


class ImportFailed(AgentError):
    code = contract.IMPORT_FAILED


class LoadFailed(AgentError):
    code = contract.LOAD_FAILED


class Quarantined(AgentError):
    code = contract.QUARANTINED


class StorageFailed(AgentError):
    code = contract.STORAGE_ERROR


class ShuttingDown(AgentError):
    code = contract.SHUTTING_DOWN


class InternalError(AgentError):
    code = contract.INTERNAL_ERROR
