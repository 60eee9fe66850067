"""A stranger on the LAN cannot lock the operator out: the rules by themselves, then over real sockets."""

import asyncio
import json
import logging

import pytest

from agent.admission import (DEFAULT_MAX_BUFFERED_BYTES, HANDSHAKE_REFUSALS, ConnectionState, Deadlines, FailedLogins, expired,
                             over_budget, pick_victim)
from agent.protocol import DEFAULT_MAX_LINE_BYTES, DEFAULT_READ_SIZE
from conftest import REPLY_TIMEOUT, Client

TOKEN = "admission-test-token"


def state(**fields):
    fields.setdefault("opened", 0.0)
    fields.setdefault("last_read", 0.0)
    return ConnectionState(**fields)


def test_a_newcomer_evicts_a_stranger_first_then_the_longest_idle_and_never_a_busy_connection():
    operator = state(authenticated=True, last_active=5.0)
    busy = state(authenticated=True, last_active=1.0, in_flight=1)
    strangers = [("s1", state(last_read=3.0)), ("s2", state(last_read=2.0, buffered=10))]
    assert pick_victim([("op", operator), ("busy", busy)] + strangers) == "s2"  # silent longest
    idle_older = state(authenticated=True, last_active=4.0)
    assert pick_victim([("op", operator), ("older", idle_older), ("busy", busy)]) == "older"
    assert pick_victim([("busy", busy)]) is None


@pytest.mark.parametrize("fields, now, words", [
    ({"line_started": 0.0, "authenticated": True, "buffered": 5}, 181.0, "not complete within 180 s"),
    ({"line_started": 0.0, "last_read": 179.0, "buffered": 5}, 181.0, "not complete within 180 s"),  # a trickle
    ({}, 10.5, "no authenticated request within 10 s"),
    ({"authenticated": True}, 10_000.0, None),  # controllers keep connections open
    ({"in_flight": 1}, 11.0, None),  # a first request still running
    ({"line_started": 0.0, "last_read": 100.0, "buffered": 5, "authenticated": True}, 150.0, None),
])
def test_deadlines(fields, now, words):
    why = expired(state(**fields), Deadlines(), now)
    assert (why is None) if words is None else (words in why)


def test_an_idle_timeout_applies_to_authenticated_connections_only_when_set():
    assert "idle for 30 s" in expired(state(authenticated=True, last_active=1.0), Deadlines(idle=30), 40.0)


def test_over_the_memory_budget_the_largest_holders_go_strangers_first():
    held = [("op", state(authenticated=True, buffered=50)), ("a", state(buffered=40)), ("b", state(buffered=30)),
            ("c", state(buffered=20))]
    assert over_budget(held, 140) == []  # 140 held in all
    assert over_budget(held, 139) == ["a"]
    assert over_budget(held, 99) == ["a", "b"]
    assert over_budget(held, 20) == ["a", "b", "c", "op"]
    assert over_budget([(object(), state(buffered=7)), (object(), state(buffered=7))], 7) != []  # ties


def test_failed_logins_are_reported_once_per_peer_per_interval_with_a_count():
    logins = FailedLogins(interval=60)
    assert logins.record("10.0.0.9", 0.0) == "refused 1 request(s) with a missing or wrong token from 10.0.0.9"
    assert [logins.record("10.0.0.9", t) for t in (1.0, 2.0, 59.0)] == [None, None, None]
    assert logins.record("10.0.0.8", 3.0) is not None  # another peer has its own interval
    assert logins.record("10.0.0.9", 61.0) == (
        "refused 4 request(s) with a missing or wrong token from 10.0.0.9 in the last 61 s")
    assert logins.record("10.0.0.9", 62.0, HANDSHAKE_REFUSALS) == (  # another kind of refusal is counted apart
        f"refused 1 {HANDSHAKE_REFUSALS} from 10.0.0.9")


async def half_lines(address, count):
    """``count`` connections that each send half a request and then nothing."""
    clients = []
    for _ in range(count):
        client = await Client.connect(address)
        await client.send_raw(b'{"command": "pi')
        clients.append(client)
    return clients


async def test_300_half_sent_connections_and_a_trickle_do_not_lock_the_operator_out(start_agent):
    agent = await start_agent(token=TOKEN)
    trickler = await Client.connect(agent.address)
    stop = asyncio.Event()

    async def trickle():
        while not stop.is_set():
            await trickler.send_raw(b" ")
            await asyncio.sleep(0.05)  # the pace of the attack, not a wait for anything

    trickling = asyncio.ensure_future(trickle())
    strangers = await half_lines(agent.address, 300)
    try:
        assert len(agent.server.connections) == agent.config.max_connections
        operator = await Client.connect(agent.address)
        assert (await operator.call("ping", token=TOKEN))["message"] == "pong"
        assert agent.server.evicted_connections >= 300 + 2 - agent.config.max_connections
        evicted = json.loads(await strangers[0].reader.readline())  # the first one in was the first to go
        assert evicted["code"] == "busy" and "to let another in" in evicted["error"]
        await operator.close()
    finally:
        stop.set()
        await trickling
        for client in strangers + [trickler]:
            await client.close()


