"""Slow and idle clients, the connection cap and load shedding, against real Envoy and
workers (`llmux run`): each limit's status and JSON error body (or, where Envoy cannot
answer, what the client sees), and that the gateway serves the next request. (Rate limits
and budgets are tests/test_e2e_limits.py.)"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests.harness import (
    Gateway,
    MockUpstream,
    admin_text,
    json_response,
    openai_chat_completion,
    running_gateway,
)
from tests.mock_anthropic import API_KEY, answer, anthropic_error, request_errors, sse

pytestmark = pytest.mark.e2e

MOCK = {"model_name": "mock", "litellm_params": {"model": "mock/echo", "mock_response": "hi"}}
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hello"}]}


def serves_next(gw: Gateway) -> None:
    """The gateway answers a normal request on a new connection after the limit was hit."""
    client = openai.OpenAI(base_url=gw.openai_base, api_key="anything", max_retries=0)
    reply = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "again"}]
    )
    assert reply.choices[0].message.content == "hi"


def connect(gw: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.settimeout(10)
    return sock


class Reader(Protocol):
    def recv(self, n: int, /) -> bytes: ...


def read_response(sock: Reader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a content-length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return status, headers, body


def closed_without_a_byte(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def openai_error(body: bytes) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return dict(error)


# -- a client trickling its request ------------------------------------------------------


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[MockUpstream]:
    """An OpenAI upstream that answers after 2.5 s: longer than the client body timeout of
    the gateway below, which must not cut an answer once the request was received."""

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        assert request.path == "/v1/chat/completions"
        assert request.headers.get("authorization") == "Bearer sk-slow"
        assert orjson.loads(body)["model"] == "gpt-4o"
        await asyncio.sleep(2.5)
        return json_response(openai_chat_completion("gpt-4o", "slow but whole"))

    upstream = MockUpstream(handler).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def timeouts_gateway(
    slow_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = {
        "model_list": [
            MOCK,
            {
                "model_name": "slow",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": slow_upstream.base_url + "/v1",
                    "api_key": "sk-slow",
                },
            },
        ],
        "llmux": {"client_body_timeout": 1.5, "connection_idle_timeout": 1.5},
    }
    with running_gateway(config, tmp_path_factory.mktemp("timeouts")) as gw:
        yield gw


def test_trickling_client_gets_json_408(timeouts_gateway: Gateway) -> None:
    gw = timeouts_gateway
    body = orjson.dumps(CHAT)
    sock = connect(gw)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: llmux\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode())
    started = time.monotonic()
    # One byte every 0.2 s: the connection is never idle, yet the request never completes
    # (it would take len(body) * 0.2 s, over 10 s).
    sock.setblocking(False)
    sent = 0
    answer_bytes = b""
    while sent < len(body) - 1 and time.monotonic() - started < 30:
        try:
            answer_bytes += sock.recv(65536)
            break
        except BlockingIOError:
            pass
        except ConnectionResetError:
            break
        try:
            sock.sendall(body[sent : sent + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    sock.setblocking(True)
    sock.settimeout(10)
    status, headers, reply = read_response(_Prefixed(sock, answer_bytes))
    assert status == 408, reply
    assert headers["content-type"] == "application/json"
    error = openai_error(reply)
    assert error["type"] == "timeout_error"
    assert error["code"] == "408"
    assert "llmux.client_body_timeout" in error["message"]
    # Cut by the whole-request timer (1.5 s), not by the idle one (the client kept sending)
    # nor after the whole body; bounds generous for a loaded machine.
    assert sent < len(body) - 1
    assert 1.0 < elapsed < 10, elapsed
    assert headers.get("connection") == "close"
    assert closed_without_a_byte(sock)
    sock.close()
    serves_next(gw)


def test_trickling_headers_get_json_408(timeouts_gateway: Gateway) -> None:
    # The whole-request timer starts at the request's first byte: headers sent a byte at a
    # time (slowloris) are cut by it too.
    gw = timeouts_gateway
    sock = connect(gw)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmux\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()
    sent = 0
    sock.setblocking(False)
    got = b""
    while sent < len(head) and time.monotonic() - started < 30:
        try:
            got = sock.recv(65536)
            break
        except BlockingIOError:
            pass
        try:
            sock.sendall(head[sent : sent + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    sock.setblocking(True)
    sock.settimeout(10)
    status, _, reply = read_response(_Prefixed(sock, got))
    assert status == 408, reply
    assert openai_error(reply)["code"] == "408"
    assert sent < len(head)
    assert 1.0 < elapsed < 10, elapsed
    sock.close()
    serves_next(gw)


def test_answer_slower_than_client_body_timeout_is_not_cut(timeouts_gateway: Gateway) -> None:
    # The whole-request timer stops once the request has been received.
    client = openai.OpenAI(base_url=timeouts_gateway.openai_base, api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "take your time"}]
    )
    assert reply.choices[0].message.content == "slow but whole"


def test_silent_connection_is_closed_after_idle_timeout(timeouts_gateway: Gateway) -> None:
    gw = timeouts_gateway
    sock = connect(gw)
    started = time.monotonic()
    assert closed_without_a_byte(sock)  # HTTP/1.1: Envoy closes without a byte
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 9, elapsed
    sock.close()
    serves_next(gw)


def test_keep_alive_connection_is_closed_after_idle_timeout(timeouts_gateway: Gateway) -> None:
    gw = timeouts_gateway
    sock = connect(gw)
    body = orjson.dumps(CHAT)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmux\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, _, _ = read_response(sock)
    assert status == 200
    started = time.monotonic()
    assert closed_without_a_byte(sock)
    assert 1.0 < time.monotonic() - started < 9
    sock.close()


class _Prefixed:
    """A socket whose first bytes were already read."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self.sock, self.prefix = sock, prefix

    def recv(self, n: int) -> bytes:
        if self.prefix:
            out, self.prefix = self.prefix, b""
            return out
        return self.sock.recv(n)


