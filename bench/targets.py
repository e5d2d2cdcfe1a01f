"""The systems under test and the mock upstreams, as processes the runner starts and stops.

Every target serves the same five kinds of request; `Target.request(kind)` gives the path
and body a client sends it. Gateways (LLMux, LiteLLM) get OpenAI-shaped requests naming a
model alias; bare Envoy gets what the provider itself would receive. The failover scenario
(FAILOVER) has targets of its own: LLMux serving one model group of two deployments, one
of which always answers 500 (`LLMuxFailover`), and bare Envoy retrying the same way.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench import mock_upstream
from bench.loadgen import build_request
from bench.procstats import Proc, cmdline, descendants
from llmux_extproc.control.envoy_binary import find_envoy

KINDS = ("openai", "anthropic", "openai_stream", "anthropic_stream")
HOLD = "hold"
# Non-streaming OpenAI requests to a group whose other deployment always answers 500.
FAILOVER = "failover"
ALL_KINDS = (*KINDS, FAILOVER)
KIND_LABELS = {
    "openai": "non-streaming, OpenAI provider",
    "anthropic": "non-streaming, translated (Anthropic)",
    "openai_stream": "streaming passthrough (OpenAI)",
    "anthropic_stream": "streaming translated (Anthropic)",
    HOLD: "held open streams",
    FAILOVER: "non-streaming, failover (1 of 2 deployments answers 500)",
}
ALIASES = {
    "openai": "bench-openai",
    "anthropic": "bench-anthropic",
    "openai_stream": "bench-openai-stream",
    "anthropic_stream": "bench-anthropic-stream",
    HOLD: "bench-hold",
    FAILOVER: "bench-failover",
}
STREAMING = {"openai_stream", "anthropic_stream", HOLD}
PROMPT = "Write one short sentence about load testing."
ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-bench-master-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openai_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": PROMPT},
        ],
        "max_tokens": 64,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def anthropic_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": mock_upstream.MODEL_ANTHROPIC,
        "max_tokens": 64,
        "system": "You are a terse assistant.",
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def post(
    port: int, path: str, body: bytes, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until_200(
    proc: subprocess.Popen[bytes],
    port: int,
    path: str,
    body: bytes,
    timeout: float,
    what: str,
    headers: dict[str, str] | None = None,
    status: int = 200,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if post(port, path, body, timeout=2, headers=headers)[0] == status:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no {status} within {timeout:.0f}s")
        time.sleep(0.005)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Upstreams:
    """The Envoy mock provider and the hold server, shared by every target of a run."""

    workdir: Path
    ports: dict[str, int] = field(
        default_factory=lambda: {kind: free_port() for kind in mock_upstream.ANSWERS}
    )
    admin_port: int = field(default_factory=free_port)
    hold_port: int = field(default_factory=free_port)
    failing_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def all_ports(self) -> dict[str, int]:
        return {**self.ports, HOLD: self.hold_port}

    def start(self) -> None:
        cfg = self.workdir / "mock-envoy.json"
        config = mock_upstream.mock_config(self.ports, self.admin_port, self.failing_port)
        cfg.write_bytes(orjson.dumps(config))
        log = (self.workdir / "mock-envoy.log").open("wb")
        envoy = subprocess.Popen(
            [find_envoy(), "-c", str(cfg), "--disable-hot-restart", "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(envoy)
        hold_log = (self.workdir / "hold-server.log").open("wb")
        hold = subprocess.Popen(
            [sys.executable, "-m", "bench.hold_server", "--port", str(self.hold_port)],
            stdout=hold_log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.procs.append(hold)
        for port in self.ports.values():
            wait_until_200(envoy, port, "/v1/chat/completions", b"{}", 20, "mock upstream Envoy")
        wait_until_200(
            envoy,
            self.failing_port,
            "/v1/chat/completions",
            b"{}",
            20,
            "mock upstream Envoy (failing listener)",
            status=mock_upstream.FAILING_STATUS,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.hold_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or hold.poll() is not None:
                    raise RuntimeError("hold server did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()

    def failing_attempts(self) -> int:
        """Requests the failing deployment has received so far (the mock's admin stats)."""
        stat = f"http.{mock_upstream.FAILING}.downstream_rq_total"
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", f"/stats?filter=^{stat}$")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == stat:
                return int(value)
        return 0

    def failover_model_list(self) -> list[dict[str, Any]]:
        """The failover group: two OpenAI deployments, the first on the failing listener
        (every call a 500 with an OpenAI error body), the second answering normally."""
        params = {"model": f"openai/{mock_upstream.MODEL_OPENAI}", "api_key": "sk-bench"}
        return [
            {
                "model_name": ALIASES[FAILOVER],
                "litellm_params": {**params, "api_base": f"http://127.0.0.1:{port}/v1"},
            }
            for port in (self.failing_port, self.ports["openai"])
        ]

    def model_list(self) -> list[dict[str, Any]]:
        """LiteLLM-style deployments for every kind, pointed at the mocks."""
        base = {k: f"http://127.0.0.1:{p}" for k, p in self.all_ports.items()}
        openai = {"model": f"openai/{mock_upstream.MODEL_OPENAI}", "api_key": "sk-bench"}
        anthropic = {
            "model": f"anthropic/{mock_upstream.MODEL_ANTHROPIC}",
            "api_key": "sk-ant-bench",
        }
        params = {
            "openai": {**openai, "api_base": base["openai"] + "/v1"},
            "openai_stream": {**openai, "api_base": base["openai_stream"] + "/v1"},
            "anthropic": {**anthropic, "api_base": base["anthropic"]},
            "anthropic_stream": {**anthropic, "api_base": base["anthropic_stream"]},
            HOLD: {**openai, "api_base": base[HOLD] + "/v1"},
        }
        return [{"model_name": ALIASES[k], "litellm_params": p} for k, p in params.items()]


class Target:
    """A system under test: started fresh for each repetition, so cold start and peak RSS
    are measured per repetition too."""

    name = "target"
    label = "target"
    gateway = True  # OpenAI-shaped requests with model aliases
    kinds: tuple[str, ...] = KINDS  # what it is measured on; the first one at start-up
    # For a scenario target: the (target, kind) its figures are compared with besides bare
    # Envoy, e.g. the failover group against the same LLMux's healthy group.
    baseline: tuple[str, str] | None = None

    def __init__(self, upstreams: Upstreams, workdir: Path) -> None:
        self.upstreams = upstreams
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.processes: list[Proc] = []
        self.cwd = ROOT  # another checkout's, for bench.ab

    # -- what to send --------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        """Gateways run with a master key, as in production; clients send it."""
        return {"Authorization": f"Bearer {MASTER_KEY}"} if self.gateway else {}

    def raw_request(self, kind: str) -> bytes:
        path, body = self.request(kind)
        return build_request(path, body, headers=self.headers)

    def request(self, kind: str) -> tuple[str, bytes]:
        stream = kind in STREAMING
        if self.gateway:
            return "/v1/chat/completions", openai_body(ALIASES[kind], stream)
        if kind == HOLD:
            return "/hold/v1/chat/completions", openai_body(mock_upstream.MODEL_OPENAI, True)
        if kind == FAILOVER:
            return "/failover/v1/chat/completions", openai_body(mock_upstream.MODEL_OPENAI, False)
        prefix = "/stream" if stream else ""
        if kind.startswith("anthropic"):
            return f"{prefix}/v1/messages", anthropic_body(stream)
        return f"{prefix}/v1/chat/completions", openai_body(mock_upstream.MODEL_OPENAI, stream)

    # -- lifecycle -----------------------------------------------------------------

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> float:
        """Start the target; seconds from spawn until the first 200 on a chat completion."""
        cmd, env = self.command()
        log = (self.workdir / f"{self.name}.log").open("ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=self.cwd
        )
        path, body = self.request(self.kinds[0])
        wait_until_200(self.proc, self.port, path, body, timeout, self.label, self.headers)
        cold = time.perf_counter() - started
        self.processes = self.discover()
        return cold

    def discover(self) -> list[Proc]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class BareEnvoy(Target):
    name = "bare"
    label = "bare Envoy"
    gateway = False
    kinds = ALL_KINDS

    def command(self) -> tuple[list[str], dict[str, str]]:
        admin = free_port()
        up = self.upstreams
        failover = (up.failing_port, up.ports["openai"])
        config = mock_upstream.bare_proxy_config(self.port, admin, up.all_ports, failover)
        path = self.workdir / "bare-envoy.json"
        path.write_bytes(orjson.dumps(config))
        cmd = [find_envoy(), "-c", str(path), "--disable-hot-restart", "--log-level", "warning"]
        return cmd, {}

    def discover(self) -> list[Proc]:
        assert self.proc is not None
        return [Proc(self.proc.pid, "envoy")]


class LLMux(Target):
    label = "LLMux"

    def __init__(
        self, upstreams: Upstreams, workdir: Path, workers: int, access_log: str = "off"
    ) -> None:
        super().__init__(upstreams, workdir)
        self.workers = workers
        self.access_log = access_log
        self.name = f"llmux-w{workers}"
        self.label = f"LLMux workers={workers}"

    def config(self) -> dict[str, Any]:
        runtime = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.workdir))
        return {
            "model_list": self.upstreams.model_list(),
            "general_settings": {"master_key": MASTER_KEY},
            "llmux": {
                "listen": f"127.0.0.1:{self.port}",
                "admin": f"127.0.0.1:{free_port()}",
                "metrics": f"127.0.0.1:{free_port()}",
                "workers": self.workers,
                "runtime_dir": str(runtime),
                "access_log": self.access_log,
            },
        }

    def command(self) -> tuple[list[str], dict[str, str]]:
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        llmux = Path(sys.executable).parent / "llmux"
        exe = [str(llmux)] if llmux.exists() else [sys.executable, "-m", "llmux_extproc"]
        return [*exe, "run", "--config", str(path)], {}

    def discover(self) -> list[Proc]:
        assert self.proc is not None
        procs = [Proc(self.proc.pid, "supervisor")]
        for pid in descendants(self.proc.pid):
            args = cmdline(pid)
            if args and Path(args[0]).name == "envoy":
                procs.append(Proc(pid, "envoy"))
            elif "extproc" in args:
                procs.append(Proc(pid, "extproc"))
            else:
                procs.append(Proc(pid, "other"))
        return procs


