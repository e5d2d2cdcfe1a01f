"""Every request gets an answer in OpenAI's error shape (issue 10, items 1 and 7).

Malformed HTTP is sent over raw sockets, since no HTTP client library sends it, to a real
`llmux run` (Envoy and workers); each case checks the status, the JSON error body, and
that the gateway then serves the next request. The raw client reads while it sends, as
curl does: Envoy answers an early error (a bad header) before the body has arrived and
then closes, and a client that only reads once it has sent everything can meet the
connection reset instead of the answer.
"""

from __future__ import annotations

import asyncio
import gzip
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from llmux_extproc.errors import GatewayError
from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    openai_chat_completion,
    running_gateway,
)

MASTER_KEY = "sk-master-protocol"
UPSTREAM_KEY = "sk-upstream-protocol"
LIMIT = 64 * 1024  # llmux.max_request_body_bytes of the gateway under test
AUTH = {"authorization": f"Bearer {MASTER_KEY}"}


async def _openai(request: web.Request, body: bytes) -> web.StreamResponse:
    data = orjson.loads(body)
    content = data["messages"][-1]["content"]
    if not data.get("stream"):
        return json_response(openai_chat_completion(data["model"], f"echo: {content[:20]}"))
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": data["model"],
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}],
    }
    usage = {
        **chunk,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    for event in (chunk, usage):
        await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    up = MockUpstream(_openai).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "model_list": [
            {
                "model_name": "gpt-test",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": UPSTREAM_KEY,
                },
            },
            {"model_name": "mock", "litellm_params": {"model": "mock/gpt-4o-mini"}},
        ],
        "general_settings": {"master_key": MASTER_KEY},
        "llmux": {"workers": 1, "max_request_body_bytes": LIMIT},
    }
    with running_gateway(config, tmp_path_factory.mktemp("proto")) as gw:
        yield gw


# -- a raw HTTP/1.1 client -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    rest: bytes  # whatever followed the reply on the connection

    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error of the reply (asserted to be one)."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        err = orjson.loads(self.body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"].strip(), err
        assert err["code"] == str(self.status), err
        assert b"Traceback" not in self.body
        return dict(err)


