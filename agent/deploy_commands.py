"""The built-in commands that change handler code, as the wire sees them.

Each command parses its arguments, calls the pipeline (``pipeline``), and
shapes the result into the reply the seed documents (``update_handler``'s
``message``, ``backup_created``, ``validation_passed``, ``reload``, ...).
Nothing here decides anything about the code itself.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Optional

from .activation import Quarantine
from .changes import Outcome, Removal, Untouched
from .filenames import module_name_from_filename
from .errors import BadRequest
from .isolation import ImportTester
from .pipeline import DeployPipeline
from .protocol import Request
from .recovery import Recovery
from .registry import sha256_hex

# Limits
DEFAULT_LOG_LIMIT = 50
MAX_LOG_LIMIT = 1000
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Deploy arguments added after the seed's, listed in get_status so a controller can tell which agents
# honour them: an older agent ignores an argument it does not know, and a controller must not rely on it.
DEPLOY_FEATURES = ("if_version", "to_version", "force", "release", "signature")


class DeployCommands:
    def __init__(self, pipeline: DeployPipeline, recovery: Recovery, quarantine: Quarantine,
                 tester: ImportTester) -> None:
        self.pipeline = pipeline
        self.recovery = recovery
        self.quarantine = quarantine
        self.tester = tester

    async def update_handler(self, request: Request) -> Dict[str, Any]:
        args = request.args
        name = module_name_from_filename(args.get("filename"))
        code = args.get("code")
        if not isinstance(code, str):
            raise BadRequest("'code' is required: the full source of the handler module, as a string")
        try:
            source = code.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("'code' contains characters that cannot be encoded as UTF-8") from None
        expected = args.get("sha256")
        if expected is not None and not isinstance(expected, str):
            raise BadRequest("'sha256' must be the hex sha256 of the code")
        release = args.get("release")
        if release is not None and (isinstance(release, bool) or not isinstance(release, int) or release < 1):
            raise BadRequest(f"'release' must be the controller's release number (a whole number from 1), got {release!r}")
        signature, signer = args.get("signature"), args.get("key_id")
        if (signature is None) != (signer is None) or not isinstance(signature or "", str) or \
                not isinstance(signer or "", str):
            raise BadRequest("'signature' (base64) and 'key_id' go together, as strings")
        outcome = await self.pipeline.update(
            name, source, sha256=expected, dry_run=_flag(args, "dry_run"),
            rule=self.pipeline.probation.rule_from(args.get("probation")), force=_flag(args, "force"), release=release,
            signature=signature, key_id=signer)
        return _updated(outcome)

    async def rollback_handler(self, request: Request) -> Dict[str, Any]:
        args = request.args
        name = module_name_from_filename(args.get("filename"))
        wanted = args.get("backup")
        if wanted is not None and not isinstance(wanted, str):
            raise BadRequest("'backup' must be a backup name from list_backups")
        to_version = _version_arg(args, "to_version")
        if wanted is not None and to_version is not None:
            raise BadRequest("give 'backup' or 'to_version', not both")
        result = await self.pipeline.rollback(name, backup=wanted, to_version=to_version,
                                              if_version=_version_arg(args, "if_version"), force=_flag(args, "force"))
        return _untouched(result) if isinstance(result, Untouched) else _updated(result, rollback=True)

    async def reload_handler(self, request: Request) -> Dict[str, Any]:
        outcome = await self.pipeline.reload(module_name_from_filename(request.args.get("filename")))
        return _updated(outcome, message=f"Handler {outcome.name}.py reloaded from disk")

    async def delete_handler(self, request: Request) -> Dict[str, Any]:
        args = request.args
        result = await self.pipeline.delete(module_name_from_filename(args.get("filename")),
                                            keep_backup=_flag(args, "backup", default=True),
                                            if_version=_version_arg(args, "if_version"))
        return _untouched(result) if isinstance(result, Untouched) else _deleted(result)

    async def list_backups(self, request: Request) -> Dict[str, Any]:
        raw = request.args.get("filename")
        name = module_name_from_filename(raw) if raw is not None else None
        backups = await self.pipeline.run(self._backups_with_versions, name)
        return {"type": "backups", "backups": backups, "keep": self.pipeline.config.keep_backups}

    def _backups_with_versions(self, name: Optional[str]) -> List[Dict[str, Any]]:
        store = self.pipeline.store
        entries = store.backups(name)
        for entry in entries:
            try:
                entry["sha256"] = sha256_hex((store.backups_dir / entry["backup"]).read_bytes())
            except FileNotFoundError:
                entry["sha256"] = None
        return entries

    async def update_log(self, request: Request) -> Dict[str, Any]:
        limit = request.args.get("limit", DEFAULT_LOG_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LOG_LIMIT:
            raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_LOG_LIMIT}")
        entries = await self.pipeline.run(self.pipeline.store.read_log, limit)
        return {"type": "update_log", "entries": entries}

    def status(self) -> Dict[str, Any]:
        """The deploy side of ``get_status``. Quick: it reads memory, and the quarantine folder's few files."""
        integrity = self.recovery.integrity
        return {
            "probation": self.pipeline.probation.status(),
            "integrity": [integrity[name] for name in sorted(integrity)],
            "auto_rollbacks": list(self.recovery.auto_rollbacks),
            "quarantine": self.quarantine.entries(),
            "isolation": self.tester.isolation,
            "import_helper_pid": self.tester.helper_pid,
            "deploy_features": list(DEPLOY_FEATURES),
        }