class LLMuxFailover(LLMux):
    """LLMux serving only the failover group (one deployment always answers 500), with
    `router_settings.num_retries: 1`: every request that meets the failing deployment is
    retried on the other.

    `health=False` is the worst case: `disable_cooldowns: true`, and LLMux's own circuit
    breaker (the seed's rule, which runs alongside LiteLLM's cooldowns and which
    `disable_cooldowns` leaves on) never opens (`failure_rate: 1.0`: it opens only above
    that share of failures), so the load balancer keeps sending the failing deployment its
    share. `health=True` keeps the defaults (LiteLLM's cooldown rule, 5 s; the breaker),
    which take the failing deployment out of the rotation."""

    kinds = (FAILOVER,)

    def __init__(
        self,
        upstreams: Upstreams,
        workdir: Path,
        workers: int,
        health: bool,
        access_log: str = "off",
    ) -> None:
        super().__init__(upstreams, workdir, workers, access_log)
        self.health = health
        self.name = f"failover-w{workers}-{'defaults' if health else 'no-cooldowns'}"
        self.label = (
            "LLMux failover, cooldowns on"
            if health
            else "LLMux failover, cooldowns and breaker off"
        )
        self.baseline = (f"llmux-w{workers}", "openai")

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["model_list"] = self.upstreams.failover_model_list()
        config["router_settings"] = {"num_retries": 1}
        if not self.health:
            config["router_settings"]["disable_cooldowns"] = True
            config["llmux"]["circuit_breaker"] = {"failure_rate": 1.0}
        return config


