"""What the controller expects devices to answer: a reply is untrusted data until it fits.

A broken or compromised Pi can answer anything. Every reply is checked here,
where it arrives and before anything reads it, against the shape of the
command it answers: each field the controller reads must have the type it
expects. Fields an older agent does not send may be absent; the few the
tables index directly are required. A reply that does not fit makes that one
device ``FAILED`` with ``protocol_error`` and a short description of what did
not fit; the rest of the fleet is served as usual.

The shapes mirror the agent's replies (``agent/deploy_commands.py``,
``agent/app.py``); a field added there is added here when the controller
starts to read it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from agent.protocol import json_type


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
}
ANY_COMMAND = Obj(COMMON)  # a handler's reply: only what every reply carries


def reply_problem(command: str, reply: Dict[str, Any]) -> Optional[str]:
    """What about ``reply`` (to ``command``) does not fit what the controller reads, or None."""
    return SHAPES.get(command.lower(), ANY_COMMAND).problem(reply, "")
