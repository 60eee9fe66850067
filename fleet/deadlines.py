"""Time limits for requests: one timer per distinct limit for a whole fleet, not one per request."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Deque, Dict, Optional, Tuple

if TYPE_CHECKING:
    from .pending import PendingReplies


class DeadlineQueue:
    """Time limits for many requests that share one timeout, kept with one timer instead of one each.

    Requests with the same limit, added as they are sent, have deadlines that
    arrive already sorted: the one timer waits for the oldest, expires whatever
    is due, and waits for the next. A request answered in time is simply no
    longer pending when its deadline comes. A timer per request was the largest
    single cost of a request's bookkeeping: each one is an object pushed on,
    and later cancelled from, the event loop's heap.
    """

    def __init__(self, limit: float, loop: asyncio.AbstractEventLoop) -> None:
        self.limit = limit
        self._loop = loop
        self._queue: Deque[Tuple[float, "PendingReplies", int, str]] = deque()
        self._timer: Optional[asyncio.TimerHandle] = None

    def add(self, connection: "PendingReplies", request_id: int, command: str) -> None:
        queue = self._queue
        # Requests are mostly answered in the order they were sent: drop the answered ones at the
        # head now, so a busy fleet keeps about as many entries as it has requests in flight.
        while queue and queue[0][2] not in queue[0][1]._pending:
            queue.popleft()
        queue.append((self._loop.time() + self.limit, connection, request_id, command))
        if self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            _, connection, request_id, command = self._queue.popleft()
            connection._expire(request_id, command, self.limit)
        if self._queue:
            self._timer = self._loop.call_at(self._queue[0][0], self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class Deadlines:
    """One ``DeadlineQueue`` per distinct time limit, shared by every connection of a fleet."""

    def __init__(self) -> None:
        self._queues: Dict[float, DeadlineQueue] = {}

    def add(self, limit: float, connection: "PendingReplies", request_id: int, command: str) -> None:
        queue = self._queues.get(limit)
        if queue is None:  # bound to the running loop, like the connections themselves
            queue = self._queues[limit] = DeadlineQueue(limit, asyncio.get_running_loop())
        queue.add(connection, request_id, command)

    def close(self) -> None:
        for queue in self._queues.values():
            queue.close()
        self._queues.clear()
