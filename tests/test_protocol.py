"""The sans-IO protocol, tested with plain function calls: no event loop, no sockets."""

import json

import pytest

from agent.errors import BadRequest, InvalidJSON
from agent.protocol import (
    LineReader,
    decode_message,
    encode_message,
    finish_reply,
    parse_request,
    request_id_of,
)


def test_lines_split_across_chunks_are_joined():
    reader = LineReader(100)
    assert reader.feed(b'{"command":') == []
    assert reader.feed(b'"ping"}\n{"comm') == [b'{"command":"ping"}']
    assert reader.pending_bytes == len(b'{"comm')
    assert reader.feed(b'and":"x"}\n') == [b'{"command":"x"}']


def test_reading_into_the_reused_buffer_gives_what_feed_gives():
    """The BufferedProtocol path (get_buffer/buffer_updated) has its own one-line fast path; it must agree."""
    import random

    rng = random.Random(1234)
    for _ in range(2000):
        data = bytes(rng.choice(b"ab \r\n") for _ in range(rng.randint(0, 40)))
        fed, buffered = LineReader(8, read_size=16), LineReader(8, read_size=16)
        from_feed, from_buffer = [], []
        at = 0
        while at < len(data):
            chunk = data[at:at + rng.randint(1, 16)]
            at += len(chunk)
            from_feed += fed.feed(chunk)
            buffered.get_buffer()[:len(chunk)] = chunk
            from_buffer += buffered.buffer_updated(len(chunk))
        assert from_buffer == from_feed, data
        assert (buffered.overflowed, buffered.pending_bytes) == (fed.overflowed, fed.pending_bytes), data
    reader = LineReader(100, read_size=64)
    assert reader.get_buffer() is reader.get_buffer() and len(reader.get_buffer()) == 64
    assert reader.buffer_updated(0) == [] and reader.pending_bytes == 0


def test_crlf_and_blank_lines():
    reader = LineReader(100)
    assert reader.feed(b'{"a":1}\r\n\n  \r\n{"b":2}\n') == [b'{"a":1}', b'{"b":2}']


def test_utf8_character_split_between_chunks_survives():
    payload = json.dumps({"command": "echo", "text": "Zürich ✓"}, ensure_ascii=False).encode() + b"\n"
    cut = payload.index("✓".encode()) + 1  # inside the three-byte character
    reader = LineReader(1000)
    assert reader.feed(payload[:cut]) == []
    (line,) = reader.feed(payload[cut:])
    assert parse_request(line).args["text"] == "Zürich ✓"


def test_line_over_limit_overflows_after_earlier_lines():
    reader = LineReader(10)
    assert reader.feed(b'{"a":1}\n' + b"x" * 11 + b"\n") == [b'{"a":1}']
    assert reader.overflowed
    assert reader.feed(b'{"b":2}\n') == []  # spent: the stream can no longer be framed


def test_unfinished_line_over_limit_overflows_without_newline():
    reader = LineReader(10)
    assert reader.feed(b"x" * 6) == []
    assert not reader.overflowed
    assert reader.feed(b"x" * 6) == []
    assert reader.overflowed
    assert "limit of 10 bytes" in reader.too_large_error().message


def test_line_exactly_at_limit_is_accepted():
    reader = LineReader(10)
    assert reader.feed(b"x" * 10 + b"\n") == [b"x" * 10]
    assert not reader.overflowed


def test_big_line_in_many_chunks_arrives_whole():
    reader = LineReader(16 * 1024 * 1024)
    chunk = b"a" * 65536
    for _ in range(128):
        assert reader.feed(chunk) == []
    (line,) = reader.feed(b"\n")
    assert line == b"a" * (128 * 65536)


def test_parse_request_lowercases_command_and_keeps_id():
    request = parse_request(b'{"command": "PiNg", "id": 7, "x": 1}')
    assert (request.command, request.id, request.has_id, request.args["x"]) == ("ping", 7, True, 1)


