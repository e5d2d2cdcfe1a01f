"""One ext_proc worker process: a grpc.aio server on uvloop, with config reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvloop
from envoy.service.accesslog.v3.als_pb2_grpc import add_AccessLogServiceServicer_to_server
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import (
    add_ExternalProcessorServicer_to_server,
)
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from llmux_extproc.accounting import tokens
from llmux_extproc.accounting.spendlog import SpendQueue, SpendWriter, pool_sink
from llmux_extproc.control.config import Config, ConfigError, file_stamp, load_config
from llmux_extproc.control.controlplane import TOKENS_SOCKET, TokenReporter
from llmux_extproc.dataplane.accesslog import StreamAccounting
from llmux_extproc.dataplane.extproc import Processor
from llmux_extproc.dataplane.gateway import Gateway
from llmux_extproc.observability import logs, metrics
from llmux_extproc.policy.bulkhead import Bulkhead
from llmux_extproc.policy.limits import Limiter

log = logging.getLogger("llmux.worker")


class Reloader:
    """Re-reads the config file (under `llmux run`, the snapshot of what the supervisor
    validated, on its SIGHUP); a broken file keeps the old config and says why."""

    def __init__(self, path: str | None, gateway: Gateway) -> None:
        self.path = path
        self.gateway = gateway
        self._stamp = file_stamp(path)

    def changed(self) -> bool:
        return file_stamp(self.path) != self._stamp

    def reload(self) -> bool:
        self._stamp = file_stamp(self.path)
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("error").inc()
            log.error("config reload rejected, keeping the running config: %s", exc)
            return False
        self.gateway.reload(config)
        logs.apply_levels(config.settings.log_levels)
        metrics.CONFIG_RELOADS.labels("success").inc()
        log.info("config reloaded: %d deployments", len(config.deployments))
        return True


def _needs_tokenizer(config: Config) -> bool:
    return config.settings.stream_accounting == "processor" or any(
        d.provider == "mock" for d in config.deployments
    )


def make_limiter(config: Config, runtime_dir: str | None) -> Limiter:
    """Rate limits and budgets: Redis when configured (replicas share them), in front of
    this replica's own state: its workers share a SQLite file; a worker alone keeps dicts.

    One worker (the default) has no one to share with: the file's two transactions per
    request cost it ~170 us of CPU (bench.admission_cost: 98 + 70 us; dicts 21 + 7 us) and
    ~30% of its throughput with a limited key (bench's virtual-key scenario). What the dicts
    lose is what a killed worker's restart forgets: bucket levels (full again) and the
    reservations of requests that died with it; budgets are re-read from PostgreSQL."""
    from llmux_extproc.policy.limits import LocalLimiter, MemoryState, SharedState

    state: MemoryState | SharedState = MemoryState()
    if runtime_dir is not None and config.settings.workers > 1:
        state = SharedState(Path(runtime_dir, "limits.sqlite"))
    local = LocalLimiter(state)
    if not config.redis_url:
        return local

    from llmux_extproc.policy.redis_limits import RedisLimiter, redis_client

    # Changing the Redis settings needs a restart, as database_url does.
    client = redis_client(config.redis_url)
    return RedisLimiter(client, local, os.environ.get("LLMUX_REDIS_PREFIX", "llmux:"))


def grpc_options() -> list[tuple[str, int]]:
    # No message size cap of the worker's own: its only peer is Envoy, over a socket in the
    # runtime directory, whose buffers already bound every message (bodies by the body
    # limits, access-log batches by their flush size). A cap derived from the body limits
    # is fixed when the worker starts, so a reload raising them turned every larger body
    # into a 503 (measured: "Received message larger than max (400132 vs. 265536)").
    return [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True, slots=True)
class ServerTls:
    """PEM files for the processor's gRPC listener (the mesh shape, across the network);
    with `client_ca`, only clients with a certificate it signed get through (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


async def serve(
    config_path: str | None, address: str, *, watch: bool, tls: ServerTls | None = None
) -> None:
    config = load_config(config_path)
    logs.apply_levels(config.settings.log_levels)
    gateway = Gateway(config)
    reloader = Reloader(config_path, gateway)
    if config.settings.tracing.enabled:
        from llmux_extproc.observability.tracing import WorkerTracer

        # Changing llmux.tracing needs a restart (Envoy's tracer is in its bootstrap).
        gateway.tracer = WorkerTracer(config.settings.tracing)
    gateway.refresh = lambda: reloader.changed() and reloader.reload()
    runtime_dir, worker = os.environ.get("LLMUX_RUNTIME_DIR"), os.environ.get("LLMUX_WORKER")
    if runtime_dir and worker is not None:
        gateway.bulkhead = Bulkhead(
            Path(runtime_dir, "bulkheads"), int(worker), config.settings.workers
        )
        gateway.report_tokens = TokenReporter(Path(runtime_dir, TOKENS_SOCKET))
    if config.database_url and config.master_key:
        from llmux_extproc.db.keystore import KeyStore

        # Changing database_url needs a restart (the supervisor refuses it as a reload).
        gateway.keys = KeyStore(config.database_url, config.key_cache_ttl_s)
        await gateway.keys.start()
        gateway.limiter = make_limiter(config, runtime_dir)
        gateway.loop = asyncio.get_running_loop()
        spend_writer = _spend_writer(gateway)
    else:
        spend_writer = None
    server = grpc.aio.server(options=grpc_options())
    add_ExternalProcessorServicer_to_server(Processor(gateway), server)
    add_AccessLogServiceServicer_to_server(StreamAccounting(gateway), server)
    # Envoy health-checks every worker (grpc.health.v1, empty service name) and sends ext_proc
    # streams only to those that answer SERVING.
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if tls is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, tls.credentials())
    await server.start()
    if _needs_tokenizer(config):
        # Loading takes a few hundred ms and ~100 MB: only when this config will count with
        # it on every request, and then off the event loop, before traffic needs it.
        threading.Thread(target=tokens.warm_up, name="tokens-warm-up", daemon=True).start()
    log.info("ext_proc worker %d serving on %s", os.getpid(), address)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def watch_file() -> None:
        while True:
            await asyncio.sleep(gateway.state.config.settings.reload_poll_s)
            if reloader.changed():
                reloader.reload()

    async def sample_tasks() -> None:
        # A leak of per-request tasks shows here long before it shows in memory.
        while True:
            metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
            await asyncio.sleep(1)

    background = [asyncio.create_task(sample_tasks())]
    if watch and config_path:
        background.append(asyncio.create_task(watch_file()))
    await stop.wait()
    for task in background:
        task.cancel()
    # NOT_SERVING first, so Envoy's health checks move new streams elsewhere; then let
    # in-flight exchanges finish: Envoy drains before the supervisor stops us.
    await health.enter_graceful_shutdown()
    await server.stop(grace=5)
    if spend_writer is not None:
        # Envoy is gone (the supervisor stops it first) and its last access log batch is in:
        # every answer is queued, so what is written now is everything.
        await spend_writer.close()
    if gateway.tracer is not None:
        gateway.tracer.shutdown()  # what is still batched goes out
    if gateway.keys is not None:
        await gateway.keys.close()


def _spend_writer(gateway: Gateway) -> SpendWriter:
    assert gateway.keys is not None
    gateway.spend = SpendQueue(gateway.state.config.settings.spend_log_queue)
    writer = SpendWriter(gateway.spend, pool_sink(gateway.keys.pool))
    writer.start()
    return writer


def run_worker(
    config_path: str | None, address: str, *, watch: bool, tls: ServerTls | None = None
) -> None:
    if address.startswith("unix:"):
        Path(address[5:]).unlink(missing_ok=True)  # a stale socket from a killed worker
    uvloop.run(serve(config_path, address, watch=watch, tls=tls))
