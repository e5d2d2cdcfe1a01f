"""Self-healing processes, graceful drain and health endpoints, with real Envoy and workers.

The upstream is an OpenAI-format mock (answers at once, or streams slowly), so only
`/v1/chat/completions` through Envoy and the workers is exercised.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests.harness import (
    Gateway,
    MockUpstream,
    envoy_pid,
    extproc_health,
    grpc_serving,
    json_response,
    openai_chat_completion,
    running_gateway,
    worker_pid,
    worker_socket,
)

pytestmark = pytest.mark.e2e

STREAM_CHUNKS = 16
STREAM_DELAY_S = 0.5  # 16 chunks, half a second apart: an 8-second stream


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-slow",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def openai_upstream(request: web.Request, body: bytes) -> web.StreamResponse:
    """Whole answers at once; streams of STREAM_CHUNKS chunks, STREAM_DELAY_S apart."""
    data = orjson.loads(body)
    if not data.get("stream"):
        return json_response(openai_chat_completion(data["model"], "ok"))
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk({"role": "assistant", "content": ""}))
    for i in range(STREAM_CHUNKS):
        await asyncio.sleep(STREAM_DELAY_S)
        await resp.write(_chunk({"content": f"c{i} "}))
    await resp.write(_chunk({}, "stop"))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    up = MockUpstream(openai_upstream).start()
    yield up
    up.stop()


def _config(upstream: MockUpstream, **settings: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "gpt",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": "k",
                },
            }
        ],
        "llmux": {"workers": 2, "access_log": "off", **settings},
    }


@pytest.fixture
def gateway(upstream: MockUpstream, tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(_config(upstream, drain_timeout=30), tmp_path) as gw:
        yield gw


def _client(gw: Gateway, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.openai_base, api_key="x", max_retries=0, timeout=timeout)


def _ask(client: openai.OpenAI) -> str | None:
    reply = client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "hi"}]
    )
    return reply.choices[0].message.content


def _wait_for(what: str, ready: Callable[[], bool], timeout: float) -> float:
    """Seconds until `ready()` holds; fails after `timeout` (generous: behaviour, not speed)."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


def _status(url: str) -> int | str:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


def _assert_openai_503(exc: openai.APIStatusError) -> None:
    assert exc.status_code == 503, (exc.status_code, exc.response.text)
    body = orjson.loads(exc.response.content)
    assert set(body["error"]) >= {"message", "type", "code"}, body


def test_health_endpoints(gateway: Gateway) -> None:
    for path in ("/health/live", "/health/liveliness", "/health/ready", "/health/readiness"):
        assert _status(gateway.base_url + path) == 200, path
    assert extproc_health(gateway) == ["healthy", "healthy"]


def test_killed_worker_is_replaced_and_only_its_requests_fail(gateway: Gateway) -> None:
    victim = worker_pid(gateway, 0)
    assert victim is not None
    results: list[tuple[float, BaseException | None]] = []
    killed_at: list[float] = []

    async def one(client: openai.AsyncOpenAI) -> None:
        sent = time.monotonic()
        try:
            await client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}]
            )
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            results.append((sent, exc))
        else:
            results.append((sent, None))

    async def load(seconds: float, rate: float) -> None:
        client = openai.AsyncOpenAI(
            base_url=gateway.openai_base, api_key="x", max_retries=0, timeout=20
        )
        tasks = []
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            tasks.append(asyncio.create_task(one(client)))
            n += 1
            if not killed_at and time.monotonic() - start > 1.5:
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.monotonic())
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        await client.close()

    back: list[float] = []

    def watch() -> None:
        # A new worker process on the same socket, answering grpc.health.v1 with SERVING.
        while not killed_at:
            time.sleep(0.005)

        def replaced() -> bool:
            pid = worker_pid(gateway, 0)
            return pid not in (None, victim) and grpc_serving(worker_socket(gateway, 0))

        back.append(_wait_for("replacement worker", replaced, 15))

    watcher = threading.Thread(target=watch)
    watcher.start()
    asyncio.run(load(seconds=4.5, rate=100))
    watcher.join()

    failures = [exc for _, exc in results if exc is not None]
    assert len(results) >= 300
    for exc in failures:
        # Never a connection error or a 500: an OpenAI-shaped 503 the client can retry.
        assert isinstance(exc, openai.APIStatusError), repr(exc)
        _assert_openai_503(exc)
    # Only what was on the dead worker (in flight, or sent to it before Envoy noticed).
    assert len(failures) <= 10, len(failures)
    late = [exc for sent, exc in results if sent > killed_at[0] + 1.0]
    assert late and all(exc is None for exc in late), late
    # The issue asks for the worker back within a second; 2 s leaves slack for a loaded
    # 2-core CI machine (Python start-up of the replacement is most of it).
    assert back[0] < 2.0, back
    assert f"ext_proc worker 0 (pid {victim}) died (killed by signal SIGKILL)" in gateway.log()
    _wait_for(
        "Envoy sees both workers healthy", lambda: extproc_health(gateway) == ["healthy"] * 2, 10
    )
    assert _ask(_client(gateway)) == "ok"


