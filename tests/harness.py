"""Real processes for end-to-end tests: `llmux run` (Envoy + ext_proc) and mock upstreams.

Mock upstreams are aiohttp servers on loopback, each in its own thread, that record every
request they receive (method, path, headers, body) so tests can check what a provider
would have seen, and answer with whatever the test scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from aiohttp import web

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_delta(before: str, after: str, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class MockUpstream:
    """An HTTP server in a background thread; `handler` decides each answer."""

    handler: Handler
    port: int = field(default_factory=free_port)
    requests: list[Recorded] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                request.query_string,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        return await self.handler(request, body)

    def start(self) -> MockUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._dispatch)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("mock upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def last(self) -> Recorded:
        assert self.requests, "the upstream received no request"
        return self.requests[-1]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def openai_chat_completion(
    model: str, content: str, prompt_tokens: int = 11, completion_tokens: int = 7
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


@dataclass
class Gateway:
    """A running `llmux run`, with the ports and files a test needs."""

    config_path: Path
    port: int
    admin_port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    settings: dict[str, Any]  # the `llmux:` section the gateway started with

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return str(self.log_path.read_text(errors="replace"))

    def metrics(self) -> str:
        # The metrics address, not the listener: there /metrics needs the master key.
        return httpx.get(f"http://{self.settings['metrics']}/metrics", timeout=5).text

    def metrics_when(self, ready: Callable[[str], bool], timeout: float = 5) -> str:
        """/metrics once `ready` holds: answers Envoy passes on by itself are accounted when
        its batched access log entries arrive, a moment after the client has its answer."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.metrics()
            if ready(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def metrics_changed(self, before: str, name: str, **labels: str) -> str:
        """/metrics once the samples of `name` with `labels` differ from `before`."""
        return self.metrics_when(
            lambda m: metric(m, name, **labels) != metric(before, name, **labels)
        )

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the config file; a dict keeps the listen/admin/metrics settings in use."""
        if isinstance(config, dict):
            config = {**config, "llmux": {**self.settings, **(config.get("llmux") or {})}}
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        # Same size and same second would look unchanged to an mtime/size watcher.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)
        now = time.time()
        os.utime(self.config_path, (now + 1, now + 1))

    def wait_for_log(self, needle: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in gateway log:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def with_llmux_settings(config: dict[str, Any], tmp: Path) -> tuple[dict[str, Any], int, int, int]:
    port, admin, metrics = free_port(), free_port(), free_port()
    settings = dict(config.get("llmux") or {})
    settings.setdefault("listen", f"127.0.0.1:{port}")
    settings.setdefault("admin", f"127.0.0.1:{admin}")
    settings.setdefault("metrics", f"127.0.0.1:{metrics}")
    settings.setdefault("runtime_dir", str(tmp / "run"))
    settings.setdefault("reload_poll_interval", 0.2)
    return {**config, "llmux": settings}, port, admin, metrics


def start_gateway(config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> Gateway:
    full, port, admin, metrics = with_llmux_settings(config, tmp)
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(full))
    log_path = tmp / "llmux.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmux_extproc", "run", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    gw = Gateway(config_path, port, admin, metrics, proc, log_path, full["llmux"])
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llmux run exited with {proc.returncode}:\n{gw.log()}")
        with contextlib.suppress(httpx.HTTPError):
            # Envoy answers before `llmux run` has finished starting (and would treat a
            # child dying then as a failed start): wait for both.
            if (
                httpx.get(f"{gw.base_url}/health/readiness", timeout=1).status_code == 200
                and "LLMux ready" in gw.log()
            ):
                return gw
        if time.monotonic() > deadline:
            gw.stop()
            raise RuntimeError(f"llmux run not ready in 30s:\n{gw.log()}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_gateway(
    config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None
) -> Iterator[Gateway]:
    gw = start_gateway(config, tmp, env)
    try:
        yield gw
    finally:
        gw.stop()


# -- processes of a running gateway (resilience tests) -----------------------------------


def child_processes(pid: int) -> dict[int, str]:
    """The direct children of `pid` (Linux /proc), pid -> command line."""
    out: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as c:
                        out[int(child)] = c.read().replace(b"\0", b" ").decode()
    return out


def worker_pid(gw: Gateway, index: int) -> int | None:
    """The pid of the ext_proc worker on socket `index`, if one is running."""
    sock = f"extproc-{index}.sock"
    for pid, cmd in child_processes(gw.process.pid).items():
        if " extproc " in cmd and cmd.split("--listen ", 1)[1].split()[0].endswith(sock):
            return pid
    return None


def envoy_pid(gw: Gateway) -> int | None:
    for pid, cmd in child_processes(gw.process.pid).items():
        if "envoy" in cmd.split()[0]:
            return pid
    return None


def worker_socket(gw: Gateway, index: int) -> Path:
    return Path(gw.settings["runtime_dir"]) / f"extproc-{index}.sock"


def grpc_serving(socket_path: Path, timeout: float = 0.5) -> bool:
    """Whether the gRPC server on `socket_path` answers grpc.health.v1 Check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def admin_text(gw: Gateway, path: str) -> str:
    return httpx.get(f"http://127.0.0.1:{gw.admin_port}{path}", timeout=5).text


def extproc_health(gw: Gateway) -> list[str]:
    """Envoy's health flags of each ext_proc worker endpoint, in socket order."""
    flags: dict[str, str] = {}
    for line in admin_text(gw, "/clusters").splitlines():
        if line.startswith("llmux_extproc::") and "::health_flags::" in line:
            flags[line.split("::")[1]] = line.rsplit("::", 1)[1]
    return [flags[k] for k in sorted(flags)]