async def test_a_trickle_cannot_reset_the_line_deadline_and_silent_strangers_are_closed(start_agent):
    agent = await start_agent(token=TOKEN, line_timeout=1.0, unauthenticated_timeout=1.5)
    operator = await Client.connect(agent.address)
    assert (await operator.call("ping", token=TOKEN))["success"] is True
    silent = await Client.connect(agent.address)
    trickler = await Client.connect(agent.address)
    closed = asyncio.ensure_future(trickler.closed_by_peer())
    while not closed.done():
        await trickler.send_raw(b"{")  # a byte every 50 ms: never idle, never a whole line
        await asyncio.wait([closed], timeout=0.05)
    assert (await silent.reply())["code"] == "timeout"  # "no authenticated request within 1.5 s"
    assert await silent.closed_by_peer()
    assert (await operator.call("ping", token=TOKEN))["success"] is True  # authenticated: kept open
    for client in (operator, silent, trickler):
        await client.close()


@pytest.mark.parametrize("line, code", [
    ('{"command": "ping", "token": "\\ud800"}', "unauthorized"),
    ('{"command": "ping", "id": "\\udfff", "token": "%s"}' % TOKEN, "bad_request"),
    ('{"command": "pi\\ud800ng", "token": "%s"}' % TOKEN, "bad_request"),
    ("[" * 100_000 + "]" * 100_000, "invalid_json"),
    ('{"command": "ping", "token": "%s", "n": %s}' % (TOKEN, "9" * 10_000), "invalid_json"),
])
async def test_every_bad_request_gets_a_reply_and_the_connection_stays_usable(start_agent, caplog, line, code):
    agent = await start_agent(token=TOKEN)
    client = await Client.connect(agent.address)
    try:
        with caplog.at_level(logging.INFO):
            await client.send_raw(line.encode() + b"\n")
            assert (await client.reply())["code"] == code
            assert (await client.call("ping", token=TOKEN))["success"] is True
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1
        assert not any(r.exc_info for r in caplog.records)  # no traceback in the log
    finally:
        await client.close()


async def test_failed_logins_are_logged_rate_limited_without_the_token(start_agent, caplog):
    agent = await start_agent(token=TOKEN)
    client = await Client.connect(agent.address)
    try:
        with caplog.at_level(logging.WARNING, logger="agent.server"):
            for guess in ("guess-1", "guess-2", "guess-3"):
                assert (await client.call("ping", token=guess))["code"] == "unauthorized"
            assert (await client.call("ping", token=TOKEN))["success"] is True
    finally:
        await client.close()
    lines = [r.getMessage() for r in caplog.records if "wrong token" in r.getMessage()]
    assert lines == ["refused 1 request(s) with a missing or wrong token from 127.0.0.1"]
    assert not any("guess" in r.getMessage() or TOKEN in r.getMessage() for r in caplog.records)


def memory(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def unfinished_lines(address, count: int, size: int):
    """``count`` connections that each send ``size`` bytes of one request line, then half-close.

    They stay open: the agent holds each line until it reads the end of the
    stream (or closes the connection over its budget). Returns the writers.
    """
    line = b'{"command": "ping", "pad": "' + b"x" * size

    async def one():
        _, writer = await asyncio.open_connection(*address)
        try:
            writer.write(line)
            await asyncio.wait_for(writer.drain(), 60)
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the agent closed it over the budget
        return writer

    return await asyncio.gather(*[one() for _ in range(count)])


async def close_all(writers) -> None:
    for writer in writers:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def test_255_unfinished_4_mib_lines_stay_within_the_memory_budget(spawn_agent):
    agent = spawn_agent()
    pid = agent.proc.pid
    operator = await Client.connect(agent.address)
    assert (await operator.call("ping"))["success"] is True
    before = memory(pid, "VmRSS")
    writers = await unfinished_lines(agent.address, 255, DEFAULT_MAX_LINE_BYTES - 100)
    try:
        deadline = asyncio.get_running_loop().time() + REPLY_TIMEOUT
        while (await operator.call("get_status"))["connections"] > 1:  # every line read to its end, or cut off
            assert asyncio.get_running_loop().time() < deadline, "the attack's connections never ended"
            await asyncio.sleep(0.05)
    finally:
        await close_all(writers)
    growth = memory(pid, "VmHWM") - before
    read_buffers = 255 * DEFAULT_READ_SIZE
    assert growth <= DEFAULT_MAX_BUFFERED_BYTES + read_buffers + 8 * 1024 * 1024, growth
    assert (await operator.call("ping"))["success"] is True
    await operator.close()
