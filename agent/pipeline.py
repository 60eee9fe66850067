"""The deploy pipeline as a service: change a handler file safely, callable without a socket.

    update(name, source)     a push: checks, import test, backup, write, activate
    rollback(name, ...)      the same for a backup's bytes
    reload(name)             the same for the file already on disk
    delete(name)             backup, remove, unload

A change goes through these steps, in order:

    decode          the bytes, once, by one rule (``source``)
    2-5. checks     syntax, dangerous calls, protected imports, dependencies
    6. import test  in the box (``isolation``), then the runtime test
                    (command table, clashes with other modules, self_test())
    -- nothing on disk or in memory has changed up to here --
    backup          the current file to .backups/ (seed naming)
    write           the new file, atomically
    activate        record; load in a thread of its own with a time limit;
                    swap the command table; new.on_reload(old); record removed
    log             one line in the update log; probation starts

If the activation fails, the previous file is put back (the previous module
never left the table) and the refusal says ``rolled_back: true``. If it hangs
past its time limit, the same, and the version is quarantined: it hung the
real load, and it would hang the next start too.

Each public method takes the file's lock, so changes to one file are
serialised; changes to different files, ``ping`` and handler calls go on
meanwhile. Blocking steps run in the agent's worker threads, import tests in
a thread of their own, module code in threads of its own (``loader``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

from .activation import ActivationRecord, Quarantine
from .backups import choose_backup, previous_version
from .changes import Change, Outcome, Removal, Untouched, log_entry, made_anyway, os_reason, refused, storage_failed
from .report import CheckReport, Issue
from .config import AgentConfig
from .errors import ChecksumMismatch, ImportFailed, LoadFailed, NotFound, Quarantined, StorageFailed, ValidationFailed
from .isolation import ImportResult, ImportTester
from .loader import Activation, Loader
from .probation import Probation, ProbationRule
from .registry import LoadedModule, Registry, compile_module, sha256_hex
from .source import decode_source
from .store import BackupBudgetExceeded, HandlerStore

if TYPE_CHECKING:
    from .signatures import Trust

log = logging.getLogger(__name__)

T = TypeVar("T")


class DeployPipeline:
    def __init__(self, *, config: AgentConfig, registry: Registry, store: HandlerStore, tester: ImportTester,
                 loader: Loader, quarantine: Quarantine, probation: Probation,
                 work_pool: concurrent.futures.ThreadPoolExecutor, trust: "Optional[Trust]" = None) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.tester = tester
        self.loader = loader
        self.quarantine = quarantine
        self.probation = probation
        self.trust = trust  # with --trusted-keys: only signed code runs (``signatures``)
        self._work_pool = work_pool
        # Import tests take turns in the helper anyway; waiting for one must not hold a worker thread.
        self._test_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-test")
        self._locks: Dict[str, asyncio.Lock] = {}

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Blocking file I/O in the agent's worker threads (never the handler pool)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._work_pool, functools.partial(func, *args))

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def close(self) -> None:
        self._test_pool.shutdown(wait=False, cancel_futures=True)

    # The service

    async def update(self, name: str, source: bytes, *, sha256: Optional[str] = None, dry_run: bool = False,
                     rule: Optional[ProbationRule] = None, force: bool = False, release: Optional[int] = None,
                     signature: Optional[str] = None, key_id: Optional[str] = None) -> Outcome:
        """Push ``source`` as handlers/NAME.py. ``force`` lets a quarantined version be tried again;
        ``release`` is the controller's release number, kept with the version (log, ``get_status``);
        ``signature``/``key_id`` are verified first with ``--trusted-keys``, and kept either way."""
        version = sha256_hex(source)
        if sha256 is not None and sha256.lower() != version:
            raise ChecksumMismatch(
                f"sha256 mismatch: the code received hashes to {version} but the request says "
                f"{sha256}; the transfer was corrupted or the wrong file was sent, nothing was changed")
        if self.trust is not None:
            self.trust.check_push(name, version, signature, key_id)
        async with self.lock(name):
            await self._unless_quarantined(name, version, force=force, dry_run=dry_run)
            if signature is not None and key_id is not None and not dry_run:
                await self.run(self._keep_signature, name, version, signature, key_id)
            return await self.change(name, source, Change("deploy", rule=rule, release=release), dry_run=dry_run)

    async def rollback(self, name: str, *, backup: Optional[str] = None, to_version: Optional[str] = None,
                       if_version: Optional[str] = None, force: bool = False) -> Union[Outcome, Untouched]:
        """Restore a backup: the one named, the one at ``to_version``, or the newest worth going back to."""
        async with self.lock(name):
            untouched = await self._untouched(name, if_version)
            if untouched is not None:
                return untouched
            quarantined = set(await self.run(self.quarantine.versions, name))
            chosen, source = await self.run(functools.partial(
                choose_backup, self.store, name, backup=backup, to_version=to_version, quarantined=quarantined))
            version = sha256_hex(source)
            await self._unless_quarantined(name, version, force=force)
            await self._unless_unverified(name, version)
            release = await self.run(self.store.release_of, name, version)
            return await self.change(name, source, Change("rollback", restored_from=chosen, release=release))

    async def reload(self, name: str) -> Outcome:
        async with self.lock(name):
            source = await self.run(self.store.read_live, name)
            if source is None:
                raise NotFound(f"handlers/{name}.py does not exist on this device")
            version = sha256_hex(source)
            await self._unless_quarantined(name, version, force=False)
            await self._unless_unverified(name, version)
            release = await self.run(self.store.release_of, name, version)
            return await self.change(name, source, Change("reload", writes_file=False, release=release))

    async def delete(self, name: str, *, keep_backup: bool = True,
                     if_version: Optional[str] = None) -> Union[Removal, Untouched]:
        async with self.lock(name):
            untouched = await self._untouched(name, if_version)
            if untouched is not None:
                return untouched
            return await self.remove(name, keep_backup=keep_backup, action="delete")

    # Steps (callers hold the file's lock)

    async def _untouched(self, name: str, if_version: Optional[str]) -> Optional[Untouched]:
        """With ``if_version``: an ``Untouched`` when the live file is at another version.

        A controller undoing its own push names the version it pushed. If that
        push never took effect, or someone has deployed since, the undo must
        leave the file alone. The caller holds the file's lock, so a push
        still running finishes first and the answer is final.
        """
        if if_version is None:
            return None
        live = await self.run(self.store.read_live, name)
        live_version = sha256_hex(live) if live is not None else None
        return None if live_version == if_version else Untouched(name, live_version, if_version)

    async def _unless_unverified(self, name: str, version: str) -> None:
        """With --trusted-keys: a version already on the device (a backup, the live file) must have come signed."""
        if self.trust is not None:
            await self.run(self.trust.check_stored, name, version)

    def _keep_signature(self, name: str, version: str, signature: str, key_id: str) -> None:
        from .signatures import SignatureStore  # kept even when not required: --trusted-keys may come later

        SignatureStore(self.config.root / ".state").save(f"{name}.py", version, signature, key_id)

    async def _unless_quarantined(self, name: str, version: str, *, force: bool, dry_run: bool = False) -> None:
        entry = await self.run(self.quarantine.get, name, version)
        if entry is None:
            return
        if not force:
            raise Quarantined(
                f"{name}.py at {version[:12]} is quarantined: {entry.get('reason')}; nothing was changed. "
                "Fix the module, or push it with \"force\": true to try this version again",
                details={"quarantine": entry})
        if not dry_run:
            await self.run(self.quarantine.remove, name, version)
            log.warning("%s.py at %s taken out of quarantine by a forced push", name, version[:12])

    async def change(self, name: str, source: bytes, change: Change, *, dry_run: bool = False) -> Outcome:
        """Vet ``source`` and make it the live version of ``name``; the caller holds the file's lock."""
        started = time.perf_counter()
        text = decode_source(name, source)
        version = sha256_hex(source)
        live = await self.run(self.store.read_live, name)
        live_version = sha256_hex(live) if live is not None else None
        loaded = self.registry.modules.get(name)
        if change.writes_file and live_version == version and loaded is not None and loaded.sha256 == version:
            return Outcome(name, version, live_version, list(loaded.commands), CheckReport(), started, unchanged=True)
        report, commands = await self.vet(name, text)
        if dry_run:
            return Outcome(name, version, live_version, commands, report, started, dry_run=True)
        if change.writes_file and live is None:
            await self._room_for_a_file(name)
        backup = await self._write(name, source, live) if change.writes_file else None
        fallback = live_version if change.writes_file else await self.fallback_for(name, version)
        record = ActivationRecord(name, version, fallback, change.action)
        module, handover = await self._activate(record, change, text, source, live, backup, report)
        if handover:
            report.warnings.append(Issue("runtime", handover))
        module.release = change.release
        # From here the new version is live: a failure to write the records below is a warning, not a failure.
        unrecorded = [await self._recorded("saving the last good copy", self.store.save_good, name, source)]
        watch = self.probation.start(name, version, backup, change.rule)
        unrecorded.append(await self._recorded("writing the update log", self.store.append_log, log_entry(
            change.action, name, version, live_version, backup=backup, restored_from=change.restored_from,
            commands=list(module.commands), reason=change.reason, release=change.release)))
        report.warnings.extend(Issue("storage", text) for text in made_anyway(unrecorded))
        log.info("%s handlers/%s.py: %s -> %s, %d command(s), backup %s", change.action, name,
                 (live_version or "none")[:12], version[:12], len(module.commands), backup or "none")
        return Outcome(name, version, live_version, list(module.commands), report, started, backup=backup,
                       watch=watch, restored_from=change.restored_from)

    async def fallback_for(self, name: str, version: str) -> Optional[str]:
        """What to go back to if ``version`` kills the agent on a load that writes no file (start, reload)."""
        loaded = self.registry.modules.get(name)
        if loaded is not None and loaded.sha256 != version:
            return loaded.sha256
        quarantined = set(await self.run(self.quarantine.versions, name))
        return await self.run(previous_version, self.store, name, version, quarantined)

    async def import_test(self, name: str, text: str) -> ImportResult:
        """Check 6 in the box, in the import-test thread (never a worker the agent's own commands need)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._test_pool, self.tester.test, name, text)

    async def probe_box(self) -> ImportResult:
        """Set the import test's box up with nothing in it, to learn which protections hold here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._test_pool, self.tester.probe)

    async def vet(self, name: str, text: str) -> Tuple[CheckReport, List[str]]:
        """Checks 2-6: the report (with warnings) and the commands the module offers; raises a refusal."""
        from .checks import check_code  # here: the lint is the agent's largest import, and most starts need none
        filename = f"handlers/{name}.py"
        report = await self.run(check_code, text, filename)
        if not report.valid:
            raise refused(ValidationFailed, filename, report, report.errors[0].message)
        result = await self.import_test(name, text)
        if not result.ok:
            if result.kind in ("table", "self_test"):  # it imported; the runtime test failed
                report.errors.append(Issue("runtime", result.error))
                raise refused(ValidationFailed, filename, report, result.error)
            report.errors.append(Issue("import", result.error))
            raise refused(ImportFailed, filename, report, f"Import test failed: {result.error}")
        report.warnings.extend(Issue("runtime", w) for w in result.warnings)
        clashes = self.registry.conflicts(name, result.commands)
        if clashes:
            report.errors.extend(Issue("runtime", c) for c in clashes)
            raise refused(ValidationFailed, filename, report, f"Runtime test failed: {clashes[0]}")
        return report, result.commands

    async def _room_for_a_file(self, name: str) -> None:
        """A new handler file must fit ``max_handler_files``: any name is accepted, so the count is capped."""
        count, limit = len(await self.run(self.store.live_names)), self.config.max_handler_files
        if count >= limit:
            raise StorageFailed(
                f"the device already has {count} handler files, its limit (--max-handler-files {limit}); nothing "
                f"was changed: delete one it no longer needs (delete_handler) before adding handlers/{name}.py")

    async def _write(self, name: str, source: bytes, live: Optional[bytes]) -> Optional[str]:
        """Back up the live file and write the new one; the backup's name. Nothing changed on failure."""
        backup = None
        try:
            if live is not None:
                backup = await self.run(self.store.create_backup, name, live)
            await self.run(self.store.write_live, name, source)
        except BackupBudgetExceeded as exc:
            raise StorageFailed(f"could not back up handlers/{name}.py: {exc.strerror}; nothing was changed") from None
        except OSError as exc:  # the live file is written atomically: it is still the old one
            if backup is not None:
                await self._recorded(f"removing the backup {backup} again", self.store.remove_backup, backup)
            raise storage_failed(f"could not write handlers/{name}.py", exc) from None
        return backup

    async def _activate(self, record: ActivationRecord, change: Change, text: str, source: bytes,
                        live: Optional[bytes], backup: Optional[str],
                        report: CheckReport) -> Tuple[LoadedModule, Optional[str]]:
        """Load, swap and hand over under an activation record; undo the write if that fails."""
        name, timeout = record.name, self.config.import_timeout
        try:
            async with self.loader.activation(record) as activation:
                try:
                    module = await activation.run(compile_module, name, text, record.version,
                                                  str(self.store.live_path(name)), timeout=timeout)
                except asyncio.TimeoutError:
                    raise LoadFailed(f"{name}.py did not finish loading within {timeout:g} s",
                                     details={"hung": True}) from None
                previous = self.registry.install(module)
                return module, await self._hand_over(activation, module, previous)
        except LoadFailed as exc:
            hung = bool(exc.details.get("hung"))
            await self._undo(record, change, source, live, backup, exc)
            raise LoadFailed(
                f"handlers/{name}.py passed its checks but failed to load: {exc.message}; "
                "the previous version is still live" + ("; this version is quarantined" if hung else ""),
                details={"rolled_back": True, "quarantined": hung, "filename": f"handlers/{name}.py",
                         "validation_passed": True, "validation_details": report.details()},
            ) from None
        except OSError as exc:  # the record could not be written: no module code has run
            await self._undo(record, change, source, live, backup, None)
            raise storage_failed(f"could not record the activation of handlers/{name}.py", exc) from None

    async def _undo(self, record: ActivationRecord, change: Change, source: bytes, live: Optional[bytes],
                    backup: Optional[str], failure: Optional[LoadFailed]) -> None:
        name = record.name
        if change.writes_file:
            await self._recorded("putting the previous file back", self._put_back, name, live, backup)
        if failure is None:
            return
        if failure.details.get("hung"):
            await self._recorded("quarantining it", functools.partial(
                self.quarantine.add, name, record.version, source, reason=failure.message, action=record.action))
        await self._recorded("writing the update log", self.store.append_log, log_entry(
            record.action, name, record.version, record.fallback_version, outcome="rolled_back",
            reason=failure.message))
        log.error("%s of handlers/%s.py failed to load and was undone: %s", record.action, name, failure.message)

    def _put_back(self, name: str, live: Optional[bytes], backup: Optional[str]) -> None:
        if live is None:
            self.store.remove_live(name)
        else:
            self.store.write_live(name, live)
        if backup is not None:
            self.store.remove_backup(backup)  # it is identical to the live file again

    async def _hand_over(self, activation: Activation, module: LoadedModule,
                         previous: Optional[LoadedModule]) -> Optional[str]:
        """Give the new module the old one (``on_reload``) so state such as a recording carries over."""
        hook = getattr(module.module, "on_reload", None)
        if previous is None or not callable(hook):
            return None
        timeout = self.config.import_timeout
        try:
            if inspect.iscoroutinefunction(hook):
                await asyncio.wait_for(hook(previous.module), timeout)
            else:
                await activation.run(hook, previous.module, timeout=timeout)
        except asyncio.TimeoutError:
            message = f"on_reload() did not finish within {timeout:g} s"
        except BaseException as exc:  # noqa: BLE001 - module code
            message = f"on_reload() raised {type(exc).__name__}: {exc}"
        else:
            return None
        log.warning("%s.py: %s; the new version is live without the old state", module.name, message)
        return message

    async def remove(self, name: str, *, keep_backup: bool, action: str, reason: Optional[str] = None) -> Removal:
        """Back up, remove and unload handlers/NAME.py; the caller holds the file's lock."""
        live = await self.run(self.store.read_live, name)
        if live is None and name not in self.registry.modules and name not in self.registry.failed:
            raise NotFound(f"handlers/{name}.py does not exist on this device")
        backup = None
        if live is not None:
            try:
                if keep_backup:
                    backup = await self.run(self.store.create_backup, name, live)
                await self.run(self.store.remove_live, name)
            except OSError as exc:
                if backup is not None:
                    await self._recorded(f"removing the backup {backup} again", self.store.remove_backup, backup)
                raise storage_failed(f"could not delete handlers/{name}.py", exc,
                                     "the file is still there and its commands still run") from None
        previous = self.registry.remove(name)
        self.probation.stop(name)
        old_version = sha256_hex(live) if live is not None else None
        unrecorded = [
            await self._recorded("removing the last good copy", self.store.remove_good, name),
            await self._recorded("writing the update log", self.store.append_log,
                                 log_entry(action, name, None, old_version, backup=backup, reason=reason)),
        ]
        log.info("%s handlers/%s.py (backup %s)", action, name, backup or "none")
        return Removal(name, backup, sorted(previous.commands) if previous else [], old_version,
                       made_anyway(unrecorded))

    async def _recorded(self, what: str, func: Callable[..., Any], *args: Any) -> Optional[str]:
        """Run a disk write that must not undo a change already made; a warning if the disk refuses it."""
        try:
            await self.run(func, *args)
        except OSError as exc:
            log.error("%s failed: %s", what, exc)
            return f"{what} failed: {os_reason(exc)}"
        return None
