"""Server-sent events: splitting a byte stream into events across arbitrary chunk splits."""

from __future__ import annotations

from collections.abc import Iterator

import orjson

DONE = b"data: [DONE]\n\n"


class EventSplitter:
    """Yields complete events (bytes up to and including the blank line) as they complete.

    Chunks may end mid-event, mid-line or mid-UTF-8 character: bytes are kept until the
    event's terminating blank line arrives, and never decoded here.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        data = self._tail + chunk if self._tail else chunk
        held = b""
        if data.endswith(b"\r"):  # may be the first half of a CRLF split across chunks
            data, held = data[:-1], b"\r"
        if b"\r" in data:  # the spec allows CRLF and CR line ends; normalise once
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while (end := data.find(b"\n\n", start)) != -1:
            yield data[start : end + 2]
            start = end + 2
        self._tail = data[start:] + held

    def rest(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


def data_json(event: bytes) -> object | None:
    """The JSON payload of a `data:` event, or None for comments, [DONE] and non-JSON."""
    payload = b"\n".join(
        line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    )
    if not payload or payload == b"[DONE]":
        return None
    try:
        parsed: object = orjson.loads(payload)
        return parsed
    except orjson.JSONDecodeError:
        return None


def event(body: object) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