def test_sigterm_drains_open_streams_then_exits_0(gateway: Gateway) -> None:
    client = _client(gateway, timeout=60)
    started = threading.Barrier(9, timeout=20)
    outcomes: list[tuple[list[str], list[str | None]] | BaseException] = []

    def stream() -> None:
        try:
            texts: list[str] = []
            finishes: list[str | None] = []
            with client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "s"}], stream=True
            ) as chunks:
                for i, chunk in enumerate(chunks):
                    if i == 0:
                        started.wait()
                    if chunk.choices:
                        texts.append(chunk.choices[0].delta.content or "")
                        finishes.append(chunk.choices[0].finish_reason)
            outcomes.append((texts, finishes))
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()  # all eight streams are open and have their first chunk
    gateway.process.send_signal(signal.SIGTERM)
    gateway.wait_for_log("draining")
    # Readiness fails at once, new requests are turned away, liveness still holds.
    ready = _status(gateway.base_url + "/health/ready")
    assert ready in (503, "ConnectError"), ready
    assert _status(gateway.base_url + "/health/live") in (200, "ConnectError")
    try:
        _ask(_client(gateway, timeout=10))
    except openai.APIStatusError as exc:
        _assert_openai_503(exc)
    except openai.APIConnectionError:
        pass  # refused: as good as a 503
    else:
        raise AssertionError("a new request was served while draining")
    assert gateway.process.poll() is None, "llmux run stopped before its streams finished"

    for t in threads:
        t.join(60)
    assert gateway.process.wait(30) == 0, gateway.log()[-3000:]
    assert len(outcomes) == 8
    for outcome in outcomes:
        assert not isinstance(outcome, BaseException), repr(outcome)
        texts, finishes = outcome
        assert "".join(texts) == "".join(f"c{i} " for i in range(STREAM_CHUNKS))
        assert finishes[-1] == "stop"
    log = gateway.log()
    assert "drained in" in log and "cutting" not in log, log[-3000:]


def test_killed_envoy_is_restarted(gateway: Gateway) -> None:
    old = envoy_pid(gateway)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    client = _client(gateway, timeout=5)

    def serving() -> bool:
        try:
            return _ask(client) == "ok"
        except (openai.APIStatusError, openai.APIConnectionError):
            return False

    _wait_for("the gateway serving again", serving, 30)
    new = envoy_pid(gateway)
    assert new not in (None, old)
    assert f"Envoy (pid {old}) died (killed by signal SIGKILL); restarting it" in gateway.log()
    assert gateway.process.poll() is None
    _wait_for("ready again", lambda: _status(gateway.base_url + "/health/ready") == 200, 10)


def test_not_ready_while_every_worker_is_down(gateway: Gateway) -> None:
    # Workers that cannot start stay down, restarted with a growing back-off. A broken edit
    # of the config file no longer does it (workers load only the supervisor's validated
    # snapshot): the snapshot itself is broken here.
    snapshot = Path(gateway.settings["runtime_dir"]) / "config.yaml"
    good = snapshot.read_text()
    snapshot.write_text("model_list: [oops\n")
    for i in range(2):
        pid = worker_pid(gateway, i)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    _wait_for(
        "/health/ready 503",
        lambda: _status(gateway.base_url + "/health/ready") == 503,
        15,
    )
    assert _status(gateway.base_url + "/health/readiness") == 503
    assert _status(gateway.base_url + "/health/live") == 200
    with pytest.raises(openai.APIStatusError) as err:
        _ask(_client(gateway))
    _assert_openai_503(err.value)
    gateway.wait_for_log("(crash loop)")
    assert gateway.process.poll() is None

    snapshot.write_text(good)
    _wait_for("ready again", lambda: _status(gateway.base_url + "/health/ready") == 200, 30)
    assert _ask(_client(gateway)) == "ok"


def test_second_sigterm_cuts_the_drain(upstream: MockUpstream, tmp_path: Path) -> None:
    with running_gateway(_config(upstream, drain_timeout=60), tmp_path) as gw:
        client = _client(gw, timeout=60)
        got: list[BaseException | None] = []
        first = threading.Event()

        def stream() -> None:
            try:
                with client.chat.completions.create(
                    model="gpt", messages=[{"role": "user", "content": "s"}], stream=True
                ) as chunks:
                    for _ in chunks:
                        first.set()
                got.append(None)
            except BaseException as exc:
                got.append(exc)

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(20)
        gw.process.send_signal(signal.SIGTERM)
        gw.wait_for_log("draining")
        gw.process.send_signal(signal.SIGTERM)
        # Well before the stream would have ended (8 s) or drain_timeout (60 s).
        assert gw.process.wait(20) == 0
        t.join(30)
        assert "cutting 1 request(s) still in flight" in gw.log()


def test_envoy_that_cannot_restart_ends_llmux_run_with_1(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    with running_gateway(_config(upstream), tmp_path) as gw:
        # Every restart of Envoy now fails at once: a crash loop, given up on.
        (Path(gw.settings["runtime_dir"]) / "envoy.json").write_text("{not json")
        pid = envoy_pid(gw)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert gw.process.wait(60) == 1
        log = gw.log()
        assert "(crash loop)" in log
        assert "giving up: stopping LLMux" in log
        assert worker_pid(gw, 0) is None and worker_pid(gw, 1) is None
