"""Hot reload applies exactly what `llmux run` validated, setting by setting, against real
Envoy and workers: what the workers load is the validated snapshot (not whatever the file
holds when the signal arrives), each reloadable setting changes what a client gets, the
others are refused by name, and an update Envoy itself rejects (its NACK) is a failed
reload that leaves the previous config serving, in Envoy's files too."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from tests.harness import (
    Gateway,
    MockUpstream,
    envoy_pid,
    json_response,
    metric,
    openai_chat_completion,
    running_gateway,
    worker_pid,
)

pytestmark = pytest.mark.e2e

# The supervisor's own line (the workers log theirs as llmux.worker).
SUPERVISOR_RELOADED = re.compile(
    r'"logger":"llmux\.supervisor","pid":\d+,"message":"config reloaded'
)
WORKER_RELOADED = re.compile(r'"logger":"llmux\.worker","pid":\d+,"message":"config reloaded')


async def slow_openai(request: web.Request, body: bytes) -> web.StreamResponse:
    """OpenAI's wire format; `sleep:S` as the last message waits S seconds (a whole answer:
    before answering; a stream: between its first and second chunk)."""
    data = json.loads(body)
    text = data["messages"][-1]["content"]
    delay = float(text.split(":")[1]) if text.startswith("sleep:") else 0.0
    if not data.get("stream"):
        await asyncio.sleep(delay)
        return json_response(openai_chat_completion("gpt-upstream", "done"))
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-upstream",
        "choices": [{"index": 0, "delta": {"content": "part"}, "finish_reason": None}],
    }
    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await asyncio.sleep(delay)
    await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
    return resp


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    up = MockUpstream(slow_openai).start()
    yield up
    up.stop()


def model(upstream: MockUpstream, key: str = "key-a", **params: Any) -> dict[str, Any]:
    return {
        "model_name": "gpt",
        "litellm_params": {
            "model": "openai/gpt-4o",
            "api_base": f"{upstream.base_url}/v1",
            "api_key": key,
            **params,
        },
        "model_info": {"id": "gpt-dep"},
    }


def chat(gw: Gateway, content: str = "hi", *, stream: bool = False, pad: int = 0) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "gpt",
        "messages": [{"role": "user", "content": content + "x" * pad}],
    }
    if stream:
        body["stream"] = True
    return httpx.post(f"{gw.openai_base}/chat/completions", json=body, timeout=30)


def stream_outcome(gw: Gateway, content: str) -> str:
    """'complete' when the stream reached [DONE], else how it ended."""
    try:
        text = chat(gw, content, stream=True).text
    except httpx.HTTPError as exc:
        return f"cut ({type(exc).__name__})"
    return "complete" if "data: [DONE]" in text else f"cut ({text[-80:]!r})"


def reload(gw: Gateway, config: dict[str, Any] | str) -> None:
    """Write the config and wait until the supervisor and every worker applied it."""
    workers = int(gw.settings.get("workers", 1))
    start = len(gw.log())
    gw.write_config(config)
    deadline = time.monotonic() + 20
    while True:
        log = gw.log()[start:]
        if SUPERVISOR_RELOADED.search(log) and len(WORKER_RELOADED.findall(log)) >= workers:
            return
        if "config reload rejected" in log or "config reload failed" in log:
            raise AssertionError(f"reload refused:\n{log[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"reload not applied in 20 s:\n{log[-3000:]}")
        time.sleep(0.05)


def refused(gw: Gateway, config: dict[str, Any] | str, needle: str) -> str:
    """Write the config and wait for the supervisor's refusal; its log line."""
    start = len(gw.log())
    gw.write_config(config)
    deadline = time.monotonic() + 30
    while True:
        fresh = gw.log()[start:]
        for line in fresh.splitlines():
            if "config reload rejected" in line or "config reload failed" in line:
                assert needle in line, line
                assert not SUPERVISOR_RELOADED.search(fresh), fresh
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no refusal in 30 s:\n{fresh[-3000:]}")
        time.sleep(0.05)


# -- workers load the validated config, never the file as it is when the signal arrives ---------


