"""An upstream for the held-streams test: answers each request with the headers and first
chunk of an OpenAI SSE stream, then sends only an SSE comment (`: ping`) every
`--ping-interval` seconds, as providers do on slow streams, until the other side closes:
a stream that is open but nearly idle (it stays under a gateway's stream idle timeout).

Envoy's `direct_response` always completes its answer at once (and its fault filter can
only trickle a body at >= 1 KiB/s, which would measure trickling, not holding), so this
tiny asyncio server plays the slow model. Run: `python -m bench.hold_server --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
from typing import cast

import uvloop

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_EVENT = (
    b'data: {"id":"chatcmpl-hold","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
_FIRST = _HEAD + f"{len(_EVENT):x}\r\n".encode() + _EVENT + b"\r\n"
_PING_EVENT = b": ping\n\n"
_PING = f"{len(_PING_EVENT):x}\r\n".encode() + _PING_EVENT + b"\r\n"
_OPEN: set[_Hold] = set()


def request_body(buf: bytes) -> tuple[bytes, bytes] | None:
    """(body, what follows it) once `buf` holds a whole HTTP/1.1 request with a
    Content-Length body; None while it does not."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = 0
    for line in buf[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    start = end + 4
    if len(buf) < start + length:
        return None
    return buf[start : start + length], buf[start + length :]


class _Hold(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.answered = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        _OPEN.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.answered or self.transport is None:
            return
        self.buf += data
        if request_body(self.buf) is not None:
            self.answered = True
            self.buf = b""
            self.transport.write(_FIRST)
            _OPEN.add(self)


async def _ping(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        for stream in list(_OPEN):
            if stream.transport is not None and not stream.transport.is_closing():
                stream.transport.write(_PING)


async def serve(port: int, ping_interval: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Hold, "127.0.0.1", port, backlog=4096)
    pinger = asyncio.create_task(_ping(ping_interval))
    async with server:
        await server.serve_forever()
    pinger.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ping-interval", type=float, default=20.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.port, args.ping_interval))


if __name__ == "__main__":
    main()
