"""Safe remote deploy: the built-in commands that change handler code on the device.

The pipeline for ``update_handler`` (and, with small differences, for
``rollback_handler`` and ``reload_handler``), in this order:

    1. filename     NAME.py or handlers/NAME.py, NAME a plain identifier
    2-5. checks     syntax, dangerous calls, protected imports, dependencies
    6. import test  in a separate process, then the runtime test (the
                    command table, clashes with other modules, self_test())
    -- nothing on disk or in memory has changed up to here --
    backup          the current file to .backups/ (seed naming)
    write           the new file, atomically
    load            a fresh module object compiled from those same bytes
    swap            the command table, in one assignment
    hand over       new_module.on_reload(previous_module), if defined
    log             one line in the update log; probation starts

If loading fails after the write, the previous file is put back (the previous
module never left the table) and the reply says ``rolled_back: true``.

Deploys of one file are serialised by a per-file lock; deploys of different
files, ``ping`` and handler calls go on meanwhile, because every blocking step
runs in the agent's own worker threads, never in the handler pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import re
import time
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar

from .checks import CheckReport, Issue, check_code, module_name_from_filename
from .config import AgentConfig
from .errors import (AgentError, BadRequest, ChecksumMismatch, ImportFailed, LoadFailed, NotFound, StorageFailed,
                     ValidationFailed)
from .isolation import ImportTester
from .probation import Probation, ProbationRule, Watch
from .protocol import Request
from .registry import LoadedModule, Registry, compile_module, sha256_hex
from .store import HandlerStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Limits
DEFAULT_LOG_LIMIT = 50
MAX_LOG_LIMIT = 1000
KEEP_AUTO_ROLLBACKS = 20
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Deploy arguments added after the seed's, listed in get_status so a controller can tell which agents
# honour them: an older agent ignores an argument it does not know, and a controller must not rely on it.
DEPLOY_FEATURES = ("if_version", "to_version")


class Deployer:
    def __init__(
        self, config: AgentConfig, registry: Registry, work_pool: concurrent.futures.ThreadPoolExecutor
    ) -> None:
        self.config = config
        self.registry = registry
        self._pool = work_pool
        self.store = HandlerStore(config.root, keep_backups=config.keep_backups)
        self.tester = ImportTester(timeout=config.import_timeout, memory_mb=config.import_memory_mb)
        self.probation = Probation(
            ProbationRule(config.probation_seconds, config.probation_calls, config.probation_failures),
            on_failed=self._probation_failed,
        )
        self._locks: Dict[str, asyncio.Lock] = {}
        self.integrity: Dict[str, Dict[str, Any]] = {}
        self.auto_rollbacks: List[Dict[str, Any]] = []
        self._background: Set["asyncio.Task[Any]"] = set()

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking work in the agent's worker threads (never the handler pool)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # Lifecycle

    async def start(self) -> None:
        """Create the folders and load every handler file, each through the isolated import test."""
        await self._run(self.store.ensure_dirs)
        for name in await self._run(self.store.live_names):
            await self._load_at_start(name)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self._run(self.tester.close)

    async def _load_at_start(self, name: str) -> None:
        """Load one handler file at start; report tampering; replace a broken file by its last good copy."""
        source = await self._run(self.store.read_live, name)
        good = await self._run(self.store.read_good, name)
        if source is None:
            return
        version = sha256_hex(source)
        good_version = sha256_hex(good) if good is not None else None
        modified = good_version is not None and good_version != version
        if modified:
            self.integrity[name] = {
                "file": f"{name}.py",
                "status": "modified",
                "detail": f"handlers/{name}.py differs from the version last deployed through the agent "
                          f"(found {version[:12]}, expected {str(good_version)[:12]}): edited by hand, "
                          "corrupted, or written by an interrupted deploy",
            }
            log.warning("%s", self.integrity[name]["detail"])
        problem = await self._try_load(name, source)
        if problem is None:
            return
        if modified and good is not None and await self._try_load(name, good) is None:
            # The good copy runs now. Writing it back may fail (a card that turned read-only): the agent
            # must still start, so that the device can be reached and the problem seen.
            unsaved = await self._recorded("writing it back to the file", self.store.write_live, name, good)
            if unsaved is None:
                detail = f"handlers/{name}.py did not load ({problem}); replaced by its last good copy"
                self.integrity[name] = {"file": f"{name}.py", "status": "restored", "detail": detail}
                await self._recorded("writing the update log", self.store.append_log,
                                     _log_entry("restore", name, sha256_hex(good), version, reason=problem))
            else:
                detail = (f"handlers/{name}.py did not load ({problem}); its last good copy runs, but {unsaved} "
                          "(check the device's storage; the next start will do the same)")
                self.integrity[name] = {"file": f"{name}.py", "status": "restored_in_memory", "detail": detail}
            log.error("%s", detail)
            return
        self.registry.mark_failed(name, problem)
        log.error("handler module %s.py failed to load: %s", name, problem)

    async def _try_load(self, name: str, source: bytes) -> Optional[str]:
        """Import-test and load ``source`` as module ``name``; the reason it failed, or None."""
        try:
            text = _decode(name, source)
            result = await self._run(self.tester.test, name, text)
            if not result.ok:
                return result.error
            self.registry.install(await self._compile(name, source))
        except AgentError as exc:
            return exc.message
        return None

    async def _compile(self, name: str, source: bytes) -> LoadedModule:
        path = str(self.store.live_path(name))
        try:
            return await asyncio.wait_for(self._run(compile_module, name, source, path), self.config.import_timeout)
        except asyncio.TimeoutError:
            raise LoadFailed(f"{name}.py did not finish loading within {self.config.import_timeout:g} s") from None

    # Built-in commands

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
        if expected is not None:
            if not isinstance(expected, str):
                raise BadRequest("'sha256' must be the hex sha256 of the code")
            actual = sha256_hex(source)
            if expected.lower() != actual:
                raise ChecksumMismatch(
                    f"sha256 mismatch: the code received hashes to {actual} but the request says "
                    f"{expected}; the transfer was corrupted or the wrong file was sent, nothing was changed"
                )
        rule = self.probation.rule_from(args.get("probation"))
        dry_run = _flag(args, "dry_run")
        async with self._lock(name):
            return await self._deploy(name, source, action="deploy", dry_run=dry_run, rule=rule)

    async def rollback_handler(self, request: Request) -> Dict[str, Any]:
        name = module_name_from_filename(request.args.get("filename"))
        wanted = request.args.get("backup")
        if wanted is not None and not isinstance(wanted, str):
            raise BadRequest("'backup' must be a backup name from list_backups")
        to_version = _version_arg(request.args, "to_version")
        if_version = _version_arg(request.args, "if_version")
        if wanted is not None and to_version is not None:
            raise BadRequest("give 'backup' or 'to_version', not both")
        async with self._lock(name):
            elsewhere = await self._run(self._unless_at, name, if_version)
            if elsewhere is not None:
                return elsewhere
            backup, source = await self._run(self._choose_backup, name, wanted, to_version)
            return await self._deploy(name, source, action="rollback", restored_from=backup)

    def _unless_at(self, name: str, if_version: Optional[str]) -> Optional[Dict[str, Any]]:
        """With ``if_version``: the reply that changes nothing, when the live file is at another version.

        A controller undoing its own push names the version it pushed. If that
        push never took effect, or someone has deployed since, the undo must
        leave the file alone. Callers hold the file's lock, so a push still
        running finishes first and the answer is final.
        """
        if if_version is None:
            return None
        live = self.store.read_live(name)
        live_version = sha256_hex(live) if live is not None else None
        if live_version == if_version:
            return None
        return {
            "type": "handler_unchanged",
            "message": (f"handlers/{name}.py is {'at ' + live_version[:12] if live_version else 'not there'}, "
                        f"not at {if_version[:12]}: nothing was changed"),
            "filename": f"handlers/{name}.py",
            "unchanged": True,
            "version": live_version,
        }

    def _choose_backup(self, name: str, wanted: Optional[str], to_version: Optional[str] = None) -> tuple:
        if wanted is not None:
            return self.store.backup_name(wanted), self.store.read_backup(name, wanted)
        if to_version is not None:
            for entry in self.store.backups(name):
                data = self.store.read_backup(name, entry["backup"])
                if sha256_hex(data) == to_version:
                    return entry["backup"], data
            raise NotFound(f"no backup of {name}.py is at version {to_version[:12]}")
        live = self.store.read_live(name)
        live_version = sha256_hex(live) if live is not None else None
        backups = self.store.backups(name)
        if not backups:
            raise NotFound(f"there is no backup of {name}.py to roll back to")
        # The newest backup that differs from what runs now (rolling back must change something: the
        # system the seed documents "rolled back" to the current version), and that probation did not
        # take off the device.
        failed = self._failed_probation(name)
        skipped = []
        for entry in backups:
            data = self.store.read_backup(name, entry["backup"])
            version = sha256_hex(data)
            if version in failed:
                skipped.append(version[:12])
            elif version != live_version:
                return entry["backup"], data
        if skipped:
            raise NotFound(
                f"no backup of {name}.py to go back to: the others are versions that probation rolled back "
                f"because they kept failing ({', '.join(dict.fromkeys(skipped))}); to restore one anyway, "
                "name it with 'backup' (list_backups shows them)")
        raise NotFound(f"every backup of {name}.py is identical to the live version; nothing to roll back to")

    def _failed_probation(self, name: str) -> Set[str]:
        """Versions of ``name`` that probation rolled back and that nobody has deployed or restored since.

        A plain rollback skips them. A rollback sent by hand is itself backed
        up, so a second one undoes it; but an operator who sees errors and
        sends a rollback after the agent already rolled back by itself must
        not put the failing code back. Walking the log newest first, a version
        counts again once it is deployed or restored.
        """
        file = f"{name}.py"
        failed: Set[str] = set()
        put_back: Set[str] = set()
        for entry in self.store.read_log():  # newest first
            if entry.get("file") != file or entry.get("outcome") != "ok":
                continue
            if entry.get("action") == "auto_rollback":
                previous = entry.get("previous_version")
                if previous and previous not in put_back:
                    failed.add(previous)
            if entry.get("action") in ("deploy", "rollback", "auto_rollback") and entry.get("version"):
                put_back.add(entry["version"])
        return failed

    async def reload_handler(self, request: Request) -> Dict[str, Any]:
        name = module_name_from_filename(request.args.get("filename"))
        async with self._lock(name):
            source = await self._run(self.store.read_live, name)
            if source is None:
                raise NotFound(f"handlers/{name}.py does not exist on this device")
            return await self._deploy(name, source, action="reload")

    async def delete_handler(self, request: Request) -> Dict[str, Any]:
        name = module_name_from_filename(request.args.get("filename"))
        keep_backup = _flag(request.args, "backup", default=True)
        if_version = _version_arg(request.args, "if_version")
        async with self._lock(name):
            elsewhere = await self._run(self._unless_at, name, if_version)
            if elsewhere is not None:
                return elsewhere
            return await self._delete(name, keep_backup=keep_backup, action="delete")

    async def list_backups(self, request: Request) -> Dict[str, Any]:
        raw = request.args.get("filename")
        name = module_name_from_filename(raw) if raw is not None else None
        backups = await self._run(self._backups_with_versions, name)
        return {"type": "backups", "backups": backups, "keep": self.config.keep_backups}

    def _backups_with_versions(self, name: Optional[str]) -> List[Dict[str, Any]]:
        entries = self.store.backups(name)
        for entry in entries:
            try:
                entry["sha256"] = sha256_hex((self.store.backups_dir / entry["backup"]).read_bytes())
            except FileNotFoundError:
                entry["sha256"] = None
        return entries

    async def update_log(self, request: Request) -> Dict[str, Any]:
        limit = request.args.get("limit", DEFAULT_LOG_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LOG_LIMIT:
            raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_LOG_LIMIT}")
        entries = await self._run(self.store.read_log, limit)
        return {"type": "update_log", "entries": entries}

    def status(self) -> Dict[str, Any]:
        """The deploy side of ``get_status``."""
        return {
            "probation": self.probation.status(),
            "integrity": [self.integrity[name] for name in sorted(self.integrity)],
            "auto_rollbacks": list(self.auto_rollbacks),
            "import_helper_pid": self.tester.helper_pid,
            "deploy_features": list(DEPLOY_FEATURES),
        }

    # The pipeline (callers hold the file's lock)

    async def _deploy(
        self,
        name: str,
        source: bytes,
        *,
        action: str,
        dry_run: bool = False,
        rule: Optional[ProbationRule] = None,
        restored_from: Optional[str] = None,
        reason: Optional[str] = None,
    ) -> Dict[str, Any]:
        started = time.perf_counter()
        filename = f"handlers/{name}.py"
        version = sha256_hex(source)
        text = _decode(name, source)
        live = await self._run(self.store.read_live, name)
        live_version = sha256_hex(live) if live is not None else None
        loaded = self.registry.modules.get(name)
        writes_file = action != "reload"

        if writes_file and live_version == version and loaded is not None and loaded.sha256 == version:
            return self._reply(action, name, loaded, version, live_version, backup=None,
                               report=CheckReport(), unchanged=True, dry_run=dry_run, started=started)

        report = await self._run(check_code, text, filename)
        if not report.valid:
            raise _refused(ValidationFailed, filename, report, report.errors[0].message)
        result = await self._run(self.tester.test, name, text)
        if not result.ok:
            if result.kind in ("table", "self_test"):  # it imported; the runtime test failed
                report.errors.append(Issue("runtime", result.error))
                raise _refused(ValidationFailed, filename, report, result.error)
            report.errors.append(Issue("import", result.error))
            raise _refused(ImportFailed, filename, report, f"Import test failed: {result.error}")
        report.warnings.extend(Issue("runtime", w) for w in result.warnings)
        clashes = self.registry.conflicts(name, result.commands)
        if clashes:
            report.errors.extend(Issue("runtime", c) for c in clashes)
            raise _refused(ValidationFailed, filename, report, f"Runtime test failed: {clashes[0]}")
        if dry_run:
            return self._reply(action, name, None, version, live_version, backup=None, report=report,
                               dry_run=True, started=started, commands=result.commands)

        backup = None
        if writes_file:
            try:
                if live is not None:
                    backup = await self._run(self.store.create_backup, name, live)
                await self._run(self.store.write_live, name, source)
            except OSError as exc:  # the live file is written atomically: it is still the old one
                if backup is not None:
                    await self._recorded(f"removing the backup {backup} again", self.store.remove_backup, backup)
                raise _storage_failed(f"could not write {filename}", exc) from None
        try:
            module = await self._compile(name, source)
            previous = self.registry.install(module)
        except LoadFailed as exc:
            if writes_file:
                await self._run(self._put_back, name, live, backup)
            await self._run(self.store.append_log, _log_entry(
                action, name, version, live_version, outcome="rolled_back", reason=exc.message))
            log.error("%s of %s failed to load and was undone: %s", action, filename, exc.message)
            raise LoadFailed(
                f"{filename} passed its checks but failed to load: {exc.message}; "
                "the previous version is still live",
                details={"rolled_back": True, "filename": filename, "validation_passed": True,
                         "validation_details": report.details()},
            ) from None
        # From here the new version is live: a failure to write the records below is a warning, not a failure.
        unrecorded = [await self._recorded("saving the last good copy", self.store.save_good, name, source)]
        self.integrity.pop(name, None)
        handover = await self._hand_over(module, previous)
        if handover:
            report.warnings.append(Issue("runtime", handover))
        watch = self.probation.start(name, version, backup, rule if action == "deploy" else None)
        unrecorded.append(await self._recorded("writing the update log", self.store.append_log, _log_entry(
            action, name, version, live_version, backup=backup, restored_from=restored_from,
            commands=list(module.commands), reason=reason)))
        report.warnings.extend(Issue("storage", text) for text in _made_anyway(unrecorded))
        log.info("%s %s: %s -> %s, %d command(s), backup %s", action, filename,
                 (live_version or "none")[:12], version[:12], len(module.commands), backup or "none")
        return self._reply(action, name, module, version, live_version, backup=backup, report=report,
                           started=started, watch=watch, restored_from=restored_from)

    async def _recorded(self, what: str, func: Callable[..., Any], *args: Any) -> Optional[str]:
        """Run a disk write that must not undo a change already made; a warning if the disk refuses it."""
        try:
            await self._run(func, *args)
        except OSError as exc:
            log.error("%s failed: %s", what, exc)
            return f"{what} failed: {_os_reason(exc)}"
        return None

    def _put_back(self, name: str, live: Optional[bytes], backup: Optional[str]) -> None:
        if live is None:
            self.store.remove_live(name)
        else:
            self.store.write_live(name, live)
        if backup is not None:
            self.store.remove_backup(backup)  # it is identical to the live file again

    async def _hand_over(self, module: LoadedModule, previous: Optional[LoadedModule]) -> Optional[str]:
        """Give the new module the old one (``on_reload``) so state such as a recording carries over."""
        hook = getattr(module.module, "on_reload", None)
        if previous is None or not callable(hook):
            return None
        try:
            if inspect.iscoroutinefunction(hook):
                await asyncio.wait_for(hook(previous.module), self.config.import_timeout)
            else:
                await asyncio.wait_for(self._run(hook, previous.module), self.config.import_timeout)
        except asyncio.TimeoutError:
            message = f"on_reload() did not finish within {self.config.import_timeout:g} s"
        except BaseException as exc:  # noqa: BLE001 - module code
            message = f"on_reload() raised {type(exc).__name__}: {exc}"
        else:
            return None
        log.warning("%s.py: %s; the new version is live without the old state", module.name, message)
        return message

    async def _delete(self, name: str, *, keep_backup: bool, action: str, reason: Optional[str] = None) -> Dict[str, Any]:
        live = await self._run(self.store.read_live, name)
        if live is None and name not in self.registry.modules and name not in self.registry.failed:
            raise NotFound(f"handlers/{name}.py does not exist on this device")
        backup = None
        if live is not None:
            try:
                if keep_backup:
                    backup = await self._run(self.store.create_backup, name, live)
                await self._run(self.store.remove_live, name)
            except OSError as exc:
                if backup is not None:
                    await self._recorded(f"removing the backup {backup} again", self.store.remove_backup, backup)
                raise _storage_failed(f"could not delete handlers/{name}.py", exc,
                                      "the file is still there and its commands still run") from None
        previous = self.registry.remove(name)
        self.probation.stop(name)
        old_version = sha256_hex(live) if live is not None else None
        unrecorded = [
            await self._recorded("removing the last good copy", self.store.remove_good, name),
            await self._recorded("writing the update log", self.store.append_log,
                                 _log_entry(action, name, None, old_version, backup=backup, reason=reason)),
        ]
        log.info("%s handlers/%s.py (backup %s)", action, name, backup or "none")
        return {
            "type": "handler_deleted",
            "message": f"Handler {name}.py deleted" + (f"; backup at {backup}" if backup else ""),
            "filename": f"handlers/{name}.py",
            "backup_created": backup,
            "removed_commands": sorted(previous.commands) if previous else [],
            "previous_version": old_version,
            "warnings": _made_anyway(unrecorded),
        }

    # Probation

    def _probation_failed(self, watch: Watch) -> None:
        task = asyncio.ensure_future(self._auto_rollback(watch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _auto_rollback(self, watch: Watch) -> None:
        name = watch.name
        reason = (f"probation: {watch.failures} of {watch.calls} calls failed since the deploy "
                  f"(last error: {watch.last_error})")
        record: Dict[str, Any] = {"file": f"{name}.py", "time": time.time(), "from_version": watch.version,
                                  "reason": reason}
        async with self._lock(name):
            loaded = self.registry.modules.get(name)
            if loaded is None or loaded.sha256 != watch.version:
                return  # something else changed the module meanwhile
            try:
                if watch.backup is None:
                    reply = await self._delete(name, keep_backup=True, action="auto_rollback", reason=reason)
                    record.update(to_version=None, outcome="unloaded")
                else:
                    source = await self._run(self.store.read_backup, name, watch.backup)
                    reply = await self._deploy(name, source, action="auto_rollback",
                                               restored_from=watch.backup, reason=reason)
                    record.update(to_version=reply["version"], outcome="rolled_back")
            except AgentError as exc:
                record.update(outcome="failed", error=exc.message)
                log.error("automatic rollback of %s.py failed: %s", name, exc.message)
        log.warning("%s.py rolled back automatically: %s", name, reason)
        self.auto_rollbacks.append(record)
        del self.auto_rollbacks[:-KEEP_AUTO_ROLLBACKS]

    # Replies

    def _reply(
        self,
        action: str,
        name: str,
        module: Optional[LoadedModule],
        version: str,
        live_version: Optional[str],
        *,
        backup: Optional[str],
        report: CheckReport,
        started: float,
        unchanged: bool = False,
        dry_run: bool = False,
        watch: Optional[Watch] = None,
        restored_from: Optional[str] = None,
        commands: Optional[List[str]] = None,
    ) -> Dict[str, Any]:
        commands = list(module.commands) if module is not None else list(commands or [])
        if dry_run:
            message = f"Handler {name}.py passed every check (dry run: nothing was changed)"
        elif unchanged:
            message = f"Handler {name}.py is already at this version; nothing to do"
        elif action == "rollback":
            message = f"Handler {name}.py rolled back to {restored_from}"
        elif action == "reload":
            message = f"Handler {name}.py reloaded from disk"
        else:
            message = f"Handler {name}.py updated successfully with safety checks"
        details = report.details()
        return {
            "type": f"handler_{'rolled_back' if action == 'rollback' else 'updated'}",
            "message": message,
            "filename": f"handlers/{name}.py",
            "backup_created": backup,
            "validation_passed": True,
            "validation": {"valid": True, "errors": [], "warnings": details["warnings"]},
            "reload": {"success": not dry_run, "command_count": len(commands), "commands": commands},
            "version": version,
            "previous_version": live_version,
            "unchanged": unchanged,
            "dry_run": dry_run,
            "restored_from": restored_from,
            "probation": watch.as_dict() if watch is not None else None,
            "duration_seconds": round(time.perf_counter() - started, 4),
        }


def _refused(error_class: type, filename: str, report: CheckReport, first: str) -> AgentError:
    """A refused push in the seed's shape: ``Code validation failed: <first reason>``."""
    return error_class(
        f"Code validation failed: {first}",
        details={"filename": filename, "validation_passed": False, "validation_details": report.details()},
    )


def _decode(name: str, source: bytes) -> str:
    try:
        return source.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"Code validation failed: {name}.py is not valid UTF-8 (byte {exc.start})") from None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _made_anyway(unrecorded: List[Optional[str]]) -> List[str]:
    """Warnings for the records ``_recorded`` could not write after a change that stands."""
    return [f"the change was made, but {text}" for text in unrecorded if text]


def _storage_failed(doing: str, exc: OSError, still: str = "the previous version is still live") -> StorageFailed:
    return StorageFailed(
        f"{doing} on the device: {_os_reason(exc)}; nothing was changed, {still} "
        "(free some space on the device, or check its SD card: a failing card turns read-only)")


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


def _log_entry(action: str, name: str, version: Optional[str], previous: Optional[str], **extra: Any) -> Dict[str, Any]:
    entry = {"time": time.time(), "action": action, "file": f"{name}.py", "version": version,
             "previous_version": previous}
    entry.update({k: v for k, v in extra.items() if v is not None})
    entry.setdefault("outcome", "ok")
    return entry

