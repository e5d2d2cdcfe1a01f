"""The `llmux` command: validation, Envoy config output, process supervision."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

LLMUX = [sys.executable, "-m", "llmux_extproc"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LLMUX, *args], capture_output=True, text=True, timeout=60)


def test_check_config_ok_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("model_list: [{model_name: m, litellm_params: {model: mock/x}}]\n")
    result = run("check-config", str(good))
    assert result.returncode == 0 and "ok: 1 deployments" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_list: [{model_name: m, litellm_params: {model: mock}}]\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    assert "model_list[0].litellm_params.model" in result.stderr
    assert "Traceback" not in result.stderr


def test_envoy_config_prints_yaml() -> None:
    result = run("envoy-config")
    assert result.returncode == 0
    assert "envoy.filters.http.ext_proc" in result.stdout
    assert "static_resources:" in result.stdout


@pytest.mark.e2e
def test_run_refuses_a_broken_config_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("general_settings: {master_key: os.environ/NOT_SET_ANYWHERE}\n")
    result = run("run", "--config", str(config))
    assert result.returncode == 2
    assert "NOT_SET_ANYWHERE" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_make_run_default_config_answers_offline() -> None:
    """What `make run` does: the embedded config, the mock model, counted in /metrics."""
    for port in (4000, 9901, 9464):
        if port_in_use(port):
            pytest.fail(f"port {port} is in use; the default config listens there")
    proc = subprocess.Popen([*LLMUX, "run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (
                    httpx.get("http://127.0.0.1:4000/health/readiness", timeout=1).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url="http://127.0.0.1:4000/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="llmux-mock", messages=[{"role": "user", "content": "hello"}]
        )
        assert completion.choices[0].message.content
        metrics = httpx.get("http://127.0.0.1:4000/metrics").text
        assert (
            'llm_requests_total{model="llmux-mock",provider="mock",status_code="200"} 1.0'
            in metrics
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
