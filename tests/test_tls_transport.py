"""The agent's own TLS transport, over real sockets: records, backpressure, handshake deadlines, floods."""

import asyncio
import json
import logging
import socket
import ssl

import pytest

from agent.admission import HANDSHAKE_REFUSALS
from agent.tls import server_context
from agent.tls_transport import TLSListener, listening_sockets
from conftest import Client, python39, wait_until
from fleet.tls import client_context

BIG = "def handle_big(data):\n    return {'blob': 'x' * int(data.get('size', 1024 * 1024))}\n"


async def tls_client(agent, pki, issued=None, limit=64 * 1024 * 1024) -> Client:
    """A client of ``agent`` (started or spawned) over TLS; its reader stops reading past 2 x ``limit`` unread bytes."""
    reader, writer = await asyncio.open_connection(*agent.address, ssl=client_context(pki.client(issued)),
                                                   limit=limit)
    return Client(reader, writer)


async def test_a_pipelined_burst_spanning_many_records_is_answered_in_order(start_agent, pki):
    client = await tls_client(await start_agent(tls=pki.agent_files("d0")), pki)
    burst = b"".join(json.dumps({"command": "ping", "id": i}).encode() + b"\n" for i in range(5000))
    await client.send_raw(burst)  # about 150 KB: some ten TLS records, several lines cut at record edges
    assert [(await client.reply())["id"] for _ in range(5000)] == list(range(5000))
    await client.close()


async def test_a_large_request_and_a_large_reply_arrive_whole(start_agent, pki):
    agent = await start_agent(tls=pki.agent_files("d0"), handlers={"big": BIG})
    client = await tls_client(agent, pki)
    reply = await client.call("big", size=5 * 1024 * 1024, padding="p" * (2 * 1024 * 1024))
    assert len(reply["blob"]) == 5 * 1024 * 1024
    assert (await client.call("ping"))["success"] is True
    await client.close()


async def test_a_client_that_stops_reading_pauses_the_agent_and_loses_no_reply(start_agent, pki):
    agent = await start_agent(tls=pki.agent_files("d0"), handlers={"big": BIG})
    client = await tls_client(agent, pki, limit=1536 * 1024)
    for n in range(30):  # 30 MiB of replies: more than the client's reader and the kernel's buffers hold
        await client.send({"command": "big", "id": n})
    await wait_until(lambda: len(agent.server.connections) == 1, what="the connection")  # TLS 1.3: the
    (connection,) = agent.server.connections  # client may finish its handshake before the agent does
    await wait_until(lambda: connection._paused_writing and not connection._transport.is_reading(),
                     what="the agent to stop reading while its replies wait")
    replies = [await client.reply() for _ in range(30)]
    assert [r["id"] for r in replies] == list(range(30))
    assert all(len(r["blob"]) == 1024 * 1024 for r in replies)
    assert connection._transport.get_write_buffer_size() == 0 and connection._transport.is_reading()
    await client.close()


def half_closing_exchange(address, context: ssl.SSLContext, requests: bytes) -> bytes:
    """Blocking: a TLS handshake over memory BIOs, ``requests`` sent, then TLS's goodbye (close_notify) and
    the socket shut for writing, as a client that is done sending does; then every reply read until the agent
    closes. (Without the goodbye, OpenSSL on the agent's side takes the end of the stream as an attack that
    cuts the connection short: it answers with an alert and can send nothing more.)"""
    raw = socket.create_connection(address, timeout=20)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)

    def pump_in() -> bytes:
        data = raw.recv(65536)
        incoming.write(data) if data else incoming.write_eof()
        return data

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            pump_in()
    tls.write(requests)
    try:
        tls.unwrap()  # TLS's goodbye: "I send no more"
    except ssl.SSLWantReadError:  # the agent's own is yet to come
        pass
    raw.sendall(outgoing.read())
    raw.shutdown(socket.SHUT_WR)
    replies = b""
    while True:
        try:
            data = tls.read(65536)
        except ssl.SSLWantReadError:
            if not pump_in():
                break
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if not data:  # the agent's goodbye
            break
        replies += data
    raw.close()
    return replies


async def test_a_client_that_stops_sending_still_gets_every_reply(start_agent, pki):
    slow = "import time\n\ndef handle_slow(data):\n    time.sleep(0.3)\n    return {'slept': True}\n"
    agent = await start_agent(tls=pki.agent_files("d0"), handlers={"slow": slow})
    requests = b"".join(json.dumps({"command": c, "id": n}).encode() + b"\n"
                        for n, c in enumerate(["ping", "slow", "ping"]))
    replies = await asyncio.to_thread(half_closing_exchange, agent.address, client_context(pki.client()), requests)
    assert [json.loads(line)["id"] for line in replies.splitlines()] == [0, 1, 2]


async def test_a_client_that_never_finishes_its_handshake_is_closed_at_the_deadline(start_agent, pki, caplog):
    agent = await start_agent(tls=pki.agent_files("d0"), unauthenticated_timeout=0.3)
    caplog.set_level(logging.WARNING, logger="agent.server")
    reader, writer = await asyncio.open_connection(*agent.address)  # plain TCP: says nothing at all
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert f"refused 1 {HANDSHAKE_REFUSALS} from 127.0.0.1" in caplog.messages
    writer.close()


