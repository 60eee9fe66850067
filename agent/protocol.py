"""The wire protocol, without any I/O: bytes in, requests out; replies in, bytes out.

One UTF-8 JSON object per line, both ways. The agent's server and the fleet
client both use this module, so the framing rules live in one place:

- ``LineReader`` splits a byte stream into lines and enforces the line limit.
  It only ever scans newly received bytes for the newline, so a 40 MiB line
  costs one pass, not one pass per chunk (the system the seed documents
  re-scanned its buffer and spent 34 s of CPU on such a line). Lines are
  decoded only once they are whole, so a UTF-8 character split across two
  chunks is never a problem.
- ``parse_request`` turns one line into a ``Request`` or raises an
  ``AgentError`` whose reply explains what was wrong.
- ``encode_message`` turns a reply (or a request, on the client side) into one
  line of bytes. It refuses NaN and infinities, which are not JSON and which
  Node's ``JSON.parse`` rejects.

Nothing here imports asyncio; it is tested with plain function calls.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Dict, List, Optional, Union

from .contract import json_type
from .errors import BadRequest, InvalidJSON, TooLarge

# Limits
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
DEFAULT_READ_SIZE = 64 * 1024  # bytes one read may return; the buffer lives as long as the connection

RequestId = Union[str, int, float, None]

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ascii_encoder = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))
MAX_INT_DIGITS = 4300  # Python 3.11's own limit: longer integers cost quadratic time to parse


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


# Interpreters that predate the limit on integer digits (CPython gh-95778) get it here.
_decoder = json.JSONDecoder() if hasattr(sys, "get_int_max_str_digits") else json.JSONDecoder(parse_int=_bounded_int)


def _decode(text: str) -> Any:
    """``json.loads`` for one line, without its per-call overhead in the usual case.

    ``raw_decode`` skips the two whitespace scans of ``decode`` (over a
    quarter of the cost of decoding a short line). A line with surrounding whitespace
    or trailing garbage goes to ``decode``, which accepts the one and reports
    the other exactly as ``json.loads`` would.
    """
    try:
        try:
            obj, end = _decoder.raw_decode(text)
        except ValueError:
            return _decoder.decode(text)
        if end != len(text):
            return _decoder.decode(text)
    except RecursionError:  # a C stack's worth of nested brackets
        raise ValueError("arrays or objects are nested too deeply") from None
    return obj


class LineReader:
    """Splits a byte stream into newline-terminated lines, with a size limit.

    ``feed`` returns the complete lines found so far (without the ``\\n``,
    without a trailing ``\\r``, blank lines dropped) and keeps the unfinished
    tail. When a line grows past ``max_line_bytes``, ``overflowed`` becomes
    true and the reader stops: the lines before it are still returned, but the
    stream can no longer be framed reliably, so the caller answers
    ``too_large`` and closes the connection.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, read_size: int = DEFAULT_READ_SIZE) -> None:
        if max_line_bytes <= 0:
            raise ValueError("max_line_bytes must be positive")
        if read_size <= 0:
            raise ValueError("read_size must be positive")
        self.max_line_bytes = max_line_bytes
        self.read_size = read_size
        self.overflowed = False
        # The unfinished line, as the chunks it arrived in: joined once, when it is whole. A growing
        # bytearray would be reallocated (and copied) as it grows; under many large unfinished lines
        # that doubled the memory they held.
        self._tail: List[bytes] = []
        self._tail_bytes = 0
        self._array = bytearray()  # the reused read buffer, allocated at the first read
        self._buffer: Optional[memoryview] = None  # a view of it, for slicing without copying

    @property
    def pending_bytes(self) -> int:
        """How many bytes of an unfinished line are buffered."""
        return self._tail_bytes

    def get_buffer(self) -> memoryview:
        """Where the next read should land (for ``asyncio.BufferedProtocol.get_buffer``).

        Both ends read through this rather than ``Protocol.data_received``
        because asyncio's plain path calls ``recv(262144)`` for every read, and
        glibc serves each allocation that size with a fresh mmap and munmap:
        about 20 us per small message, several times the cost of the read
        itself (CPython issue #85451). One buffer, reused, costs nothing per read.
        """
        if self._buffer is None:
            self._array = bytearray(self.read_size)
            self._buffer = memoryview(self._array)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> List[bytes]:
        """``feed`` the ``nbytes`` a read just put at the start of ``get_buffer()``."""
        buffer = self._buffer
        assert buffer is not None, "buffer_updated before get_buffer"
        end = nbytes - 1
        if (self._array.find(b"\n", 0, nbytes) == end >= 0 and not self._tail and not self.overflowed
                and nbytes <= self.max_line_bytes + 1):
            # The usual case, exactly one whole line: copied once, and the same result as feed().
            if end and buffer[end - 1] == 13:
                end -= 1
            line = buffer[:end].tobytes()
            return [line] if line and not line.isspace() else []
        return self.feed(buffer[:nbytes].tobytes())

    def feed(self, data: bytes) -> List[bytes]:
        if self.overflowed:
            return []
        if not self._tail and data.endswith(b"\n") and data.count(b"\n") == 1:  # the usual case: one whole line
            if len(data) > self.max_line_bytes + 1:
                self._overflow()
                return []
            line = data[:-2] if data.endswith(b"\r\n") else data[:-1]
            return [line] if line and not line.isspace() else []
        if b"\n" not in data:
            self._tail.append(data)
            self._tail_bytes += len(data)
            self._check_tail()
            return []
        pieces = data.split(b"\n")
        if self._tail:
            self._tail.append(pieces[0])
            pieces[0] = b"".join(self._tail)
        last = pieces.pop()
        self._tail, self._tail_bytes = ([last] if last else []), len(last)
        lines: List[bytes] = []
        for line in pieces:
            if len(line) > self.max_line_bytes:
                self._overflow()
                return lines
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and not line.isspace():
                lines.append(line)
        self._check_tail()
        return lines

    def discard(self) -> None:
        """Drop the unfinished line (the connection is closing): its memory goes now."""
        self._tail, self._tail_bytes = [], 0

    def too_large_error(self) -> TooLarge:
        return TooLarge(
            f"request line is larger than the agent's limit of {self.max_line_bytes} bytes; "
            "the connection will be closed"
        )

    def _check_tail(self) -> None:
        if self._tail_bytes > self.max_line_bytes:
            self._overflow()

    def _overflow(self) -> None:
        self.overflowed = True
        self._tail, self._tail_bytes = [], 0