@pytest.mark.parametrize(
    "line, error, words",
    [
        (b"{not json", InvalidJSON, "not valid JSON"),
        (b"\xff\xfe{}", InvalidJSON, "not valid UTF-8"),
        (b"[1, 2]", BadRequest, "got an array"),
        (b'"ping"', BadRequest, "got a string"),
        (b'{"id": 1}', BadRequest, "no 'command'"),
        (b'{"command": 5}', BadRequest, "must be a non-empty string"),
        (b'{"command": ""}', BadRequest, "must be a non-empty string"),
        (b'{"command": "ping", "id": {"a": 1}}', BadRequest, "'id' must be a string or a finite number"),
        (b'{"command": "ping", "id": 1e999}', BadRequest, "'id' must be a string or a finite number"),
        (b'{"command": "ping", "id": "\\ud800"}', BadRequest, "'id' is not valid Unicode text"),
        (b'{"command": "p\\udfffng"}', BadRequest, "'command' is not valid Unicode text"),
        (b"[" * 100_000 + b"]" * 100_000, InvalidJSON, "nested too deeply"),
        (b'{"command": "ping", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", InvalidJSON, "nested too deeply"),
        (b'{"command": "ping", "n": ' + b"9" * 5000 + b"}", InvalidJSON, "4300 digits"),
    ],
)
def test_parse_request_errors_say_what_is_wrong(line, error, words):
    with pytest.raises(error) as caught:
        parse_request(line)
    assert words in caught.value.message


def test_request_id_is_recovered_from_a_bad_request():
    assert request_id_of(b'{"id": "abc", "command": 3}') == (True, "abc")
    assert request_id_of(b"{broken") == (False, None)


def test_finish_reply_adds_success_timestamp_and_id():
    reply = finish_reply({"message": "pong"}, "r1", True)
    assert reply["success"] is True and reply["id"] == "r1" and isinstance(reply["timestamp"], float)
    assert "id" not in finish_reply({}, None, False)


def test_encode_refuses_nan_and_round_trips_unicode():
    with pytest.raises(ValueError):
        encode_message({"x": float("nan")})
    data = encode_message({"text": "ü"})
    assert data.endswith(b"\n") and b"\n" not in data[:-1]
    assert decode_message(data) == {"text": "ü"}
    with pytest.raises(ValueError):
        decode_message(b"[1]")


def test_single_line_chunks_over_the_limit_crlf_and_blank():
    reader = LineReader(10)
    assert reader.feed(b"x" * 9 + b"\r\n") == [b"x" * 9]
    assert reader.feed(b"  \n") == []
    assert reader.feed(b"x" * 11 + b"\n") == [] and reader.overflowed


def test_a_shared_request_addressed_to_each_device():
    import json as _json

    from agent.protocol import address_request, encode_shared_request, token_field

    shared = encode_shared_request({"command": "update_handler", "code": "x = '\"'\n", "id": "drop", "token": "t"})
    one = _json.loads(address_request(shared, 1, token_field('to"ken')))
    assert one == {"id": 1, "token": 'to"ken', "command": "update_handler", "code": "x = '\"'\n"}
    assert _json.loads(address_request(shared, 2)) == {"id": 2, "command": "update_handler", "code": "x = '\"'\n"}
    assert _json.loads(address_request(encode_shared_request({}), 3)) == {"id": 3}
    assert _json.loads(address_request(encode_shared_request({"token": "t"}), 4, token_field("s"))) == {"id": 4, "token": "s"}
    assert address_request(shared, 1).endswith(b"\n") and address_request(shared, 1).count(b"\n") == 1


def test_a_reply_carrying_a_lone_surrogate_is_sent_escaped_as_json_spells_it():
    line = encode_message({"id": "\ud800", "error": "bad"})
    assert line == b'{"id":"\\ud800","error":"bad"}\n'
    assert decode_message(line)["id"] == "\ud800"  # the client gets back exactly what it sent