async def test_silent_connections_cannot_keep_a_controller_out(start_agent, pki):
    agent = await start_agent(tls=pki.agent_files("d0"), max_connections=3)
    silent = [await asyncio.open_connection(*agent.address) for _ in range(3)]
    listener = agent.server._tls_listener
    await wait_until(lambda: len(listener._handshakes) == 3, what="three handshakes under way")
    client = await tls_client(agent, pki)  # the oldest silent one makes room
    assert (await client.call("ping"))["success"] is True
    assert await asyncio.wait_for(silent[0][0].read(), 10) == b""
    assert listener.dropped_handshakes == 1 and len(listener._handshakes) == 2
    for _, writer in silent:
        writer.close()
    await client.close()


async def test_a_refused_certificate_is_logged_once_per_peer_and_kind(start_agent, pki, caplog):
    agent = await start_agent(tls=pki.agent_files("d0"))
    caplog.set_level(logging.WARNING, logger="agent.server")
    for _ in range(3):
        try:
            client = await tls_client(agent, pki, pki.stranger)
            await client.call("ping")  # TLS 1.3: the client learns of the refusal on its first read
        except (ConnectionError, OSError):
            pass
    await wait_until(lambda: f"refused 1 {HANDSHAKE_REFUSALS} from 127.0.0.1" in caplog.messages,
                     what="the refusal in the log")
    assert sum(HANDSHAKE_REFUSALS in message for message in caplog.messages) == 1
    assert agent.server.connections == set()


async def test_stopping_the_agent_answers_then_closes_tls_connections(start_agent, pki):
    agent = await start_agent(tls=pki.agent_files("d0"))
    client = await tls_client(agent, pki)
    assert (await client.call("ping"))["success"] is True
    await agent.close()
    assert await client.closed_by_peer()
    await client.close()


class Collector(asyncio.BufferedProtocol):
    """Takes what arrives 100 bytes at a time (a record holds up to 16 KB); can pause after the first read."""

    def __init__(self, expected: int, pause_first: bool = False) -> None:
        self.buffer = bytearray(100)
        self.received = bytearray()
        self.expected = expected
        self.pause_first = pause_first
        self.paused = asyncio.get_running_loop().create_future()
        self.complete = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]
        if self.pause_first and not self.paused.done():
            self.transport.pause_reading()
            self.paused.set_result(None)
        if len(self.received) >= self.expected and not self.complete.done():
            self.complete.set_result(bytes(self.received))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        pass


async def collect_one_record(pki, pause_first: bool):
    """A listener feeding a ``Collector``; a client sends 10,000 bytes, one TLS record."""
    collectors = []

    def factory():
        collectors.append(Collector(10_000, pause_first))
        return collectors[-1]

    listener = TLSListener(await listening_sockets("127.0.0.1", 0, backlog=8), server_context(pki.agent_files("d0")),
                           factory, handshake_timeout=10, max_handshakes=8, on_failure=lambda peer: None)
    _, writer = await asyncio.open_connection(*listener.sockets[0].getsockname(),
                                              ssl=client_context(pki.client()))
    payload = bytes(range(100)) * 100
    writer.write(payload)
    await wait_until(lambda: collectors, what="the handshake")
    return listener, writer, collectors[0], payload


async def test_what_openssl_decrypted_beyond_the_protocols_buffer_is_delivered_without_another_socket_event(pki):
    listener, writer, collector, payload = await collect_one_record(pki, pause_first=False)
    assert await asyncio.wait_for(collector.complete, 10) == payload
    writer.close()
    listener.close()


async def test_resuming_delivers_what_was_left_decrypted_while_reading_was_paused(pki):
    listener, writer, collector, payload = await collect_one_record(pki, pause_first=True)
    await asyncio.wait_for(collector.paused, 10)
    assert len(collector.received) == 100 and not collector.transport.is_reading()
    collector.transport.resume_reading()  # the rest sits in OpenSSL's buffer: the socket will not say so
    assert await asyncio.wait_for(collector.complete, 10) == payload
    writer.close()
    listener.close()


@pytest.mark.skipif(python39() is None, reason="no Python 3.9 on this machine (pyenv install 3.9)")
async def test_a_tls_agent_on_python_3_9_serves_a_controller_and_turns_away_a_device(spawn_agent, pki):
    files = pki.agent_files("d0")
    proc = spawn_agent("--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca),
                       "--tls-crl", str(files.crl), python=python39())
    reader, writer = await asyncio.open_connection(*proc.address, ssl=client_context(pki.client()))
    client = Client(reader, writer)
    status = await client.call("get_status")
    assert status["success"] is True and status["python_version"].startswith("3.9")
    await client.close()
    device = await tls_client(proc, pki, pki.devices["d1"])  # a Pi's certificate commands nothing
    assert await device.closed_by_peer()
    await device.close()
    assert proc.terminate() == 0