def _parse(raw: bytes) -> Reply | None:
    """The first complete response in `raw`, or None while it is incomplete."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return Reply(int(status_line.split()[1]), headers, rest[:length], rest[length:])


class Connection:
    """One TCP connection to the gateway: sends while it reads, like a careful client."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setblocking(False)
        self.received = b""
        self.closed = False  # the gateway closed (FIN or reset)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _read(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.closed = True
            return
        if not chunk:
            self.closed = True
        self.received += chunk

    def exchange(self, data: bytes, timeout: float = 20) -> Reply:
        """Send `data` (as much as the gateway takes) and return the first reply."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while time.monotonic() < deadline:
                reply = _parse(self.received)
                if reply is not None:
                    self.received = reply.rest
                    return reply
                if self.closed:
                    break
                if not data:
                    sel.modify(self.sock, selectors.EVENT_READ)
                for _, events in sel.select(0.5):
                    if events & selectors.EVENT_READ:
                        self._read()
                    if events & selectors.EVENT_WRITE and data and not self.closed:
                        try:
                            data = data[self.sock.send(data[:65536]) :]
                        except (BrokenPipeError, ConnectionResetError):
                            data = b""  # the gateway stopped reading; its reply may be in
        raise AssertionError(f"no complete reply (closed={self.closed}): {self.received[:300]!r}")

    def wait_closed(self, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            while not self.closed and time.monotonic() < deadline:
                if sel.select(0.5):
                    self._read()
        return self.closed


def send(gw: Gateway, data: bytes) -> Reply:
    with Connection(gw.port) as conn:
        return conn.exchange(data)


def assert_serves(gw: Gateway) -> None:
    """The gateway answers a well-formed request on a new connection."""
    resp = httpx.get(f"{gw.openai_base}/models", headers=AUTH, timeout=20)
    assert resp.status_code == 200, resp.text
    assert [m["id"] for m in resp.json()["data"]] == ["gpt-test", "mock"]


def chat(content: str = "hi", **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}
    )


# -- malformed HTTP -------------------------------------------------------------------

_H = b"Host: llmux\r\n"
_POST = b"POST /v1/chat/completions HTTP/1.1\r\n" + _H
_BIG = b"x" * (1024 * 1024)

# name, what is sent, status, a word the message must contain
MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("request line garbage", b"GARBAGE\r\n\r\n", 400, "Malformed"),
    ("method with invalid characters", b"G(T /v1/models HTTP/1.1\r\n" + _H + b"\r\n", 400, ""),
    ("target without a slash", b"GET v1/models HTTP/1.1\r\n" + _H + b"\r\n", 400, ""),
    (
        "header name with a space",
        b"GET /v1/models HTTP/1.1\r\n" + _H + b"Bad H: 1\r\n\r\n",
        400,
        "",
    ),
    ("space before the colon", b"GET /v1/models HTTP/1.1\r\nHost : llmux\r\n\r\n", 400, ""),
    ("header line without a colon", b"GET /v1/models HTTP/1.1\r\n" + _H + b"junk\r\n\r\n", 400, ""),
    (
        "NUL in a header value",
        b"GET /v1/models HTTP/1.1\r\n" + _H + b"X-A: a\x00b\r\n\r\n",
        400,
        "characters",
    ),
    (
        "a 70,000-byte header",
        b"GET /v1/models HTTP/1.1\r\n" + _H + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        431,
        "60 KiB",
    ),
    (
        "150 headers",
        b"GET /v1/models HTTP/1.1\r\n"
        + _H
        + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        + b"\r\n",
        431,
        "100 headers",
    ),
    ("a 64 KB path", b"GET /" + b"a" * 65_536 + b" HTTP/1.1\r\n" + _H + b"\r\n", 431, "URL"),
    (
        "duplicate Content-Length",
        _POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "Content-Length",
    ),
    ("Content-Length not a number", _POST + b"Content-Length: abc\r\n\r\n{}", 400, ""),
    ("negative Content-Length", _POST + b"Content-Length: -1\r\n\r\n{}", 400, ""),
    (
        "Content-Length and chunked",
        _POST + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "both",
    ),
    ("Transfer-Encoding gzip", _POST + b"Transfer-Encoding: gzip\r\n\r\n{}", 501, "chunked"),
    (
        "bad chunk size",
        _POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
        "chunk",
    ),
    # An early error with a large body still on its way: the reply reaches a client that
    # reads while it sends.
    (
        "invalid Content-Length, 1 MB following",
        _POST + b"Content-Length: x1\r\n\r\n" + _BIG,
        400,
        "",
    ),
    ("HTTP/1.0", b"GET /v1/models HTTP/1.0\r\n" + _H + b"\r\n", 426, "HTTP/1.1"),
    (
        "HTTP/1.0 POST with a body",
        b"POST /v1/chat/completions HTTP/1.0\r\n" + _H + b"Content-Length: 5\r\n\r\nhello",
        426,
        "HTTP/1.1",
    ),
    # HTTP/0.9 has no status line; Envoy answers it in HTTP/1.1 and closes.
    ("HTTP/0.9", b"GET /v1/models\r\n\r\n", 426, "HTTP/1.1"),
    ("HTTP/1.2", b"GET /v1/models HTTP/1.2\r\n" + _H + b"\r\n", 426, "HTTP/1.1"),
    ("missing Host", b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "Host"),
    ("'#' in a GET path", b"GET /v1/models#part HTTP/1.1\r\n" + _H + b"\r\n", 400, "'#'"),
    (
        "'#' in a POST path",
        b"POST /v1/chat/completions#x HTTP/1.1\r\n" + _H + b"Content-Length: 2\r\n\r\n{}",
        400,
        "'#'",
    ),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\n" + _H + b"\r\n", 404, "path"),
    (
        "WebSocket upgrade",
        b"GET /v1/models HTTP/1.1\r\n" + _H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        403,
        "WebSocket",
    ),
    ("CONNECT", b"CONNECT llmux:443 HTTP/1.1\r\nHost: llmux:443\r\n\r\n", 403, "CONNECT"),
]


# Well-formed HTTP that Envoy refuses to route: the connection stays usable.
KEEPS_CONNECTION = {"OPTIONS *"}


@pytest.mark.parametrize(
    ("name", "data", "status", "word"),
    [pytest.param(n, d, s, w, id=n) for n, d, s, w in MALFORMED],
)
def test_malformed_http_gets_an_openai_error(
    gateway: Gateway, name: str, data: bytes, status: int, word: str
) -> None:
    with Connection(gateway.port) as conn:
        reply = conn.exchange(data)
        assert reply.status == status, reply
        err = reply.error()
        assert word in err["message"], err
        if name in KEEPS_CONNECTION:
            reply = conn.exchange(b"GET /health/live HTTP/1.1\r\nHost: llmux\r\n\r\n")
            assert reply.status == 200, reply
        else:
            # Envoy cannot read past a malformed request: it says so and closes.
            assert reply.headers.get("connection") == "close", reply.headers
            assert conn.wait_closed()
    assert_serves(gateway)


def test_no_traceback_in_the_log_after_malformed_requests(gateway: Gateway) -> None:
    for _, data, _, _ in MALFORMED:
        send(gateway, data)
    assert_serves(gateway)
    assert "Traceback" not in gateway.log()


# -- methods --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/chat/completions", "POST"),
        ("GET", "/v1/embeddings?x=1", "POST"),
        ("OPTIONS", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("POST", "/models", "GET"),
        ("POST", "/metrics", "GET"),
        ("PUT", "/health", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(
    gateway: Gateway, method: str, path: str, allow: str
) -> None:
    with Connection(gateway.port) as conn:
        request = f"{method} {path} HTTP/1.1\r\nHost: llmux\r\nContent-Length: 0\r\n\r\n"
        reply = conn.exchange(request.encode())
        assert reply.status == 405, reply
        assert reply.headers["allow"] == allow
        assert allow in reply.error()["message"]
        # A well-formed request with the wrong method keeps the connection usable.
        reply = conn.exchange(b"GET /health/live HTTP/1.1\r\nHost: llmux\r\n\r\n")
        assert reply.status == 200, reply


def test_right_methods_still_served(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.base_url}/metrics", headers=AUTH, timeout=20).status_code == 200
    resp = httpx.post(f"{gateway.openai_base}/chat/completions", headers=AUTH, content=chat())
    assert resp.status_code == 200, resp.text


# -- bodies ---------------------------------------------------------------------------


def _padded(size: int, **extra: Any) -> bytes:
    """A chat request of exactly `size` bytes."""
    base = len(chat("", **extra))
    body = chat("p" * (size - base), **extra)
    assert len(body) == size
    return body


def test_body_exactly_at_the_limit_is_accepted(gateway: Gateway, upstream: MockUpstream) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions", headers=AUTH, content=_padded(LIMIT)
    )
    assert resp.status_code == 200, resp.text
    assert len(upstream.last().body) >= LIMIT - 64  # the model name was replaced
    over = httpx.post(
        f"{gateway.openai_base}/chat/completions", headers=AUTH, content=_padded(LIMIT + 1)
    )
    assert over.status_code == 413, over.text
    assert f"the limit is {LIMIT} bytes" in over.json()["error"]["message"]


def test_limit_is_on_the_clients_body_not_llmux_rewrite(
    gateway: Gateway, upstream: MockUpstream
) -> None:
    # A stream at the limit: LLMux adds stream_options for the usage chunk, so the provider
    # gets more than the limit.
    body = _padded(LIMIT, stream=True)
    with httpx.stream(
        "POST", f"{gateway.openai_base}/chat/completions", headers=AUTH, content=body, timeout=20
    ) as resp:
        text = resp.read().decode()
        assert resp.status_code == 200, text
    assert "[DONE]" in text
    sent = upstream.last()
    assert len(sent.body) > LIMIT
    assert sent.json()["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("depth", [300, 1000])
def test_deeply_nested_json_is_400(gateway: Gateway, depth: int) -> None:
    # Past orjson's encode depth (254) and, at 1000, past what Envoy's JSON reader takes
    # to route on the model; below orjson's parse limit (1024).
    nested = b"[" * depth + b"]" * depth
    body = (
        b'{"model":"gpt-test","messages":[{"role":"user","content":"x"}],'
        b'"metadata":{"deep":' + nested + b"}}"
    )
    resp = httpx.post(f"{gateway.openai_base}/chat/completions", headers=AUTH, content=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert f"nested {depth + 2} levels deep" in err["message"], err
    assert "Traceback" not in gateway.log()
    assert_serves(gateway)


def test_json_deeper_than_the_parser_takes_is_400(gateway: Gateway) -> None:
    nested = b"[" * 1100 + b"]" * 1100
    body = b'{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"m":' + nested + b"}"
    resp = httpx.post(f"{gateway.openai_base}/chat/completions", headers=AUTH, content=body)
    assert resp.status_code == 400, resp.text
    assert "JSON" in resp.json()["error"]["message"]


def test_nesting_boundary(gateway: Gateway, upstream: MockUpstream) -> None:
    """A field nested 253 deep (254 levels with the body) is forwarded as it is; 254 deep
    is more than orjson encodes, a 400."""

    def body(depth: int) -> bytes:
        nested = b"[" * depth + b"]" * depth
        return (
            b'{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"m":' + nested + b"}"
        )

    resp = httpx.post(f"{gateway.openai_base}/chat/completions", headers=AUTH, content=body(253))
    assert resp.status_code == 200, resp.text
    assert upstream.last().body.endswith(b"]" * 253 + b"}")
    resp = httpx.post(f"{gateway.openai_base}/chat/completions", headers=AUTH, content=body(254))
    assert resp.status_code == 400, resp.text
    assert "nested 255 levels deep" in resp.json()["error"]["message"]


def test_gzip_body_is_decompressed(gateway: Gateway, upstream: MockUpstream) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={**AUTH, "content-encoding": "gzip", "content-type": "application/json"},
        content=gzip.compress(chat("zipped hello")),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: zipped hello"
    sent = upstream.last()
    assert sent.json()["messages"][0]["content"] == "zipped hello"
    assert "content-encoding" not in sent.headers


def test_gzip_bomb_meets_the_limit(gateway: Gateway) -> None:
    body = gzip.compress(chat(" " * (4 * LIMIT)))
    assert len(body) < LIMIT // 16
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={**AUTH, "content-encoding": "gzip"},
        content=body,
    )
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_corrupt_gzip_is_415(gateway: Gateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={**AUTH, "content-encoding": "gzip"},
        content=gzip.compress(chat("cut short"))[:-12],
    )
    # Cut short: what inflates is not JSON, so the route chosen on the headers (415) stands.
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={**AUTH, "content-encoding": "gzip"},
        content=b"not gzip at all" * 10,
    )
    assert resp.status_code == 415, resp.text
    assert len(upstream.requests) == before


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "x-made-up"])
def test_other_content_encodings_are_415(
    gateway: Gateway, upstream: MockUpstream, encoding: str
) -> None:
    before = len(upstream.requests)
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={**AUTH, "content-encoding": encoding},
        content=b"\x1f\x8b not really " + encoding.encode(),
    )
    assert resp.status_code == 415, resp.text
    assert "Content-Encoding" in resp.json()["error"]["message"]
    assert len(upstream.requests) == before


def test_identity_encoding_is_served(gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={**AUTH, "content-encoding": "identity"},
        content=chat(),
    )
    assert resp.status_code == 200, resp.text


def test_raw_client_keep_alive_sanity(gateway: Gateway) -> None:
    """The raw client itself: two well-formed requests on one connection are both served
    (so the failures above are the gateway's answers, not the client's)."""
    body = chat("raw")
    request = (
        _POST
        + f"Authorization: Bearer {MASTER_KEY}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with Connection(gateway.port) as conn:
        for _ in range(2):
            reply = conn.exchange(request)
            assert reply.status == 200, reply
            assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "echo: raw"
        assert not conn.closed


def test_management_wrong_method_names_the_allowed_ones() -> None:
    """/key/* and /team/* are answered by the processor; its 405 carries `Allow` too (the
    end-to-end path, with PostgreSQL, is in test_e2e_keys.py)."""
    from llmux_extproc.db import management

    store: Any = None  # the method is checked before the store is used
    with pytest.raises(management.MethodNotAllowed) as info:
        asyncio.run(management.handle(store, "GET", "/key/generate", b""))
    assert info.value.status == 405 and info.value.allow == "POST"
    with pytest.raises(management.MethodNotAllowed) as info:
        asyncio.run(management.handle(store, "DELETE", "/key/info?key=x", b""))
    assert info.value.allow == "GET"
    with pytest.raises(GatewayError) as unknown:
        asyncio.run(management.handle(store, "GET", "/key/nothing", b""))
    assert unknown.value.status == 404


def test_management_405_reaches_the_client_with_allow(tmp_path: Path) -> None:
    from tests.pg import fresh_database

    with fresh_database() as url:
        config = {
            "model_list": [{"model_name": "mock", "litellm_params": {"model": "mock/gpt-4o"}}],
            "general_settings": {"master_key": MASTER_KEY, "database_url": url},
            "llmux": {"workers": 1},
        }
        with running_gateway(config, tmp_path) as gw:
            resp = httpx.get(f"{gw.base_url}/key/generate", headers=AUTH, timeout=20)
            assert resp.status_code == 405, resp.text
            assert resp.headers["allow"] == "POST"
            assert resp.json()["error"]["code"] == "405"
            resp = httpx.get(f"{gw.base_url}/key/nothing", headers=AUTH, timeout=20)
            assert resp.status_code == 404, resp.text
            resp = httpx.post(f"{gw.base_url}/key/generate", headers=AUTH, json={}, timeout=20)
            assert resp.status_code == 200, resp.text


# -- HTTP/2 (prior knowledge, on the same listener) ------------------------------------


@dataclass
class H2Stream:
    status: int | None = None
    headers: dict[str, str] | None = None
    body: bytes = b""
    reset: int | None = None  # the error code of a RST_STREAM, if the stream was reset
    ended: bool = False


def h2_exchange(
    port: int, requests: dict[int, list[tuple[str, str]]], timeout: float = 20
) -> dict[int, H2Stream]:
    """Send each request (stream id → headers, no body) on one HTTP/2 connection and
    collect what comes back for each stream."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            # Malformed on purpose: h2 would refuse to send it.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    streams = {sid: H2Stream() for sid in requests}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn.initiate_connection()
        for sid, headers in requests.items():
            conn.send_headers(sid, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        while not all(s.ended for s in streams.values()) and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    # Typed as bytes; header_encoding makes them str.
                    hdrs = {str(k): str(v) for k, v in event.headers or []}
                    streams[event.stream_id].headers = hdrs
                    streams[event.stream_id].status = int(hdrs[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id].body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    streams[event.stream_id].ended = True
                elif isinstance(event, h2.events.StreamReset):
                    streams[event.stream_id].reset = int(event.error_code)
                    streams[event.stream_id].ended = True
            sock.sendall(conn.data_to_send())
    return streams


def _h2_get(path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", "GET"),
        (":path", path),
        (":scheme", "http"),
        (":authority", "llmux"),
        ("authorization", f"Bearer {MASTER_KEY}"),
        *extra,
    ]


def test_http2_invalid_request_resets_only_its_stream(gateway: Gateway) -> None:
    """HTTP/2 cannot carry a status for a request whose headers break the protocol: that
    stream is reset (PROTOCOL_ERROR), the other streams on the connection are answered."""
    streams = h2_exchange(
        gateway.port,
        {
            1: _h2_get("/v1/models", ("X-Upper-Case", "v")),
            3: _h2_get("/v1/models"),
            5: _h2_get("/v1/models", ("connection", "keep-alive")),
            7: _h2_get("/v1/models"),
        },
    )
    assert streams[1].reset == 1 and streams[5].reset == 1, streams
    for sid in (3, 7):
        assert streams[sid].status == 200, streams[sid]
        assert orjson.loads(streams[sid].body)["object"] == "list"


def test_http2_errors_are_openai_shaped(gateway: Gateway) -> None:
    streams = h2_exchange(
        gateway.port,
        {1: _h2_get("/v1/models#fragment"), 3: _h2_get("/v1/chat/completions")},
    )
    assert streams[1].status == 400, streams[1]
    assert "'#'" in orjson.loads(streams[1].body)["error"]["message"]
    assert streams[3].status == 405, streams[3]
    assert streams[3].headers is not None and streams[3].headers["allow"] == "POST"
    assert orjson.loads(streams[3].body)["error"]["code"] == "405"


def test_nesting_is_measured_without_recursion() -> None:
    from llmux_extproc.dataplane.gateway import _nesting

    assert _nesting(orjson.loads(b'{"a": 1, "b": "x"}')) == 1
    assert _nesting(orjson.loads(b'{"a": [1, {"b": [[]]}], "c": {}}')) == 5
    assert _nesting(orjson.loads(b"[" * 1024 + b"]" * 1024)) == 1024
    assert _nesting("text") == 0


def test_protocol_mappers_compare_the_status_before_any_cel() -> None:
    """Every local reply (the mock's 200s, the processor's errors) passes these mappers:
    each must fail on an integer comparison before it evaluates an expression, and none
    may claim the processor's own replies (details `llmux`)."""
    from llmux_extproc.control import envoy_config

    mappers = envoy_config._protocol_error_mappers()
    assert len(mappers) == len(envoy_config.PROTOCOL_ERRORS) + len(envoy_config._PROTOCOL_STATUSES)
    assert "llmux" not in envoy_config.PROTOCOL_ERRORS
    for mapper in mappers:
        first, second = mapper["filter"]["and_filter"]["filters"]
        assert "status_code_filter" in first
        expression = second["extension_filter"]["typed_config"]["expression"]
        assert "'llmux'" in expression or "code_details ==" in expression
