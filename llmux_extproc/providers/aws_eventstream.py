"""AWS event-stream framing (application/vnd.amazon.eventstream), decoded incrementally.

Bedrock's streaming APIs send binary messages, not SSE. Each message is:

    total length (u32) | headers length (u32) | prelude CRC32 (u32)
    headers (headers-length bytes) | payload | message CRC32 (u32)

all big-endian; the prelude CRC covers the first 8 bytes, the message CRC everything before
it. Upstream bytes reach us cut anywhere, so `EventStreamDecoder.feed` keeps the incomplete
tail and returns only whole, CRC-checked messages.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

_PRELUDE = 12  # total length + headers length + prelude CRC
_OVERHEAD = _PRELUDE + 4  # ... + message CRC
# AWS's own limits; checking them before buffering keeps a corrupt length from making us
# wait for (and hold) gigabytes that will never come.
MAX_MESSAGE = 16 * 1024 * 1024
MAX_HEADERS = 128 * 1024

HeaderValue = bool | int | bytes | str | uuid.UUID


class EventStreamError(ValueError):
    """A frame that is not valid event-stream: bad length or CRC, unknown header type."""


@dataclass(frozen=True, slots=True)
class Message:
    headers: dict[str, HeaderValue]
    payload: bytes

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


class EventStreamDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _PRELUDE:
            total = _check_prelude(self._buffer)
            if len(self._buffer) < total:
                break
            frame = bytes(self._buffer[:total])
            del self._buffer[:total]
            messages.append(decode_message(frame))
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message still held (non-zero at end means truncation)."""
        return len(self._buffer)


def _check_prelude(buffer: bytes | bytearray) -> int:
    total, headers_len, crc = struct.unpack_from(">III", buffer)
    if zlib.crc32(memoryview(buffer)[:8]) != crc:
        raise EventStreamError("event-stream prelude CRC mismatch")
    if not _OVERHEAD <= total <= MAX_MESSAGE or headers_len > min(MAX_HEADERS, total - _OVERHEAD):
        raise EventStreamError(f"event-stream lengths out of range: {total}, {headers_len}")
    return int(total)


def decode_message(frame: bytes) -> Message:
    """One complete frame, lengths and both CRCs checked."""
    if len(frame) < _PRELUDE:
        raise EventStreamError("event-stream frame shorter than its prelude")
    total = _check_prelude(frame)
    if len(frame) != total:
        raise EventStreamError(f"event-stream frame is {len(frame)} bytes, prelude says {total}")
    (crc,) = struct.unpack_from(">I", frame, total - 4)
    if zlib.crc32(memoryview(frame)[: total - 4]) != crc:
        raise EventStreamError("event-stream message CRC mismatch")
    (headers_len,) = struct.unpack_from(">I", frame, 4)
    headers = _decode_headers(frame[_PRELUDE : _PRELUDE + headers_len])
    return Message(headers, frame[_PRELUDE + headers_len : total - 4])


# Header value types: (type id) -> struct format of a fixed-size value.
_FIXED = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}


def _decode_headers(data: bytes) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    pos = 0
    try:
        while pos < len(data):
            name_len = data[pos]
            raw_name = data[pos + 1 : pos + 1 + name_len]
            if len(raw_name) != name_len:
                raise EventStreamError("event-stream header name truncated")
            name = raw_name.decode()
            pos += 1 + name_len
            kind = data[pos]
            pos += 1
            value: HeaderValue
            if kind in (0, 1):
                value = kind == 0  # the type itself carries the boolean
            elif kind in _FIXED:
                fmt = _FIXED[kind]
                value = int(struct.unpack_from(fmt, data, pos)[0])  # timestamps: ms since epoch
                pos += struct.calcsize(fmt)
            elif kind in (6, 7):
                (size,) = struct.unpack_from(">H", data, pos)
                raw = data[pos + 2 : pos + 2 + size]
                if len(raw) != size:
                    raise EventStreamError("event-stream header value truncated")
                value = raw.decode() if kind == 7 else bytes(raw)
                pos += 2 + size
            elif kind == 9:
                value = uuid.UUID(bytes=data[pos : pos + 16])
                pos += 16
            else:
                raise EventStreamError(f"unknown event-stream header type {kind}")
            headers[name] = value
    except EventStreamError:
        raise
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise EventStreamError(f"malformed event-stream headers: {exc}") from exc
    if pos != len(data):
        raise EventStreamError("event-stream headers overrun their length")
    return headers
