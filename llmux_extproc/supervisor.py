"""`llmux run`: the ext_proc workers and Envoy as child processes, kept in step.

Start order: workers (gRPC sockets up), then Envoy (admin ready, listener accepting).
A config edit is validated here first; a good one reaches Envoy as new clusters through
file-based CDS, then the workers (SIGHUP), then clusters no longer used are dropped, so no
request is routed to a cluster Envoy does not have yet. A bad edit is logged, counted and
ignored. If any child dies, the rest are stopped and `llmux run` exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from llmux_extproc import envoy_config
from llmux_extproc.config import Config, ConfigError, Listen, file_stamp, load_config
from llmux_extproc.envoy_binary import find_envoy
from llmux_extproc.envoy_config import RuntimePaths

log = logging.getLogger("llmux")


class StartupError(RuntimeError):
    pass


def write_atomic(path: Path, data: bytes) -> None:
    # Envoy's file watcher reacts to a rename into the watched directory: never a partial file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def admin_get(admin: Listen, path: str, timeout: float = 2.0) -> tuple[int, str]:
    conn: http.client.HTTPConnection
    if admin.path:
        conn = _UnixHTTPConnection(admin.path, timeout)
    else:
        host = "127.0.0.1" if admin.host in ("0.0.0.0", "::") else admin.host
        conn = http.client.HTTPConnection(host or "127.0.0.1", admin.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def _can_connect(listen: Listen) -> bool:
    try:
        if listen.path:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(listen.path)
        else:
            host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
            socket.create_connection((host, listen.port), timeout=1).close()
    except OSError:
        return False
    return True


class Supervisor:
    def __init__(self, config_path: str | None, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        root = config.settings.runtime_dir or tempfile.mkdtemp(prefix="llmux-")
        self.paths = RuntimePaths(Path(root))
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None
        self._cds_version = 0
        self._stamp = file_stamp(config_path)

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        s = self.config.settings
        for i in range(s.workers):
            sock = self.paths.extproc_socket(i)
            sock.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "llmux_extproc", "extproc", "--listen", f"unix:{sock}"]
            if self.config_path:
                cmd += ["--config", self.config_path]
            # gRPC's threads would each get a glibc malloc arena; two keep RSS flat.
            env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
            self.workers.append(subprocess.Popen(cmd, env=env))
        self._wait(
            lambda: all(
                _can_connect(Listen(None, None, str(self.paths.extproc_socket(i))))
                for i in range(s.workers)
            ),
            "ext_proc workers",
            15,
        )

        self.push_clusters(envoy_config.provider_clusters(self.config))
        bootstrap = envoy_config.bootstrap(self.config, self.paths)
        write_atomic(self.paths.bootstrap, orjson.dumps(bootstrap, option=orjson.OPT_INDENT_2))
        self.envoy = subprocess.Popen(
            [
                find_envoy(),
                "-c",
                str(self.paths.bootstrap),
                "--log-level",
                os.environ.get("LLMUX_ENVOY_LOG_LEVEL", "warning"),
                # Several gateways (and test runs) share a machine: no hot-restart shared memory.
                "--disable-hot-restart",
                # Access log lines reach stdout within a second, not Envoy's default 10 s.
                "--file-flush-interval-msec",
                "1000",
            ]
        )
        self._wait(lambda: self._admin_ready(), "Envoy admin", 20)
        self._wait(lambda: _can_connect(s.listen), f"Envoy listener {s.listen}", 10)

    def _admin_ready(self) -> bool:
        try:
            return admin_get(self.config.settings.admin, "/ready")[0] == 200
        except OSError:
            return False

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = self.dead_child()
            if dead:
                raise StartupError(f"{dead} exited during start-up")
            if time.monotonic() > deadline:
                raise StartupError(f"{what} not ready after {timeout:.0f}s")
            time.sleep(0.02)

    def dead_child(self) -> str | None:
        for i, proc in enumerate(self.workers):
            if proc.poll() is not None:
                return f"ext_proc worker {i} (pid {proc.pid}, exit code {proc.returncode})"
        if self.envoy is not None and self.envoy.poll() is not None:
            return f"Envoy (pid {self.envoy.pid}, exit code {self.envoy.returncode})"
        return None

    # -- reload --------------------------------------------------------------------

    def push_clusters(self, clusters: list[dict[str, Any]]) -> None:
        self._cds_version += 1
        doc = envoy_config.cds_document(clusters, str(self._cds_version))
        write_atomic(self.paths.cds, orjson.dumps(doc))

    def _envoy_has(self, names: set[str]) -> bool:
        try:
            status, text = admin_get(self.config.settings.admin, "/clusters")
        except OSError:
            return False
        present = {line.split("::", 1)[0] for line in text.splitlines()}
        return status == 200 and names <= present

    async def maybe_reload(self) -> None:
        stamp = file_stamp(self.config_path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        from llmux_extproc import metrics

        try:
            new = load_config(self.config_path)
            _check_reloadable(self.config, new)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("error").inc()
            log.error("config reload rejected, keeping the running config: %s", exc)
            return
        old_clusters = envoy_config.provider_clusters(self.config)
        new_clusters = envoy_config.provider_clusters(new)
        new_names = {c["name"] for c in new_clusters}
        union = new_clusters + [c for c in old_clusters if c["name"] not in new_names]
        self.push_clusters(union)
        deadline = time.monotonic() + 10
        # Envoy reports applied clusters only through its admin API: poll it.
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._envoy_has, new_names):
                break
            await asyncio.sleep(0.05)
        for proc in self.workers:
            proc.send_signal(signal.SIGHUP)
        self.config = new
        metrics.CONFIG_RELOADS.labels("success").inc()
        for warning in new.warnings:
            log.warning("config: %s", warning)
        log.info("config reloaded: %d deployments", len(new.deployments))
        # Requests already routed to a removed cluster finish; new ones no longer go there.
        await asyncio.sleep(2)
        if self.config is new:
            self.push_clusters(new_clusters)

    # -- run and stop --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            dead = self.dead_child()
            if dead:
                log.error("%s died; stopping LLMux", dead)
                return 1
            if self.config_path:
                await self.maybe_reload()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.settings.reload_poll_s)
        return 0

    def stop(self) -> None:
        procs = ([self.envoy] if self.envoy else []) + self.workers
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not self.config.settings.runtime_dir:
            shutil.rmtree(self.paths.root, ignore_errors=True)


def _check_reloadable(old: Config, new: Config) -> None:
    """Settings that shape processes and sockets need a restart; say so instead of half-applying."""
    for name in ("listen", "admin", "metrics", "workers", "runtime_dir"):
        if getattr(old.settings, name) != getattr(new.settings, name):
            raise ConfigError(f"llmux.{name}: changing it needs a restart of llmux run")


def run(config_path: str | None) -> int:
    config = load_config(config_path)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    sup = Supervisor(config_path, config)
    # Must precede the first import of prometheus_client in this process and the workers.
    prom_dir = sup.paths.root / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    from llmux_extproc import metrics

    m = config.settings.metrics
    if m.path:
        raise ConfigError("llmux.metrics: must be host:port")
    metrics.serve(m.host or "127.0.0.1", m.port or 9464)
    started = time.monotonic()
    try:
        sup.start()
        log.info(
            "LLMux ready on %s in %.2fs; models: %s",
            config.settings.listen,
            time.monotonic() - started,
            ", ".join(config.model_names) or "(none)",
        )
        return asyncio.run(sup.run())
    except StartupError as exc:
        log.error("LLMux failed to start: %s", exc)
        return 1
    finally:
        sup.stop()
