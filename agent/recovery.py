"""What the agent does by itself to stay alive: at start, and after a deploy.

At start, in this order:

1. **Activation records.** A record left from the last run means the agent
   died while that version's code ran in it (``activation``). That version
   is quarantined, and the version before it goes back on disk (or the module
   is left out when there was none). So one handler file can cost at most one
   failed start: the next start no longer loads it.
2. **Start-up loads.** Every file in ``handlers/`` is loaded under its own
   activation record. A file whose version the agent put there itself (its
   last good copy) gets the import test. A file the agent did not put there
   is vetted like a push (checks, import test in the box, runtime test):
   one that passes is loaded and reported (``found``, adopted as the file's
   good copy; or ``modified`` when it replaced a version the agent had
   deployed); one that fails is replaced by the last good copy, or, without
   one, moved into quarantine, and never loaded blindly.

After a deploy, **probation** rolls a module back when its calls keep failing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Dict, List, Optional, Set

from .activation import ActivationRecord, ActivationRecords, Quarantine
from .changes import Change, log_entry, os_reason
from .errors import AgentError
from .pipeline import DeployPipeline
from .probation import Watch
from .registry import compile_module, sha256_hex
from .source import decode_source

log = logging.getLogger(__name__)

# Limits
KEEP_AUTO_ROLLBACKS = 20


class Recovery:
    def __init__(self, pipeline: DeployPipeline, records: ActivationRecords, quarantine: Quarantine) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.registry = pipeline.registry
        self.records = records
        self.quarantine = quarantine
        self.integrity: Dict[str, Dict[str, Any]] = {}  # findings at start, by module name
        self.auto_rollbacks: List[Dict[str, Any]] = []
        self._background: Set["asyncio.Task[Any]"] = set()
        # Modules recovery could not quarantine (the card refused): not loaded by this start either, or a
        # version that killed the agent would kill it at every start.
        self._held_back: Set[str] = set()

    def finding(self, name: str, status: str, detail: str, *, error: bool = False) -> None:
        self.integrity[name] = {"file": f"{name}.py", "status": status, "detail": detail}
        (log.error if error else log.warning)("%s", detail)

    async def start(self) -> None:
        """Finish what the last run left half done, then load every handler file."""
        run = self.pipeline.run
        for record in await run(self._prepare_storage):
            await self._recover(record, "the agent stopped while loading it (it crashed, was killed or hung, "
                                        "or the device lost power)")
        for name in await run(self.store.live_names):
            if name in self._held_back:
                continue
            try:
                await self._load_at_start(name)
            except OSError as exc:  # the card failed under us: start anyway, so the device can be reached
                self.registry.mark_failed(name, f"could not be read or recorded: {os_reason(exc)}")
                self.finding(name, "storage_error", f"handlers/{name}.py: the device's storage failed while "
                             f"loading it ({os_reason(exc)}); it is not loaded", error=True)

    def _prepare_storage(self) -> List[ActivationRecord]:
        """Create the folders; the activation records the last run left. Blocking, in one worker hop."""
        self.store.ensure_dirs()
        self.records.ensure_dir()
        self.quarantine.ensure_dir()
        return self.records.pending()

    def close(self) -> None:
        for task in list(self._background):
            task.cancel()

    # Activation records

    async def _recover(self, record: ActivationRecord, why: str) -> None:
        """Quarantine ``record.version`` and put the version before it back on disk."""
        name, run = record.name, self.pipeline.run
        live = await run(self.store.read_live, name)
        on_disk = live is not None and sha256_hex(live) == record.version
        reason = f"{why}; {record.action} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.started_at))}"
        try:
            if await run(self.quarantine.get, name, record.version) is None:
                await run(functools.partial(self.quarantine.add, name, record.version, live if on_disk else None,
                                            reason=reason, action=record.action))
            put_back = await run(self._put_back_fallback, record) if on_disk else "left as it was"
            await run(self.records.end, record)
        except OSError as exc:
            self._held_back.add(name)
            self.registry.mark_failed(name, f"quarantined, but the card refused the change: {os_reason(exc)}")
            self.finding(name, "quarantine_failed", f"handlers/{name}.py at {record.version[:12]}: {reason}; "
                         f"it could not be put back ({os_reason(exc)}) and is not loaded; free some space or check the "
                         "SD card (a failing card turns read-only): the next start tries again", error=True)
            return
        self.finding(name, "quarantined", f"handlers/{name}.py at {record.version[:12]} quarantined: {reason}; "
                     f"{put_back}", error=True)

    def _put_back_fallback(self, record: ActivationRecord) -> str:
        """Write the version to go back to (or remove the file); says what it did. Blocking."""
        name, fallback = record.name, record.fallback_version
        data = self._bytes_of(name, fallback) if fallback else None
        if fallback is None or data is None:
            self.store.remove_live(name)
            self.store.remove_good(name)
            self.store.append_log(log_entry("quarantine", name, None, record.version, reason="left out"))
            return "no earlier version to go back to, so the module is left out"
        self.store.write_live(name, data)
        self.store.save_good(name, data)
        self.store.append_log(log_entry("quarantine", name, fallback, record.version))
        return f"{fallback[:12]} is back in its place"

    def _bytes_of(self, name: str, version: str) -> Optional[bytes]:
        good = self.store.read_good(name)
        if good is not None and sha256_hex(good) == version:
            return good
        for entry in self.store.backups(name):
            data = self.store.read_backup(name, entry["backup"])
            if sha256_hex(data) == version:
                return data
        return None

    # Start-up loads

    async def _load_at_start(self, name: str, *, again: bool = True) -> None:
        """Load handlers/NAME.py; if recovery put an earlier version in its place, load that one."""
        run = self.pipeline.run
        try:
            source = await run(self.store.read_live, name)
        except AgentError as exc:  # a symbolic link: never followed
            self.registry.mark_failed(name, exc.message)
            return
        if source is None:
            return
        version = sha256_hex(source)
        entry = await run(self.quarantine.get, name, version)
        if entry is not None:
            record = ActivationRecord(name, version, await self.pipeline.fallback_for(name, version), "start")
            await self._recover(record, f"this version is quarantined ({entry.get('reason')})")
        else:
            good = await run(self.store.read_good, name)
            if good is None or sha256_hex(good) != version:
                await self._load_unrecorded(name, source, good)
                return
            problem = await self._activate_at_start(name, source, vet=False)
            if problem is None:
                return
            self.registry.mark_failed(name, problem)
            log.error("handler module %s.py failed to load: %s", name, problem)
        replaced = await run(self.store.read_live, name)
        if again and replaced is not None and sha256_hex(replaced) != version:
            await self._load_at_start(name, again=False)

    async def _load_unrecorded(self, name: str, source: bytes, good: Optional[bytes]) -> None:
        """A file the agent did not put there: vetted like a push before any of it runs in the agent."""
        version, run = sha256_hex(source), self.pipeline.run
        problem = await self._activate_at_start(name, source, vet=True)
        if problem is None:
            if good is None:
                unsaved = await self._adopt(name, source)
                self.finding(name, "found", f"handlers/{name}.py ({version[:12]}) was not put there by the agent; "
                                            "it passed every check and the import test, and is loaded" + unsaved)
            else:
                self.finding(name, "modified", f"handlers/{name}.py differs from the version last deployed through "
                             f"the agent (found {version[:12]}, expected {sha256_hex(good)[:12]}): edited by hand, "
                             "corrupted, or written by an interrupted deploy; it passed every check and is loaded")
            return
        if good is not None and await self._activate_at_start(name, good, vet=False) is None:
            await self._restored(name, source, good, problem)
            return
        try:
            await run(functools.partial(self.quarantine.add, name, version, source, reason=problem, action="start"))
            await run(self.store.remove_live, name)
        except OSError as exc:
            problem += f" (and it could not be moved out of handlers/: {os_reason(exc)})"
        self.registry.mark_failed(name, problem)
        self.finding(name, "quarantined", f"handlers/{name}.py ({version[:12]}) was not put there by the agent and "
                     f"failed its checks, so it was not loaded and is quarantined: {problem}", error=True)

    async def _adopt(self, name: str, source: bytes) -> str:
        """Make a found file the module's good copy, so the next start knows it; '' or why it could not."""
        try:
            await self.pipeline.run(self.store.save_good, name, source)
            await self.pipeline.run(self.store.append_log, log_entry("adopt", name, sha256_hex(source), None))
        except OSError as exc:
            return f" (but it could not be recorded: {os_reason(exc)}; the next start checks it again)"
        return ""

    async def _restored(self, name: str, source: bytes, good: bytes, problem: str) -> None:
        # The good copy runs now. Writing it back may fail (a card that turned read-only): the agent
        # must still start, so that the device can be reached and the problem seen.
        try:
            await self.pipeline.run(self.store.write_live, name, good)
        except OSError as exc:
            self.finding(name, "restored_in_memory", f"handlers/{name}.py did not load ({problem}); its last good "
                         f"copy runs, but writing it back to the file failed: {os_reason(exc)} (check the device's "
                         "storage; the next start will do the same)", error=True)
            return
        self.finding(name, "restored", f"handlers/{name}.py did not load ({problem}); replaced by its last good copy",
                     error=True)
        try:
            await self.pipeline.run(self.store.append_log, log_entry(
                "restore", name, sha256_hex(good), sha256_hex(source), reason=problem))
        except OSError as exc:
            log.error("writing the update log failed: %s", exc)

    async def _activate_at_start(self, name: str, source: bytes, *, vet: bool) -> Optional[str]:
        """Import-test (and with ``vet``, check) and load ``source``; the reason it failed, or None."""
        version = sha256_hex(source)
        try:
            if self.pipeline.trust is not None:  # only signed code runs, from the first start on
                await self.pipeline.run(self.pipeline.trust.check_stored, name, version)
            text = decode_source(name, source)
            if vet:
                await self.pipeline.vet(name, text)
            else:
                result = await self.pipeline.import_test(name, text)
                if not result.ok:
                    return result.error
            record = ActivationRecord(name, version, await self.pipeline.fallback_for(name, version), "start")
            timeout = self.pipeline.config.import_timeout
            async with self.pipeline.loader.activation(record) as activation:
                try:
                    module = await activation.run(compile_module, name, text, version,
                                                  str(self.store.live_path(name)), timeout=timeout)
                except asyncio.TimeoutError:
                    await self._recover(record, f"it did not finish loading within {timeout:g} s")
                    return f"did not finish loading within {timeout:g} s; quarantined"
                module.release = await self.pipeline.run(self.store.release_of, name, version)
                self.registry.install(module)
        except AgentError as exc:
            return exc.message
        except OSError as exc:
            return f"could not record its activation: {os_reason(exc)}"
        return None

    # Probation

    def probation_failed(self, watch: Watch) -> None:
        """Probation's callback: roll the module back in the background."""
        task = asyncio.ensure_future(self._auto_rollback(watch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _auto_rollback(self, watch: Watch) -> None:
        name = watch.name
        reason = (f"probation: {watch.failures} of {watch.calls} calls failed since the deploy "
                  f"(last error: {watch.last_error})")
        event: Dict[str, Any] = {"file": f"{name}.py", "time": time.time(), "from_version": watch.version,
                                 "reason": reason}
        async with self.pipeline.lock(name):
            loaded = self.registry.modules.get(name)
            if loaded is None or loaded.sha256 != watch.version:
                return  # something else changed the module meanwhile
            try:
                if watch.backup is None:
                    await self.pipeline.remove(name, keep_backup=True, action="auto_rollback", reason=reason)
                    event.update(to_version=None, outcome="unloaded")
                else:
                    source = await self.pipeline.run(self.store.read_backup, name, watch.backup)
                    release = await self.pipeline.run(self.store.release_of, name, sha256_hex(source))
                    outcome = await self.pipeline.change(name, source, Change(
                        "auto_rollback", restored_from=watch.backup, reason=reason, release=release))
                    event.update(to_version=outcome.version, outcome="rolled_back")
            except AgentError as exc:
                event.update(outcome="failed", error=exc.message)
                log.error("automatic rollback of %s.py failed: %s", name, exc.message)
        log.warning("%s.py rolled back automatically: %s", name, reason)
        self.auto_rollbacks.append(event)
        del self.auto_rollbacks[:-KEEP_AUTO_ROLLBACKS]