def test_workers_load_only_what_the_supervisor_validated(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = {"model_list": [model(upstream, "key-a")], "llmux": {"workers": 2}}
    with running_gateway(config, tmp_path) as gw:
        assert chat(gw).status_code == 200
        assert upstream.last().headers["authorization"] == "Bearer key-a"

        # An edit the supervisor refuses (workers needs a restart) that also changes the key.
        rejected = {"model_list": [model(upstream, "key-b")], "llmux": {"workers": 3}}
        line = refused(gw, rejected, "llmux.workers")
        assert "needs a restart" in line
        # A SIGHUP reaching the workers now (as when a second edit lands while the
        # supervisor is still applying the first) must not load the file's refused content.
        seen = len(WORKER_RELOADED.findall(gw.log()))
        for i in range(2):
            pid = worker_pid(gw, i)
            assert pid is not None
            os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(WORKER_RELOADED.findall(gw.log())) < seen + 2:
            assert time.monotonic() < deadline, gw.log()[-2000:]
            time.sleep(0.05)
        for _ in range(6):  # both workers answer some of these
            assert chat(gw).status_code == 200
            assert upstream.last().headers["authorization"] == "Bearer key-a"

        # A worker restarted after the refused edit starts from the validated config too.
        pid = worker_pid(gw, 0)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        gw.wait_for_log("ext_proc worker 0 restarted")
        deadline = time.monotonic() + 10
        while worker_pid(gw, 0) in (None, pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # Envoy's health check takes the restarted worker back
        for _ in range(6):
            assert chat(gw).status_code == 200
            assert upstream.last().headers["authorization"] == "Bearer key-a"

        # And a good edit still applies everywhere.
        reload(gw, {"model_list": [model(upstream, "key-c")], "llmux": {"workers": 2}})
        for _ in range(6):
            assert chat(gw).status_code == 200
            assert upstream.last().headers["authorization"] == "Bearer key-c"
        snapshot = Path(gw.settings["runtime_dir"]) / "config.yaml"
        assert snapshot.stat().st_mode & 0o077 == 0  # it may hold keys


# -- every reloadable setting changes what clients get -------------------------------------------


def test_each_setting_takes_effect_on_reload(upstream: MockUpstream, tmp_path: Path) -> None:
    llmux = {
        "request_timeout": 2,
        "stream_idle_timeout": 2,
        # Envoy's listener buffer starts at 100 kB (the larger of the two limits).
        "max_request_body_bytes": 100_000,
        "max_response_body_bytes": 100_000,
    }
    prices = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}

    def config(dep: dict[str, Any], **settings: Any) -> dict[str, Any]:
        return {"model_list": [dep], "llmux": {**llmux, **settings}}

    dep = model(upstream, "key-a", **prices)
    with running_gateway(config(dep), tmp_path) as gw:
        # Before: each limit bites.
        resp = chat(gw, "sleep:3")
        assert resp.status_code == 504, resp.text
        assert stream_outcome(gw, "sleep:3").startswith("cut")
        assert chat(gw, pad=150_000).status_code == 413

        # request_timeout 2 -> 6: a whole answer taking 3 s now arrives.
        reload(gw, config(dep, request_timeout=6))
        resp = chat(gw, "sleep:3")
        assert resp.status_code == 200, resp.text
        assert stream_outcome(gw, "sleep:3").startswith("cut")  # stream_idle_timeout: still 2

        # stream_idle_timeout 2 -> 6: a stream pausing 3 s now completes.
        reload(gw, config(dep, request_timeout=6, stream_idle_timeout=6))
        assert stream_outcome(gw, "sleep:3") == "complete"

        # max_request_body_bytes 100 kB -> 400 kB: above the listener's buffer at start.
        big = {"request_timeout": 6, "stream_idle_timeout": 6, "max_request_body_bytes": 400_000}
        reload(gw, config(dep, **big))
        resp = chat(gw, pad=150_000)
        assert resp.status_code == 200, resp.text
        assert len(upstream.last().body) > 150_000
        assert chat(gw, pad=450_000).status_code == 413

        # ... and back down to 50 kB.
        reload(gw, config(dep, **{**big, "max_request_body_bytes": 50_000}))
        resp = chat(gw, pad=60_000)
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "413"

        # A deployment's timeout: 1 s per attempt.
        reload(gw, config(model(upstream, "key-a", timeout=1, **prices), **big))
        resp = chat(gw, "sleep:2")
        assert resp.status_code == 504, resp.text

        # Its key and its prices.
        before = chat(gw)
        assert float(before.headers["x-llmux-response-cost"]) == pytest.approx(0.025)
        new_prices = {"input_cost_per_token": 0.01, "output_cost_per_token": 0.002}
        reload(gw, config(model(upstream, "key-b", **new_prices), **big))
        after = chat(gw)
        assert after.status_code == 200
        assert upstream.last().headers["authorization"] == "Bearer key-b"
        assert float(after.headers["x-llmux-response-cost"]) == pytest.approx(0.124)

        metrics = gw.metrics()
        assert metric(metrics, "llmux_config_reloads_total", result="error") == 0


def test_settings_needing_a_restart_are_refused_by_name(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = {"model_list": [model(upstream)]}
    with running_gateway(config, tmp_path) as gw:
        for key, value in (
            ("access_log", str(tmp_path / "access.log")),
            ("max_response_body_bytes", 1_000_000),
            ("drain_timeout", 5),
            ("workers", 2),
        ):
            line = refused(gw, {**config, "llmux": {key: value}}, f"llmux.{key}")
            assert "needs a restart" in line
            assert chat(gw).status_code == 200
        errors = metric(gw.metrics(), "llmux_config_reloads_total", result="error")
        assert errors == 4


# -- what Envoy rejects ----------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmux_extproc", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_catches_what_envoy_would_reject(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    bad_ip = {"model_list": [model(upstream, api_base="http://10.0.0.256:8000/v1")]}
    path = tmp_path / "bad-ip.yaml"
    path.write_text(yaml.safe_dump(bad_ip))
    done = check_config(path)
    assert done.returncode == 2
    assert "litellm_params.api_base" in done.stderr and "10.0.0.256" in done.stderr

    # Beyond protobuf's Duration range: LLMux's parser takes it, Envoy does not.
    too_long = {"model_list": [model(upstream, timeout=1.0e12)]}
    path = tmp_path / "too-long.yaml"
    path.write_text(yaml.safe_dump(too_long))
    done = check_config(path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Envoy rejects it" in done.stderr and "duration out of range" in done.stderr

    path.write_text(yaml.safe_dump({"model_list": [model(upstream)]}))
    done = check_config(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 1 deployments")


def test_envoy_nack_is_a_failed_reload_and_the_old_config_keeps_serving(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = {"model_list": [model(upstream)]}
    with running_gateway(config, tmp_path) as gw:
        run = Path(gw.settings["runtime_dir"])
        # LLMux's own validation first: no Envoy involved.
        refused(
            gw,
            {"model_list": [model(upstream, api_base="http://10.0.0.256:8000/v1")]},
            "is not an IPv4 address",
        )
        assert chat(gw).status_code == 200

        # Envoy's NACK: a new model on the same upstream and a duration Envoy refuses.
        nacked = {
            "model_list": [
                model(upstream, timeout=1.0e12),
                {**model(upstream), "model_name": "other", "model_info": {"id": "other-dep"}},
            ]
        }
        line = refused(gw, nacked, "Envoy rejected the routes")
        assert "config reload failed" in line and "duration out of range" in line
        assert metric(gw.metrics(), "llmux_config_reloads_total", result="error") == 2

        # The previous config serves: the workers went back, Envoy's files are the good ones.
        resp = chat(gw)
        assert resp.status_code == 200, resp.text
        models = httpx.get(f"{gw.openai_base}/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["gpt"]
        assert "1000000000000" not in (run / "rds.json").read_text()
        assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(
            yaml.safe_dump({**config, "llmux": gw.settings})
        )
        # A restarted Envoy starts from those files and serves.
        pid = envoy_pid(gw)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        gw.wait_for_log("Envoy restarted")
        deadline = time.monotonic() + 20
        while True:
            try:
                if chat(gw).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.1)

        # A good edit afterwards applies.
        reload(gw, {"model_list": [model(upstream, "key-z")]})
        assert chat(gw).status_code == 200
        assert upstream.last().headers["authorization"] == "Bearer key-z"