class Request:
    """One parsed request. ``command`` is lower-cased: names match case-insensitively.

    A plain class with slots, not a frozen dataclass: one is built per request,
    and the dataclass took half the time of parsing a short request. Treat it
    as read-only. ``args`` stays out of the repr: it may hold the token.
    """

    __slots__ = ("command", "args", "id", "has_id")

    def __init__(self, command: str, args: Dict[str, Any], id: RequestId = None, has_id: bool = False) -> None:
        self.command = command
        self.args = args
        self.id = id
        self.has_id = has_id

    def __repr__(self) -> str:
        return f"Request(command={self.command!r}, id={self.id!r})"


def request_id_of(line: bytes) -> tuple:
    """Best effort: the ``id`` of a line that failed to parse as a request.

    Returns ``(has_id, id)`` so a reply to a bad request can still be matched
    by a client that sent an id.
    """
    try:
        obj = _decode(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, None
    if isinstance(obj, dict) and "id" in obj and _valid_id(obj["id"]):
        return True, obj["id"]
    return False, None


def reply_to_of(line: bytes) -> Optional[str]:
    """Best effort: the ``reply_to`` of a line that failed to parse as a request (through a broker, the topic
    its refusal goes to)."""
    try:
        obj = _decode(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    value = obj.get("reply_to") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _valid_id(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or (isinstance(value, (str, int)) and not isinstance(value, bool))


def _is_text(value: str) -> bool:
    """False for a string JSON allows but Unicode does not: a lone surrogate such as ``"\\ud800"``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(line: bytes) -> Request:
    """Parse one request line; raise ``InvalidJSON`` or ``BadRequest`` with a useful message."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(
            f"request is not valid UTF-8 (bad byte at position {exc.start}); send UTF-8 encoded JSON"
        ) from None
    try:
        obj = _decode(text)
    except ValueError as exc:
        raise InvalidJSON(f"request is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(
            f"a request must be a JSON object like {{\"command\": \"ping\"}}, got {json_type(obj)}"
        )
    has_id = "id" in obj
    request_id = obj.get("id")
    if has_id and not _valid_id(request_id):
        raise BadRequest(f"'id' must be a string or a finite number, got {json_type(request_id)}")
    if isinstance(request_id, str) and not _is_text(request_id):
        raise BadRequest("'id' is not valid Unicode text (it holds a lone surrogate such as \\ud800)")
    command = obj.get("command")
    if command is None:
        raise BadRequest("request has no 'command' field; send {\"command\": \"<name>\", ...}")
    if not isinstance(command, str) or not command:
        raise BadRequest(f"'command' must be a non-empty string, got {json_type(command)}")
    if not _is_text(command):
        raise BadRequest("'command' is not valid Unicode text (it holds a lone surrogate such as \\ud800)")
    return Request(command=command.lower(), args=obj, id=request_id, has_id=has_id)




def finish_reply(reply: Dict[str, Any], request_id: RequestId = None, has_id: bool = False) -> Dict[str, Any]:
    """Add the fields every reply carries: ``success``, ``timestamp`` and the echoed ``id``."""
    reply.setdefault("success", True)
    reply.setdefault("timestamp", time.time())
    if has_id:
        reply["id"] = request_id
    return reply


def encode_message(message: Dict[str, Any]) -> bytes:
    """One JSON object as one line of UTF-8 bytes. Raises ``ValueError``/``TypeError`` if not JSON.

    A string that is not valid Unicode (a lone surrogate, which JSON allows
    as ``\\ud800``) is sent escaped, as JSON spells it, instead of failing.
    """
    text = _encoder.encode(message)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (_ascii_encoder.encode(message) + "\n").encode("ascii")


def encode_shared_request(message: Dict[str, Any]) -> bytes:
    """A request for many devices, encoded once, without ``id`` and ``token``.

    ``address_request`` then gives each device its own copy with its own
    ``id`` and token in front, without encoding the (possibly large) body
    again. What is returned is the line after its opening ``{"id":N``:
    ``,"command":...}\n`` (or ``}\n`` for an empty request), so addressing it
    copies the body once.
    """
    line = encode_message({k: v for k, v in message.items() if k not in ("id", "token")})
    rest = line[1:]  # what followed the opening brace: '"command":...}\n', or '}\n'
    return rest if rest == b"}\n" else b"," + rest


def token_field(token: Optional[str]) -> bytes:
    """``,"token":"..."`` for ``address_request``: encoded once per device, not once per request."""
    return b"" if token is None else b',"token":' + _encoder.encode(token).encode("utf-8")


def address_request(shared: bytes, request_id: int, token: bytes = b"") -> bytes:
    """``shared`` (from ``encode_shared_request``) with an integer ``id`` and a ``token_field`` spliced in."""
    return b'{"id":%d%s%s' % (request_id, token, shared)


def decode_message(line: bytes) -> Dict[str, Any]:
    """Client side: one reply line to a dict. Raises ``ValueError`` if it is not a JSON object."""
    obj = _decode(line.decode("utf-8"))  # a bad byte raises UnicodeDecodeError, a ValueError
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {json_type(obj)}")
    return obj


def error_line(error: Any, request_id: RequestId = None, has_id: bool = False) -> bytes:
    """The encoded reply for an ``AgentError``."""
    return encode_message(finish_reply(error.to_reply(), request_id, has_id))


__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "LineReader",
    "Request",
    "address_request",
    "decode_message",
    "encode_message",
    "encode_shared_request",
    "error_line",
    "finish_reply",
    "json_type",
    "parse_request",
    "request_id_of",
    "token_field",
]

