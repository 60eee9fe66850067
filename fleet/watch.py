"""``fleet converge --watch``: converge each device as it comes back online, without anyone running a command.

It holds a connection to every target (retrying offline ones every
``retry_every`` seconds) and converges, in batches:

- each device whose connection opens (it started, or came back on the network);
- each device whose desired release changes (a deploy or a rollback run from
  another shell: the store is polled, cheaply, twice a second).

A device already on its release costs one ``get_status`` and leaves no record;
every push is recorded like any rollout and printed as one line. SIGTERM (or
Ctrl-C) stops it cleanly: the batch in flight finishes, then it exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable, Dict, List, Optional, Set

from .cli_common import EXIT_OK
from .converge import desired_targets, run_recorded
from .fileset import FileSet
from .fleet import Fleet, ResultCallback
from .keys import SigningKey
from .results import DeviceResult, Status
from .rollout import RolloutPlan
from .state import StateStore
from .tables import progress_detail

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between looks at the store for desired releases set by another controller


class Watch:
    """``await Watch(...).run()`` until ``stop()`` (or SIGTERM); ``on_result`` gets each device's result
    (default: a line through ``say`` for each one that was not already on its release)."""

    def __init__(self, fleet: Fleet, store: StateStore, ids: List[str], plan: RolloutPlan, *,
                 retry_every: float = 1.0, on_result: Optional[ResultCallback] = None,
                 key: Optional[SigningKey] = None, say: Callable[[str], None] = log.info) -> None:
        if retry_every <= 0:
            from .errors import ConfigError

            raise ConfigError("--retry-every must be a positive number of seconds")
        self.fleet, self.store, self.ids, self.plan = fleet, store, ids, plan
        self.retry_every = retry_every
        self.say = say  # what it does, in lines (the CLI prints them; a library user gets them in the log)
        self.key = key  # signs what it pushes, where a file has no signature by it yet
        self.pending: Set[str] = set()
        self.wake = asyncio.Event()
        self.stopping = False
        self.desired: Dict[str, int] = {}
        self.seen = -1
        self.on_result = on_result or self._line
        self.ready = asyncio.Event()  # set once the devices online at the start are converged
        self.releases: Dict[int, FileSet] = {}  # read once each: releases never change

    def stop(self) -> None:
        if not self.stopping:
            self.say("fleet: stopping: the batch in flight finishes first")
        self.stopping = True
        self.wake.set()

    def _online(self, device_id: str) -> None:
        self.pending.add(device_id)
        self.wake.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            for rollout, devices in self.store.adopt_interrupted(by="fleet converge --watch").items():
                self.say(f"rollout {rollout} was interrupted: its {len(devices)} remaining device(s) were given its release")
                self.pending.update(devices)
            self._desired_changes()
            self.fleet.watch(self._online, self.retry_every, self.ids)
            await self.fleet.connect(targets=self.ids)
            await self._converge_pending()  # the devices online now, first
            online = sum(self.fleet.connected(d) for d in self.ids)
            self.say(f"watching {len(self.ids)} device(s), {len(self.desired)} with a desired release, {online} online; "
                "SIGTERM or Ctrl-C stops")
            self.ready.set()
            while not self.stopping:
                try:
                    await asyncio.wait_for(self.wake.wait(), POLL)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()
                self._desired_changes()
                if not self.stopping:
                    await self._converge_pending()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        self.say("fleet: stopped")
        return EXIT_OK

    def _desired_changes(self) -> None:
        """Queue the devices whose desired release another controller (or this one) changed."""
        seen = self.store.changes_seen()
        if seen == self.seen:
            return
        self.seen = seen
        desired = self.store.desired(self.ids)
        self.pending.update(d for d, release in desired.items() if self.desired.get(d) != release)
        self.desired = desired

    async def _converge_pending(self) -> None:
        # A device offline now is queued again when its connection opens.
        batch = [d for d in self.ids if d in self.pending and d in self.desired and self.fleet.connected(d)]
        self.pending.clear()
        if not batch:
            return
        targets = desired_targets(self.store, batch, self.releases, self.key)
        await run_recorded(self.fleet, self.store, "converge", targets, self.plan, self.on_result, record_idle=False)

    def _line(self, result: DeviceResult) -> None:
        if result.status is Status.SKIPPED and not result.note.startswith("not attempted"):
            return  # already on its release: nothing was done
        self.say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {progress_detail(result)}")