# -- the connection cap ------------------------------------------------------------------


def listener_stat(gw: Gateway, stat: str) -> int:
    """A stat of the client listener as a whole (not its per-thread copies)."""
    return envoy_stat(gw, f"listener.127.0.0.1_{gw.port}.{stat}")


def test_connection_cap_closes_connections_past_it(tmp_path: Path) -> None:
    with running_gateway({"model_list": [MOCK], "llmux": {"max_connections": 4}}, tmp_path) as gw:
        # The harness's readiness probes used connections too: wait until Envoy has closed
        # them, or one of the four below could be the one past the cap.
        deadline = time.monotonic() + 10
        while listener_stat(gw, "downstream_cx_active") > 0:
            assert time.monotonic() < deadline, "earlier connections still open"
            time.sleep(0.05)
        held = [connect(gw) for _ in range(4)]
        # The four are counted once Envoy has accepted them.
        deadline = time.monotonic() + 10
        while listener_stat(gw, "downstream_cx_active") < 4:
            assert time.monotonic() < deadline, "Envoy did not accept the four connections"
            time.sleep(0.05)
        before = listener_stat(gw, "downstream_global_cx_overflow")
        extra = connect(gw)
        assert closed_without_a_byte(extra)  # Envoy cannot answer there: it closes
        extra.close()
        assert listener_stat(gw, "downstream_global_cx_overflow") == before + 1
        # A connection under the cap is served, and the mock's request reaches the sink
        # listener inside Envoy: Envoy's own connection to it is not refused by the cap.
        body = orjson.dumps(CHAT)
        sock = held[0]
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmux\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, _, reply = read_response(sock)
        assert status == 200, reply
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while listener_stat(gw, "downstream_cx_active") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        serves_next(gw)
        assert "file-descriptor limit" in gw.log()


# -- overload: more requests than the workers take ---------------------------------------


def envoy_stat(gw: Gateway, name: str) -> int:
    for line in admin_text(gw, f"/stats?filter=^{name}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"{name} not in Envoy's stats")


class SlowAnthropic:
    """Anthropic's Messages API, streamed: the first events at once, the rest after
    `hold` seconds, so each translated stream keeps its ext_proc stream open that long.
    Checks what it receives as tests.mock_anthropic does."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.served = 0

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path != "/v1/messages" or request.headers.get("x-api-key") != API_KEY:
            return anthropic_error(401, "authentication_error", "bad path or x-api-key")
        data = orjson.loads(body)
        errors = request_errors(data)
        if errors or not data.get("stream"):
            return anthropic_error(400, "invalid_request_error", "; ".join(errors) or "stream")
        events = sse(answer(data))
        first, rest = events.split(b"\n\n", 1)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first + b"\n\n")
        await asyncio.sleep(self.hold)
        await response.write(rest)
        await response.write_eof()
        self.served += 1
        return response


def test_overload_is_shed_with_json_503_and_recovers(tmp_path: Path) -> None:
    handler = SlowAnthropic(hold=6.0)
    upstream = MockUpstream(handler).start()
    config = {
        "model_list": [
            MOCK,
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": "anthropic/claude-3-5-sonnet-20241022",
                    "api_base": upstream.base_url,
                    "api_key": API_KEY,
                },
            },
        ],
        "llmux": {"workers": 1, "max_streams_per_worker": 10},
    }
    # One worker, 10 streams: 10 concurrent 6 s streams fit, 40 do not.
    offered = 40
    try:
        with running_gateway(config, tmp_path) as gw:

            async def one(client: httpx.AsyncClient) -> tuple[int, dict[str, str], bytes]:
                r = await client.post(
                    "/v1/chat/completions",
                    json={**CHAT, "model": "claude", "stream": True},
                )
                return r.status_code, dict(r.headers), r.content

            async def burst() -> list[tuple[int, dict[str, str], bytes]]:
                limits = httpx.Limits(max_connections=offered)
                async with httpx.AsyncClient(
                    base_url=gw.base_url, timeout=60, limits=limits
                ) as client:
                    return await asyncio.gather(*(one(client) for _ in range(offered)))

            overflow = "cluster.llmux_extproc.upstream_rq_active_overflow"
            before = envoy_stat(gw, overflow)
            results = asyncio.run(burst())
            statuses = sorted({status for status, _, _ in results})
            assert set(statuses) <= {200, 503}, statuses
            shed = [(h, b) for status, h, b in results if status == 503]
            served = [b for status, _, b in results if status == 200]
            assert shed, "no request was shed"
            assert len(served) >= 5, len(served)
            for headers, body in shed:
                assert headers["retry-after"] == "1"
                assert headers["content-type"] == "application/json"
                error = openai_error(body)
                assert error["type"] == "service_unavailable_error"
                assert "llmux.max_streams_per_worker" in error["message"]
            for body in served:
                assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
            # Envoy refused them (the ext_proc cluster's circuit breaker): no worker saw them.
            assert envoy_stat(gw, overflow) - before == len(shed)
            # Recovery: once the burst is over, translated streams are served again.
            client = openai.OpenAI(base_url=gw.openai_base, api_key="x", max_retries=0)
            handler.hold = 0.0
            stream = client.chat.completions.create(
                model="claude", messages=[{"role": "user", "content": "after"}], stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            serves_next(gw)
    finally:
        upstream.stop()
