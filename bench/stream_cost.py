"""`python -m bench.stream_cost`: Envoy's CPU per streamed chunk, LLMux against bare Envoy.

The main bench's mock answers a stream in one body, as Envoy's `direct_response` must; a
real model sends one event per chunk, and per-chunk work in Envoy (response.lua keeping the
produced text, sse_to_metadata reading usage) only shows with that. This starts a tiny
upstream that sends each OpenAI SSE event as its own chunk, a few ms apart, drives a fixed
number of concurrent streams through bare Envoy, through LLMux (`workers: 1`) and through
LLMux with `stream_accounting: processor`, and reports CPU microseconds per chunk for each
process role. CPU time, not wall time: the figures
hold on a shared 2-core box as long as nothing saturates.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

from bench.hold_server import request_body
from bench.procstats import cpu_by_role, cpu_delta
from bench.runner import log
from bench.targets import (
    ROOT,
    BareEnvoy,
    LLMux,
    Target,
    Upstreams,
    free_port,
)

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _event(delta: dict[str, object], usage: dict[str, int] | None = None) -> bytes:
    body = {
        "id": "chatcmpl-cost",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    if usage:
        body["usage"] = usage
    data = b"data: " + orjson.dumps(body) + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class _ChunkedStream(asyncio.Protocol):
    """Answers each request with `chunks` content events, each its own chunk."""

    def __init__(self, chunks: int, interval: float) -> None:
        self.chunks = chunks
        self.interval = interval
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        request = request_body(self.buf)
        if request is None:
            return
        body, self.buf = request
        usage = b'"include_usage":true' in body
        asyncio.get_running_loop().create_task(self._answer(usage))

    async def _answer(self, usage: bool) -> None:
        assert self.transport is not None
        self.transport.write(_HEAD + _event({"role": "assistant", "content": ""}))
        for i in range(self.chunks):
            await asyncio.sleep(self.interval)
            if self.transport.is_closing():
                return
            self.transport.write(_event({"content": f" word{i}"}))
        tail = _event({}, {"prompt_tokens": 20, "completion_tokens": self.chunks}) if usage else b""
        done = b"data: [DONE]\n\n"
        self.transport.write(tail + f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")


class LLMuxProcessorAccounting(LLMux):
    """LLMux with `stream_accounting: processor`: every chunk through Python, for contrast."""

    def __init__(self, upstreams: Upstreams, workdir: Path) -> None:
        super().__init__(upstreams, workdir, workers=1)
        self.name = "llmux-processor"
        self.label = "LLMux workers=1, stream_accounting: processor"

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["llmux"]["stream_accounting"] = "processor"
        return config


def serve(port: int, chunks: int, interval: float) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _ChunkedStream(chunks, interval), "127.0.0.1", port
        )
        await server.serve_forever()

    uvloop.run(main())


async def _one_stream(port: int, request: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        while True:
            data = await reader.read(65536)
            # Envoy may send the terminating zero-length chunk in a read of its own.
            if not data or data.endswith(b"0\r\n\r\n"):
                return
    finally:
        writer.close()


async def _drive(port: int, request: bytes, concurrency: int, streams: int) -> float:
    started = time.perf_counter()
    for _ in range(streams // concurrency):
        await asyncio.gather(*(_one_stream(port, request) for _ in range(concurrency)))
    return time.perf_counter() - started


def measure(target: Target, args: argparse.Namespace) -> dict[str, float]:
    target.start()
    try:
        request = target.raw_request("openai_stream")
        uvloop.run(_drive(target.port, request, args.concurrency, args.concurrency))  # warm-up
        before = cpu_by_role(target.processes)
        wall = uvloop.run(_drive(target.port, request, args.concurrency, args.streams))
        used = cpu_delta(before, cpu_by_role(target.processes))
    finally:
        target.stop()
    chunks = args.streams * (args.chunks + 3)  # role, content..., usage, [DONE]
    out = {f"{role}_us_per_chunk": cpu / chunks * 1e6 for role, cpu in used.items()}
    out["streams_per_s"] = args.streams / wall
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_cost", description=__doc__)
    p.add_argument("--chunks", type=int, default=200, help="content events per stream")
    p.add_argument("--interval", type=float, default=0.002, help="seconds between events")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--streams", type=int, default=2000)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="llmux-stream-cost-"))
    upstreams = Upstreams(workdir)
    upstreams.start()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from bench.stream_cost import serve; serve({port}, {args.chunks}, {args.interval})",
        ],
        cwd=ROOT,
    )
    try:
        upstreams.ports["openai_stream"] = port
        time.sleep(1)
        targets = (
            BareEnvoy(upstreams, workdir),
            LLMux(upstreams, workdir, workers=1),
            LLMuxProcessorAccounting(upstreams, workdir),
        )
        for target in targets:
            result = measure(target, args)
            log(f"{target.label}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
    finally:
        server.terminate()
        server.wait()
        upstreams.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