# The machine's PostgreSQL and Redis (docs/benchmarks.md): the virtual-key scenarios.
BENCH_PG = os.environ.get("LLMUX_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
BENCH_REDIS = os.environ.get("LLMUX_BENCH_REDIS", "redis://127.0.0.1:6379/0")
BENCH_DATABASE = "llmux_bench"
# Limits no run reaches: every request pays the whole admission (each bucket and the
# budget reserved, then settled) and none is refused.
KEY_LIMITS = {
    "rpm_limit": 10**9,
    "tpm_limit": 10**12,
    "max_parallel_requests": 10**6,
    "max_budget": 10.0**9,
}


def fresh_bench_database() -> str:
    """An empty `llmux_bench` database on BENCH_PG (dropped first: each start migrates
    and issues its key afresh); its URL."""
    import psycopg

    try:
        with psycopg.connect(f"{BENCH_PG}/postgres", autocommit=True, connect_timeout=3) as pg:
            pg.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)')
            pg.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"PostgreSQL is not reachable at {BENCH_PG} ({exc}); the virtual-key scenarios "
            "need it (set LLMUX_BENCH_PG, or skip them with --no-keys)"
        ) from exc
    return f"{BENCH_PG}/{BENCH_DATABASE}"


def _check_redis() -> None:
    """Redis down, LLMux would fail open to local buckets (its documented policy) and the
    scenario would measure the wrong thing: refuse to start instead."""
    import redis

    try:
        redis.Redis.from_url(BENCH_REDIS, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise RuntimeError(
            f"Redis is not reachable at {BENCH_REDIS} ({exc}); the Redis scenario needs it "
            "(set LLMUX_BENCH_REDIS, or skip the virtual-key scenarios with --no-keys)"
        ) from exc


class LLMuxKeys(LLMux):
    """LLMux with a database of virtual keys, the client holding a key with an rpm, tpm,
    max-parallel and dollar budget limit (none reached): authentication from the worker's
    key cache, admission and settlement on every request, spend logs written in batches;
    the limits' state per replica (`redis=False`: with one worker, its dicts) or in Redis
    (one round trip per admission)."""

    kinds = ("openai", "openai_stream")

    def __init__(
        self,
        upstreams: Upstreams,
        workdir: Path,
        workers: int,
        redis: bool,
        access_log: str = "off",
    ) -> None:
        super().__init__(upstreams, workdir, workers, access_log)
        self.redis = redis
        where = "redis" if redis else "local"
        self.name = f"keys-w{workers}-{where}"
        self.label = f"LLMux virtual key, limits {'in Redis' if redis else 'local'}"
        self.baseline = (f"llmux-w{workers}", "openai")
        self.key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key or MASTER_KEY}"}

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["general_settings"]["database_url"] = fresh_bench_database()
        if self.redis:
            _check_redis()
            config["router_settings"] = {"redis_url": BENCH_REDIS}
        return config

    def start(self, timeout: float = 60) -> float:
        self.key = None  # the master key until this start's database has issued one
        cold = super().start(timeout)
        status, body = post(
            self.port,
            "/key/generate",
            orjson.dumps({**KEY_LIMITS, "key_alias": f"bench-{self.name}"}),
            timeout=10,
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        )
        if status != 200:
            raise RuntimeError(f"{self.label}: /key/generate answered {status}: {body[:300]!r}")
        self.key = str(orjson.loads(body)["key"])
        path, request = self.request(self.kinds[0])
        assert self.proc is not None
        wait_until_200(self.proc, self.port, path, request, 10, self.label, self.headers)
        return cold


