"""Running handler module code inside the agent: recorded, one activation at a time, in its own threads.

Module code that runs in the agent's own process (the real load of a module,
its ``on_reload`` hook) is the one step no box covers. Three rules make it
survivable:

- **Recorded.** An activation writes its record before any of the module's
  code runs, and removes it only when all of that code has returned (see
  ``activation``). If the process dies meanwhile, the next start knows which
  version did it.
- **One at a time.** Activations of different files take turns, so that a
  record found at start names the one version that was running, not a
  bystander that loaded in parallel. A load takes milliseconds; a load that
  hangs holds the turn only until its time limit.
- **In threads of their own.** Each piece of module code runs in a new daemon
  thread, never in the pool that serves ``list_backups`` or
  ``rollback_handler``: a load that hangs forever holds one thread of its
  own, which is counted as *stuck* until it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from .activation import ActivationRecord, ActivationRecords

log = logging.getLogger(__name__)

T = TypeVar("T")


class Activation:
    """One activation in progress: ``run`` module code; the record goes when all of it has returned."""

    def __init__(self, loader: "Loader", record: ActivationRecord) -> None:
        self.record = record
        self._loader = loader
        self._running = 0
        self._closed = False
        self._guard = threading.Lock()

    async def run(self, func: Callable[..., T], *args: Any, timeout: float) -> T:
        """``func(*args)`` in a new thread; ``asyncio.TimeoutError`` past ``timeout`` (the thread runs on)."""
        loop = asyncio.get_running_loop()
        future: "concurrent.futures.Future[T]" = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # running: a timeout must not be able to cancel it
        with self._guard:
            self._running += 1
        thread = threading.Thread(target=self._body, args=(future, func, args), daemon=True,
                                  name=f"load-{self.record.name}")
        thread.start()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), timeout)
        except asyncio.TimeoutError:
            if not future.done():
                self._loader.stuck_started(loop, future)
            raise

    def _body(self, future: "concurrent.futures.Future[Any]", func: Callable[..., Any], args: Any) -> None:
        try:
            future.set_result(func(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            future.set_exception(exc)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._guard:
            self._running -= 1
            done = self._closed and self._running == 0
        if done:
            self._loader.end_record(self.record)

    def close(self) -> None:
        """The pipeline is done: remove the record now, or when the last stuck thread returns."""
        with self._guard:
            self._closed = True
            done = self._running == 0
        if done:
            self._loader.end_record(self.record)


class Loader:
    def __init__(self, records: ActivationRecords, work_pool: concurrent.futures.Executor,
                 on_stuck: Optional[Callable[[], None]] = None) -> None:
        self.records = records
        self._work_pool = work_pool  # for the records' file I/O
        self._on_stuck = on_stuck
        self._turn = asyncio.Lock()
        self.stuck = 0  # module-code threads still running past their time limit
        self.stuck_total = 0

    @contextlib.asynccontextmanager
    async def activation(self, record: ActivationRecord) -> AsyncIterator[Activation]:
        """Take the turn, write the record, yield; on exit the record goes once no thread of it runs.

        Writing the record may raise ``OSError`` (a full or read-only card):
        then nothing of the module has run, and the caller reports a storage error.
        """
        loop = asyncio.get_running_loop()
        async with self._turn:
            await loop.run_in_executor(self._work_pool, self.records.begin, record)
            activation = Activation(self, record)
            try:
                yield activation
            finally:
                await loop.run_in_executor(self._work_pool, activation.close)

    def end_record(self, record: ActivationRecord) -> None:
        try:
            self.records.end(record)
        except OSError as exc:  # the next start will find it and quarantine a version that was fine
            log.error("could not remove the activation record of %s.py (%s): %s",
                      record.name, record.version[:12], exc)

    def stuck_started(self, loop: asyncio.AbstractEventLoop, future: "concurrent.futures.Future[Any]") -> None:
        self.stuck += 1
        self.stuck_total += 1
        future.add_done_callback(lambda _f: _call_soon(loop, self._unstick))
        if self._on_stuck is not None:
            self._on_stuck()

    def _unstick(self) -> None:
        self.stuck -= 1


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the loop is closed: the agent is shutting down
