"""Who stays connected when the agent is under pressure: a stranger on the LAN never locks the operator out.

The agent listens on a network it does not control. Anyone there can open
connections and send half a line, or nothing, on each. These rules decide,
without any I/O (the server applies them, tests call them directly):

- **At the connection limit**, a newcomer evicts someone rather than being
  refused: first a connection that has not yet sent an authenticated request
  (the longest silent first), then an authenticated one with nothing in
  flight (the longest idle first). Only when every connection is busy
  working for its client is the newcomer refused. An attacker without the
  token never authenticates, so the operator's connection always wins.
- **Deadlines** (``expired``): a connection that has not authenticated and
  has sent nothing for a short while is closed; every line must be complete
  within a deadline counted from its first byte, so a client that trickles
  one byte a second cannot hold a connection; and, when configured, an
  authenticated connection with nothing in flight is closed after its idle
  time.
- **Memory** (``over_budget``): the bytes held for unfinished lines across
  all connections have a cap; past it, the connections holding the most are
  closed, those that never authenticated first.
- **Failed logins** are logged once per peer per interval, with a count
  (``FailedLogins``), never with the token.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, TypeVar

# Timeouts (seconds). A 4 MiB push over a 256 kbit/s link takes about 130 s.
DEFAULT_LINE_TIMEOUT = 180.0
DEFAULT_UNAUTHENTICATED_IDLE = 10.0
FAILED_LOGIN_LOG_INTERVAL = 60.0
# Limits
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024  # unfinished lines of all connections; sized for a 512 MB Pi


class ConnectionState:
    """What the rules need to know of one connection (the server keeps it up to date).

    A plain class with slots, not a dataclass: one lives per connection and the
    server reads it on every sweep, and a dataclass costs the agent's start time.
    """

    __slots__ = ("opened", "last_read", "last_active", "authenticated", "in_flight", "buffered", "line_started")

    def __init__(self, opened: float, last_read: float, *, last_active: float = 0.0, authenticated: bool = False,
                 in_flight: int = 0, buffered: int = 0, line_started: Optional[float] = None) -> None:
        self.opened = opened
        self.last_read = last_read  # when bytes last arrived
        self.last_active = last_active  # when a request last completed
        self.authenticated = authenticated
        self.in_flight = in_flight  # requests received and not yet answered
        self.buffered = buffered  # bytes of an unfinished line
        self.line_started = line_started  # when the first byte of the unfinished line arrived


class Deadlines:
    """The connection deadlines, in seconds; ``idle`` (authenticated connections) is off by default."""

    __slots__ = ("line", "unauthenticated_idle", "idle")

    def __init__(self, line: float = DEFAULT_LINE_TIMEOUT, unauthenticated_idle: float = DEFAULT_UNAUTHENTICATED_IDLE,
                 idle: Optional[float] = None) -> None:
        self.line = line
        self.unauthenticated_idle = unauthenticated_idle
        self.idle = idle


C = TypeVar("C")


def pick_victim(connections: Iterable[Tuple[C, ConnectionState]]) -> Optional[C]:
    """The connection a newcomer evicts at the limit, or None when every one is busy for its client."""
    strangers, idle = [], []
    for conn, state in connections:
        if not state.authenticated:
            strangers.append((max(state.last_read, state.last_active), conn))
        elif state.in_flight == 0 and state.buffered == 0:
            idle.append((state.last_active, conn))
    for group in (strangers, idle):
        if group:
            return min(group, key=lambda item: item[0])[1]
    return None


def expired(state: ConnectionState, deadlines: Deadlines, now: float) -> Optional[str]:
    """Why this connection must be closed now, or None."""
    if state.line_started is not None and now - state.line_started > deadlines.line:
        return f"a request line was not complete within {deadlines.line:g} s of its first byte"
    if not state.authenticated and state.in_flight == 0:
        limit = min(deadlines.unauthenticated_idle, deadlines.idle or deadlines.unauthenticated_idle)
        if now - state.last_read > limit:
            return f"no authenticated request within {limit:g} s"
    if (deadlines.idle is not None and state.authenticated and state.in_flight == 0 and state.buffered == 0
            and now - max(state.last_read, state.last_active) > deadlines.idle):
        return f"idle for {deadlines.idle:g} s"
    return None


def over_budget(connections: Iterable[Tuple[C, ConnectionState]], budget: int) -> List[C]:
    """The connections to close so that unfinished lines fit ``budget``: the largest, strangers first."""
    holders = sorted(((conn, state.authenticated, state.buffered) for conn, state in connections if state.buffered),
                     key=lambda holder: (holder[1], -holder[2]))
    total = sum(buffered for _, _, buffered in holders)
    chosen = []
    for conn, _, buffered in holders:
        if total <= budget:
            break
        chosen.append(conn)
        total -= buffered
    return chosen


WRONG_TOKEN_REFUSALS = "request(s) with a missing or wrong token"
HANDSHAKE_REFUSALS = "TLS connection(s) whose certificate was refused or whose handshake did not finish in time"
NOT_CONTROLLER_REFUSALS = "TLS connection(s) with a certificate that is not a controller's"


class FailedLogins:
    """Rate-limited reporting of refused clients (``*_REFUSALS``), per peer address and kind of refusal."""

    def __init__(self, interval: float = FAILED_LOGIN_LOG_INTERVAL) -> None:
        self.interval = interval
        self._since: Dict[Tuple[str, str], Tuple[float, int]] = {}  # (peer, kind) -> (when last logged, since)

    def record(self, peer: str, now: float, kind: str = WRONG_TOKEN_REFUSALS) -> Optional[str]:
        """Count one refusal; the line to log now, or None while this peer's interval runs."""
        key = (peer, kind)
        logged, count = self._since.get(key, (None, 0))
        count += 1
        if logged is not None and now - logged < self.interval:
            self._since[key] = (logged, count)
            return None
        self._since[key] = (now, 0)
        if len(self._since) > 4096:  # many peers: forget the ones logged longest ago
            for old in sorted(self._since, key=lambda p: self._since[p][0])[:1024]:
                del self._since[old]
        if logged is None:
            return f"refused 1 {kind} from {peer}"
        return f"refused {count} {kind} from {peer} in the last {now - logged:.0f} s"