def _updated(outcome: Outcome, *, rollback: bool = False, message: Optional[str] = None) -> Dict[str, Any]:
    """The seed's ``update_handler`` success reply (also for rollbacks and reloads), with the fields added since."""
    name = outcome.name
    if outcome.dry_run:
        message = f"Handler {name}.py passed every check (dry run: nothing was changed)"
    elif outcome.unchanged:
        message = f"Handler {name}.py is already at this version; nothing to do"
    elif rollback:
        message = f"Handler {name}.py rolled back to {outcome.restored_from}"
    message = message or f"Handler {name}.py updated successfully with safety checks"
    return {
        "type": "handler_rolled_back" if rollback else "handler_updated",
        "message": message,
        "filename": f"handlers/{name}.py",
        "backup_created": outcome.backup,
        "validation_passed": True,
        "validation": {"valid": True, "errors": [], "warnings": outcome.report.details()["warnings"]},
        "reload": {"success": not outcome.dry_run, "command_count": len(outcome.commands),
                   "commands": outcome.commands},
        "version": outcome.version,
        "previous_version": outcome.previous_version,
        "unchanged": outcome.unchanged,
        "dry_run": outcome.dry_run,
        "restored_from": outcome.restored_from,
        "probation": outcome.watch.as_dict() if outcome.watch is not None else None,
        "duration_seconds": round(time.perf_counter() - outcome.started, 4),
    }


def _deleted(removal: Removal) -> Dict[str, Any]:
    name = removal.name
    return {
        "type": "handler_deleted",
        "message": f"Handler {name}.py deleted" + (f"; backup at {removal.backup}" if removal.backup else ""),
        "filename": f"handlers/{name}.py",
        "backup_created": removal.backup,
        "removed_commands": removal.removed_commands,
        "previous_version": removal.previous_version,
        "warnings": removal.warnings,
    }


def _untouched(result: Untouched) -> Dict[str, Any]:
    live = result.live_version
    return {
        "type": "handler_unchanged",
        "message": (f"handlers/{result.name}.py is {'at ' + live[:12] if live else 'not there'}, "
                    f"not at {result.expected[:12]}: nothing was changed"),
        "filename": f"handlers/{result.name}.py",
        "unchanged": True,
        "version": live,
    }


def _flag(args: Dict[str, Any], key: str, default: bool = False) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false, got {value!r}")
    return value


def _version_arg(args: Dict[str, Any], key: str) -> Optional[str]:
    """An optional sha256 argument (``if_version``, ``to_version``), lower-cased."""
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BadRequest(f"'{key}' must be a sha256 of 64 hex digits, as get_status and list_backups show it")
    return value.lower()

