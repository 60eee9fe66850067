"""The agent's TCP server over real sockets: framing, ordering, bad input, limits, concurrency."""

import asyncio
import json

from conftest import Client, scripted, wait_until


async def test_ping_answers_pong_with_id_success_and_timestamp(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    reply = await client.call("ping", id="abc")
    assert reply["success"] is True and reply["message"] == "pong" and reply["id"] == "abc"
    assert isinstance(reply["timestamp"], float)
    numeric = await client.call("PING", id=42)  # names match case-insensitively
    assert numeric["id"] == 42 and numeric["message"] == "pong"


async def test_reply_without_id_has_no_id(start_agent, connect):
    client = await connect(await start_agent())
    assert "id" not in await client.call("ping")


async def test_pipelined_replies_come_back_in_request_order(start_agent, connect):
    agent = await start_agent(handlers={"blocking": scripted("blocking"), "basic": scripted("basic")})
    client = await connect(agent)
    # A slow request first, then fast ones on the same connection: the fast ones may run
    # meanwhile, but their replies must wait for the slow one's.
    await client.send({"command": "block", "id": 1})
    await asyncio.get_running_loop().run_in_executor(None, agent.registry.modules["blocking"].module.ENTERED.acquire)
    for i in range(2, 6):
        await client.send({"command": "ping", "id": i})
    other = await connect(agent)
    assert (await other.call("release"))["released"] is True
    ids = [(await client.reply())["id"] for _ in range(5)]
    assert ids == [1, 2, 3, 4, 5]


async def test_each_bad_input_gets_a_clear_reply_and_the_connection_keeps_working(start_agent, connect):
    client = await connect(await start_agent())
    cases = [
        (b"{this is not json\n", "invalid_json", "not valid JSON"),
        (b"[1,2,3]\n", "bad_request", "must be a JSON object"),
        (b'{"id": 9}\n', "bad_request", "no 'command'"),
        (b'{"command": 12, "id": 10}\n', "bad_request", "non-empty string"),
        (b'{"command": "pnig", "id": 11}\n', "unknown_command", "did you mean ping"),
        (b'{"command": "ping", "x": "\xff\xfe"}\n', "invalid_json", "not valid UTF-8"),
    ]
    for raw, code, words in cases:
        await client.send_raw(raw)
        reply = await client.reply()
        assert reply["success"] is False and reply["code"] == code, raw
        assert words in reply["error"], reply
        assert isinstance(reply["timestamp"], float)
    # The id of a request that failed to parse as a request is still echoed where it could be read.
    await client.send_raw(b'{"command": 12, "id": "x1"}\n')
    assert (await client.reply())["id"] == "x1"
    assert (await client.call("ping"))["message"] == "pong"


async def test_unknown_command_lists_close_matches(start_agent, connect):
    client = await connect(await start_agent(handlers={"basic": scripted("basic")}))
    reply = await client.call("ech0")
    assert reply["code"] == "unknown_command" and "echo" in reply["error"]


async def test_too_large_line_is_refused_and_connection_closed_others_unharmed(start_agent, connect):
    agent = await start_agent(max_line_bytes=1024)
    victim = await connect(agent)
    bystander = await connect(agent)
    await victim.send_raw(b'{"command": "ping", "pad": "' + b"x" * 2000 + b'"}\n')
    reply = await victim.reply()
    assert reply["code"] == "too_large" and "1024 bytes" in reply["error"]
    assert await victim.closed_by_peer()
    assert (await bystander.call("ping"))["success"] is True


async def test_too_large_without_newline_is_refused_too(start_agent, connect):
    agent = await start_agent(max_line_bytes=1024)
    client = await connect(agent)
    await client.send_raw(b"x" * 5000)
    assert (await client.reply())["code"] == "too_large"
    assert await client.closed_by_peer()


async def test_client_that_never_sends_a_newline_does_not_block_others(start_agent, connect):
    agent = await start_agent()
    silent = await connect(agent)
    await silent.send_raw(b'{"command": "ping"')  # and nothing more
    others = [await connect(agent) for _ in range(3)]
    replies = await asyncio.gather(*(c.call("ping") for c in others))
    assert all(r["message"] == "pong" for r in replies)
    await silent.send_raw(b"}\n")  # late, but still a valid request
    assert (await silent.reply())["message"] == "pong"


async def test_idle_timeout_closes_a_silent_connection_when_enabled(start_agent, connect):
    agent = await start_agent(idle_timeout=0.2)
    silent = await connect(agent)
    await silent.send_raw(b'{"command": ')
    assert await silent.closed_by_peer(timeout=10)
    fresh = await connect(agent)
    assert (await fresh.call("ping"))["success"] is True


async def test_at_the_limit_a_newcomer_evicts_the_longest_idle_and_is_refused_only_when_all_work(
        start_agent, connect, flag_dir):
    flag = flag_dir / "release"
    blocks = f"import os, time\ndef handle_block(data):\n    while not os.path.exists({str(flag)!r}):\n" \
             "        time.sleep(0.01)\n    return {}\n"
    agent = await start_agent(max_connections=3, handlers={"slow": blocks})
    kept = [await connect(agent) for _ in range(3)]
    for client in kept:
        assert (await client.call("ping"))["success"]
    extra = await connect(agent)
    assert (await extra.call("ping"))["message"] == "pong"  # it got in
    evicted = await kept[0].reply()
    assert evicted["code"] == "busy" and "to let another in" in evicted["error"]
    assert await kept[0].closed_by_peer()
    try:
        for client in kept[1:] + [extra]:
            await client.send({"command": "block"})
        await wait_until(lambda: sum(len(c._pending) for c in agent.server.connections) == 3, what="3 calls")
        refused = await connect(agent)
        reply = await refused.reply()
        assert reply["code"] == "busy" and "each working for its client" in reply["error"]
        assert await refused.closed_by_peer()
        assert agent.server.refused_connections == 1 and agent.server.evicted_connections == 1
    finally:
        flag.touch()
    for client in kept[1:] + [extra]:  # the calls return once the flag is there
        assert (await client.reply())["success"] is True


async def test_client_half_close_still_gets_its_replies(start_agent):
    agent = await start_agent()
    reader, writer = await asyncio.open_connection(*agent.address)
    writer.write(b'{"command":"ping","id":1}\n{"command":"ping","id":2}\n')
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    assert [json.loads(line)["id"] for line in data.splitlines()] == [1, 2]
    writer.close()


async def test_blocking_handler_does_not_stall_ping_on_another_connection(start_agent, connect):
    agent = await start_agent(handlers={"blocking": scripted("blocking")})
    worker = await connect(agent)
    await worker.send({"command": "block", "id": "slow"})
    entered = agent.registry.modules["blocking"].module.ENTERED
    await asyncio.get_running_loop().run_in_executor(None, entered.acquire)  # the handler is now blocking
    prober = await connect(agent)
    for _ in range(20):
        assert (await prober.call("ping"))["message"] == "pong"
    assert (await prober.call("get_status"))["success"] is True
    assert (await prober.call("release"))["released"] is True
    assert (await worker.reply())["id"] == "slow"


async def test_200_connections_each_doing_50_pings(start_agent):
    agent = await start_agent()

    async def one_client(n: int) -> int:
        client = await Client.connect(agent.address)
        count = 0
        try:
            for i in range(50):
                reply = await client.call("ping", id=f"{n}-{i}")
                assert reply["id"] == f"{n}-{i}" and reply["message"] == "pong"
                count += 1
        finally:
            await client.close()
        return count

    counts = await asyncio.gather(*(one_client(n) for n in range(200)))
    assert sum(counts) == 200 * 50


async def test_pipelined_burst_on_one_connection_is_answered_completely(start_agent, connect):
    agent = await start_agent()
    client = await connect(agent)
    burst = b"".join(json.dumps({"command": "ping", "id": i}).encode() + b"\n" for i in range(5000))
    await client.send_raw(burst)
    ids = [(await client.reply())["id"] for _ in range(5000)]
    assert ids == list(range(5000))


async def test_large_reply_arrives_whole(start_agent, connect):
    big = "def handle_big(data):\n    return {'blob': 'x' * (5 * 1024 * 1024)}\n"
    client = await connect(await start_agent(handlers={"big": big}))
    reply = await client.call("big")
    assert len(reply["blob"]) == 5 * 1024 * 1024


async def test_1000_connections_opened_at_once_are_all_answered(start_agent):
    # The system the seed documents answered 313 of these in time (listen(5), a thread each).
    agent = await start_agent(max_connections=1100)
    opened = await asyncio.gather(*(asyncio.open_connection(*agent.address) for _ in range(1000)))
    for n, (_, writer) in enumerate(opened):
        writer.write(json.dumps({"command": "ping", "id": n}).encode() + b"\n")
    replies = await asyncio.gather(*(asyncio.wait_for(reader.readline(), 30) for reader, _ in opened))
    assert [json.loads(r)["id"] for r in replies] == list(range(1000))
    for _, writer in opened:
        writer.close()


async def test_a_utf8_character_split_across_two_writes_is_read_whole(start_agent, connect):
    agent = await start_agent(handlers={"basic": scripted("basic")})
    client = await connect(agent)
    line = json.dumps({"command": "echo", "text": "Zürich ✓"}, ensure_ascii=False).encode() + b"\n"
    cut = line.index("✓".encode()) + 1
    await client.send_raw(line[:cut])
    await client.send_raw(line[cut:])
    assert (await client.reply())["echo"] == {"text": "Zürich ✓"}