LITELLM_VENV = ROOT / "bench" / ".litellm-venv"


def ensure_litellm(install: bool) -> Path | None:
    """bench/.litellm-venv with `litellm[proxy]`; created on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists() or not install:
        return exe if exe.exists() else None
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = str(LITELLM_VENV / "bin" / "pip")
    subprocess.run([pip, "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([pip, "install", "--quiet", "litellm[proxy]"], check=True)
    return exe if exe.exists() else None


def litellm_version() -> str:
    out = subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m;print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


class LiteLLM(Target):
    name = "litellm"
    label = "LiteLLM proxy"

    def __init__(self, upstreams: Upstreams, workdir: Path, workers: int) -> None:
        super().__init__(upstreams, workdir)
        self.workers = workers
        self.label = f"LiteLLM workers={workers}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        config = {
            "model_list": self.upstreams.model_list(),
            # Production settings from LiteLLM's docs, minus the database (none here).
            "litellm_settings": {"set_verbose": False, "request_timeout": 600},
            "general_settings": {
                "master_key": MASTER_KEY,
                "disable_spend_logs": True,
                "disable_error_logs": True,
            },
        }
        path = self.workdir / "litellm.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        exe = LITELLM_VENV / "bin" / "litellm"
        cmd = [
            str(exe),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num_workers",
            str(self.workers),
        ]
        env = {"LITELLM_LOG": "ERROR", "PYTHONUNBUFFERED": "1"}
        return cmd, env

    def start(self, timeout: float = 180) -> float:
        return super().start(timeout)

    def discover(self) -> list[Proc]:
        assert self.proc is not None
        procs = [Proc(self.proc.pid, "litellm")]
        procs += [Proc(pid, "litellm") for pid in descendants(self.proc.pid)]
        return procs
