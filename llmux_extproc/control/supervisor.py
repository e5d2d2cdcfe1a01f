"""`llmux run`: the ext_proc workers and Envoy as child processes, kept in step.

Start order: workers (gRPC sockets up), then Envoy (admin ready, listener accepting).
A config edit is read once and validated here; the text validated is written to the runtime
directory (`config.yaml`), the only file the workers ever load. A good edit reaches Envoy as
clusters through file-based CDS, then routes (RDS), each confirmed by Envoy's own counters
(accepted: the subscription's version; rejected: `update_rejected`, Envoy's NACK), then the
workers (SIGHUP), then clusters no longer used are dropped, so no request is routed to a
cluster Envoy does not have yet. A bad edit, or one Envoy rejects, is logged with the reason,
counted, and the previous config (Envoy's files and the workers' snapshot included) is put
back.

A child that dies is restarted at once (a worker on its own socket; Envoy from the same
bootstrap), and again after a growing pause if it keeps dying soon after each start; Envoy
dying that way `ENVOY_MAX_QUICK_CRASHES` times in a row ends `llmux run` with exit code 1.
While a worker is down, Envoy's health checks and outlier detection send its streams to the
others. SIGTERM (or SIGINT) drains: readiness turns 503, new requests get 503, and in-flight
ones run to completion, up to `llmux.drain_timeout`; then Envoy stops, then the workers, and
`llmux run` exits 0. A second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import orjson
from envoy.service.accesslog.v3.als_pb2_grpc import add_AccessLogServiceServicer_to_server

from llmux_extproc.control import envoy_config
from llmux_extproc.control.config import Config, ConfigError, Listen, file_stamp, read_config
from llmux_extproc.control.controlplane import (
    TOKENS_SOCKET,
    AttemptLog,
    ControlPlane,
    listen_for_tokens,
)
from llmux_extproc.control.envoy_binary import envoy_rejects, find_envoy
from llmux_extproc.control.envoy_config import RuntimePaths
from llmux_extproc.observability import logs

log = logging.getLogger("llmux.supervisor")


class StartupError(RuntimeError):
    pass


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    # Envoy's file watcher reacts to a rename into the watched directory: never a partial file.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # an older tmp file keeps its mode through O_CREAT
    os.replace(tmp, path)


# The config as `llmux run` validated it, in its runtime directory: what the workers load
# (at start, on SIGHUP, and when they meet a deployment they do not know yet).
SNAPSHOT = "config.yaml"
# Envoy's counters for its two file subscriptions (stat prefix llmux, route config llmux).
CDS_STATS = "cluster_manager.cds"
RDS_STATS = "http.llmux.rds.llmux"
# How long Envoy may take to apply (or reject) a pushed file before the reload fails.
XDS_APPLY_TIMEOUT_S = 10.0
# After the drain, before Envoy is stopped: its accounting log buffer flushed, with margin.
ACCESS_LOG_SETTLE_S = envoy_config.ACCOUNTING_FLUSH_S * 3


# A child that dies sooner than this after its start counts as a crash loop: the next start
# waits `restart_delay()`, and Envoy is given up on after ENVOY_MAX_QUICK_CRASHES.
QUICK_CRASH_S = 10.0
ENVOY_MAX_QUICK_CRASHES = 5


def restart_delay(quick_crashes: int) -> float:
    """Seconds before restarting a child that crashed `quick_crashes` times in a row soon
    after starting: at once the first time, then 0.25 s doubling up to 10 s."""
    if quick_crashes <= 1:
        return 0.0
    return float(min(0.25 * 2 ** (quick_crashes - 2), 10.0))


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _Restarts:
    """Restart bookkeeping for one child (a worker slot or Envoy)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.quick_crashes = 0
        self.due: float | None = None  # when the pending restart may happen

    def died(self, now: float) -> float:
        self.quick_crashes = self.quick_crashes + 1 if now - self.started < QUICK_CRASH_S else 1
        self.due = now + restart_delay(self.quick_crashes)
        return self.due - now


def admin_get(
    admin: Listen, path: str, timeout: float = 2.0, method: str = "GET"
) -> tuple[int, str]:
    conn: http.client.HTTPConnection
    if admin.path:
        conn = _UnixHTTPConnection(admin.path, timeout)
    else:
        host = "127.0.0.1" if admin.host in ("0.0.0.0", "::") else admin.host
        conn = http.client.HTTPConnection(host or "127.0.0.1", admin.port, timeout=timeout)
    try:
        conn.request(method, path)
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


# File descriptors Envoy needs besides its client connections and their upstream ones:
# listeners, ext_proc and control sockets, files, the admin API (a generous round figure).
FD_RESERVE = 1024


def fds_needed(max_connections: int) -> int:
    """Each client connection can hold an upstream connection too (HTTP/1.1 to the
    provider while its answer streams), so two descriptors per connection, plus a reserve."""
    return 2 * max_connections + FD_RESERVE


def raise_fd_limit(max_connections: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (what an
    unprivileged process may do), before Envoy and the workers are started, so they
    inherit it; warn when even that is below what `max_connections` needs. Returns the
    (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, fds_needed(max_connections))
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning(
                "could not raise the file-descriptor limit from %d to %d: %s", soft, hard, exc
            )
    need = fds_needed(max_connections)
    if soft < need:
        log.warning(
            "file-descriptor limit %d is below the %d that llmux.max_connections (%d) may need"
            " (two per connection and %d more); Envoy may run out of descriptors before the cap."
            " Raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, the container's nofile)"
            " or lower llmux.max_connections",
            soft,
            need,
            max_connections,
            FD_RESERVE,
        )
    return soft, hard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Supervisor:
    def __init__(self, config_path: str | None, config: Config, text: str = "") -> None:
        self.config_path = config_path
        self.config = config
        self._text = text  # what `config` was parsed from: the workers' snapshot
        root = config.settings.runtime_dir or tempfile.mkdtemp(prefix="llmux-")
        self.paths = RuntimePaths(Path(root), sink_port=_free_port())
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None
        self._worker_restarts: list[_Restarts] = []
        self._envoy_restarts = _Restarts()
        self.draining = False
        self._cds_version = 0
        self._stamp = file_stamp(config_path)

    @property
    def snapshot(self) -> Path:
        return self.paths.root / SNAPSHOT

    def write_snapshot(self, text: str) -> None:
        # The file may hold keys: readable by this user only, like the runtime directory.
        write_atomic(self.snapshot, text.encode(), mode=0o600)

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        s = self.config.settings
        soft, _ = raise_fd_limit(s.max_connections)
        log.info("file-descriptor limit %d; at most %d client connections", soft, s.max_connections)
        self.write_snapshot(self._text)
        for i in range(s.workers):
            self.workers.append(self._spawn_worker(i))
            self._worker_restarts.append(_Restarts())
        self._wait(
            lambda: all(
                _can_connect(Listen(None, None, str(self.paths.extproc_socket(i))))
                for i in range(s.workers)
            ),
            "ext_proc workers",
            15,
        )

        # Created here, not in __init__: it imports the metrics, which must come after
        # PROMETHEUS_MULTIPROC_DIR is set (run()).
        self.control = ControlPlane(self.config, self.paths.sink_port, self.push_clusters)
        from llmux_extproc.observability import metrics

        for process in ("worker", "envoy"):  # at 0 from the start: rate() and alerts see them
            metrics.RESTARTS.labels(process)
        asyncio.run(self.control.resolve())
        for host in self.control.unresolved():
            log.warning("provider host %s does not resolve yet; Envoy resolves it", host)
        self.control.update(force=True)  # the group clusters, through CDS
        self.control.write_states(self.paths.deployments)
        self.push_routes(self.config)
        bootstrap = envoy_config.bootstrap(self.config, self.paths)
        write_atomic(self.paths.bootstrap, orjson.dumps(bootstrap, option=orjson.OPT_INDENT_2))
        self.envoy = self._spawn_envoy()
        self._envoy_restarts = _Restarts()
        self._wait(lambda: self._admin_ready(), "Envoy admin", 20)
        self._wait(lambda: _can_connect(s.listen), f"Envoy listener {s.listen}", 10)

    def _spawn_worker(self, i: int) -> subprocess.Popen[bytes]:
        sock = self.paths.extproc_socket(i)
        sock.unlink(missing_ok=True)
        # The validated snapshot, never the user's file: that may hold an edit being
        # validated, or one that was rejected.
        cmd = [sys.executable, "-m", "llmux_extproc", "extproc", "--listen", f"unix:{sock}"]
        cmd += ["--config", str(self.snapshot)]
        # gRPC's threads would each get a glibc malloc arena; two keep RSS flat.
        env = {
            **os.environ,
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
            # Where the supervisor leaves the deployment states `/health` reports.
            "LLMUX_RUNTIME_DIR": str(self.paths.root),
            "LLMUX_WORKER": str(i),  # its row in the shared bulkhead counts
        }
        return subprocess.Popen(cmd, env=env)

    def _spawn_envoy(self) -> subprocess.Popen[bytes]:
        drain_s = str(max(1, round(self.config.settings.drain_timeout_s)))
        return subprocess.Popen(
            [
                find_envoy(),
                "-c",
                str(self.paths.bootstrap),
                "--log-level",
                os.environ.get("LLMUX_ENVOY_LOG_LEVEL")
                or logs.envoy_log_level(self.config.settings.log_levels),
                # Envoy's lines in the shape of LLMux's own: one format on stderr.
                "--log-format",
                logs.envoy_log_format(),
                # Several gateways (and test runs) share a machine: no hot-restart shared memory.
                "--disable-hot-restart",
                # Access log lines reach stdout within a second, not Envoy's default 10 s.
                "--file-flush-interval-msec",
                "1000",
                # On drain every connection is told to close after its current request (not
                # a growing share of them), and the listener stays open, answering 503, for
                # as long as `llmux run` may wait for in-flight requests.
                "--drain-strategy",
                "immediate",
                "--drain-time-s",
                drain_s,
            ]
        )

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

    # -- self-healing ----------------------------------------------------------------

    def heal(self) -> int | None:
        """Restart the children that died (when their back-off allows); an exit code when
        `llmux run` must end instead."""
        now = time.monotonic()
        for i, proc in enumerate(self.workers):
            restarts = self._worker_restarts[i]
            if restarts.due is None and proc.poll() is not None:
                delay = restarts.died(now)
                self._forget_metrics_of(proc.pid)
                log.error(
                    "ext_proc worker %d (pid %d) died (%s); restarting it on %s%s",
                    i,
                    proc.pid,
                    exit_reason(proc.returncode),
                    self.paths.extproc_socket(i),
                    f" in {delay:.2f}s (crash loop)" if delay else "",
                )
            if restarts.due is not None and now >= restarts.due:
                self._count_restart("worker")
                self.workers[i] = self._spawn_worker(i)
                restarts.started, restarts.due = now, None
                log.info("ext_proc worker %d restarted: pid %d", i, self.workers[i].pid)
        envoy, restarts = self.envoy, self._envoy_restarts
        if envoy is None:
            return None
        if restarts.due is None and envoy.poll() is not None:
            if self.draining:
                log.error(
                    "Envoy (pid %d) died while draining (%s)",
                    envoy.pid,
                    exit_reason(envoy.returncode),
                )
                restarts.due = float("inf")  # not restarted: the drain ends with it
                return None
            delay = restarts.died(now)
            if restarts.quick_crashes > ENVOY_MAX_QUICK_CRASHES:
                log.error(
                    "Envoy (pid %d) died (%s): %d crashes in a row, each within %.0fs of"
                    " starting; giving up: stopping LLMux",
                    envoy.pid,
                    exit_reason(envoy.returncode),
                    restarts.quick_crashes,
                    QUICK_CRASH_S,
                )
                return 1
            log.error(
                "Envoy (pid %d) died (%s); restarting it%s",
                envoy.pid,
                exit_reason(envoy.returncode),
                f" in {delay:.2f}s (crash loop)" if delay else "",
            )
        if restarts.due is not None and now >= restarts.due and not self.draining:
            self._count_restart("envoy")
            self.envoy = self._spawn_envoy()
            restarts.started, restarts.due = now, None
            log.info("Envoy restarted: pid %d", self.envoy.pid)
        return None

    @staticmethod
    def _forget_metrics_of(pid: int) -> None:
        """Drop a dead worker's live gauges (open streams, tasks): prometheus_client keeps
        summing its last values otherwise, so a worker killed mid-request counted its
        streams as open for ever. Its counters stay: totals never go back."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    @staticmethod
    def _count_restart(process: str) -> None:
        from llmux_extproc.observability import metrics

        metrics.RESTARTS.labels(process).inc()

    # -- reload --------------------------------------------------------------------

    def push_clusters(self, clusters: list[dict[str, Any]]) -> str:
        self._cds_version += 1
        doc = envoy_config.cds_document(clusters, str(self._cds_version))
        write_atomic(self.paths.cds, orjson.dumps(doc))
        return str(self._cds_version)

    def push_routes(self, config: Config) -> str:
        self._cds_version += 1
        doc = envoy_config.rds_document(config, str(self._cds_version))
        write_atomic(self.paths.rds, orjson.dumps(doc))
        return str(self._cds_version)

    def _xds_state(self, prefix: str) -> tuple[int, int] | None:
        """(refusals, accepted version) of one of Envoy's file subscriptions. A refusal is
        `update_rejected` (a resource Envoy cannot build: its NACK) or `update_failure` (a
        file it cannot parse as the resource type; measured: an out-of-range duration
        counts there, with nothing logged)."""
        pattern = f"^{re.escape(prefix)}\\.(update_rejected|update_failure|version_text)$"
        try:
            status, text = admin_get(self.config.settings.admin, f"/stats?filter={pattern}")
        except OSError:
            return None
        if status != 200:
            return None
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            values[name.rsplit(".", 1)[-1]] = value.strip().strip('"')
        try:
            refusals = int(values["update_rejected"]) + int(values["update_failure"])
            return refusals, int(values.get("version_text") or 0)
        except (KeyError, ValueError):
            return None

    async def _applied(self, prefix: str, push: Any, what: str) -> str | None:
        """Push (a callable writing one file, returning its version) and wait until Envoy
        has taken that version (None) or rejected it (its NACK: `update_rejected` grew);
        why not, otherwise. Envoy only reports a file update's fate in these counters."""
        before = await asyncio.to_thread(self._xds_state, prefix)
        version = int(push())
        deadline = time.monotonic() + XDS_APPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            now = await asyncio.to_thread(self._xds_state, prefix)
            if now is not None and before is not None and now[0] > before[0]:
                return f"Envoy rejected the {what} ({prefix}.update_rejected/update_failure)"
            # A later push (the control plane's own) may have overtaken this one.
            if now is not None and now[1] >= version:
                return None
            await asyncio.sleep(0.05)
        return f"Envoy did not apply the {what} within {XDS_APPLY_TIMEOUT_S:.0f}s"

    def _envoy_has(self, names: set[str]) -> bool:
        try:
            status, text = admin_get(self.config.settings.admin, "/clusters")
        except OSError:
            return False
        present = {line.split("::", 1)[0] for line in text.splitlines()}
        return status == 200 and names <= present

    async def _envoy_reason(self, config: Config, clusters: list[dict[str, Any]]) -> str:
        """Envoy's own words for a rejected update: its log has them, this process does not,
        so the same resources are put to `envoy --mode validate`."""
        doc = envoy_config.bootstrap(config, self.paths, static_clusters=True)
        static = doc["static_resources"]
        names = {c["name"] for c in clusters}
        static["clusters"] = [c for c in static["clusters"] if c["name"] not in names] + clusters
        reason = await asyncio.to_thread(envoy_rejects, doc, self.paths.root)
        return reason or "see Envoy's log ('config rejected')"

    async def maybe_reload(self) -> None:
        stamp = file_stamp(self.config_path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        from llmux_extproc.observability import metrics

        try:
            # Read once: the text validated here is the text the workers get.
            text, new = read_config(self.config_path)
            _check_reloadable(self.config, new)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("error").inc()
            log.error("config reload rejected, keeping the running config: %s", exc)
            return
        old, old_text = self.config, self._text
        old_clusters = self.control.clusters()
        self.control.configure(new)
        await self.control.resolve()
        new_clusters = self.control.clusters()
        new_names = {c["name"] for c in new_clusters}
        # Old clusters stay until the routes no longer lead there.
        union = new_clusters + [c for c in old_clusters if c["name"] not in new_names]
        # The snapshot first: a worker meeting a deployment of the new clusters re-reads it
        # at once (Gateway.deployment), so neither order of arrival fails a request.
        self.write_snapshot(text)
        error = await self._applied(CDS_STATS, lambda: self.push_clusters(union), "clusters")
        deadline = time.monotonic() + XDS_APPLY_TIMEOUT_S
        # Accepted clusters that resolve names warm up before Envoy routes to them.
        while error is None and time.monotonic() < deadline:
            if await asyncio.to_thread(self._envoy_has, new_names):
                break
            await asyncio.sleep(0.05)
        if error is None:
            error = await self._applied(RDS_STATS, lambda: self.push_routes(new), "routes")
        if error is not None:
            if error.startswith("Envoy rejected"):
                error += ": " + await self._envoy_reason(new, union)
            await self._roll_back(old, old_text, old_clusters)
            metrics.CONFIG_RELOADS.labels("error").inc()
            log.error("config reload failed, keeping the running config: %s", error)
            return
        for proc in self.workers:
            proc.send_signal(signal.SIGHUP)
        self.config, self._text = new, text
        # A restarted Envoy starts from the bootstrap: it must be this config's too.
        bootstrap = envoy_config.bootstrap(new, self.paths)
        write_atomic(self.paths.bootstrap, orjson.dumps(bootstrap, option=orjson.OPT_INDENT_2))
        metrics.CONFIG_RELOADS.labels("success").inc()
        for warning in new.warnings:
            log.warning("config: %s", warning)
        logs.apply_levels(new.settings.log_levels)
        log.info("config reloaded: %d deployments", len(new.deployments))
        # Requests already routed to a removed cluster finish; new ones no longer go there.
        await asyncio.sleep(2)
        if self.config is new:
            self.control.update(force=True)

    async def _roll_back(
        self, old: Config, old_text: str, old_clusters: list[dict[str, Any]]
    ) -> None:
        """Envoy's files, the control plane and the workers' snapshot as before the reload:
        a file Envoy rejected must not be what a restarted Envoy starts from, and a worker
        that already re-read the snapshot goes back."""
        self.control.configure(old)
        self.write_snapshot(old_text)
        for push, prefix, what in (
            (lambda: self.push_routes(old), RDS_STATS, "previous routes"),
            (lambda: self.push_clusters(old_clusters), CDS_STATS, "previous clusters"),
        ):
            error = await self._applied(prefix, push, what)
            if error is not None:
                log.error("rolling back the reload: %s", error)
        for proc in self.workers:
            proc.send_signal(signal.SIGHUP)
        self.control.update(force=True)

    # -- run and stop --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop, cut, child_exited = asyncio.Event(), asyncio.Event(), asyncio.Event()
        signals = 0

        def on_signal(signum: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            (cut if signals > 1 else stop).set()
            log.info(
                "%s received%s", signum.name, "; cutting the drain short" if signals > 1 else ""
            )

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGCHLD, child_exited.set)
        fatal: list[int] = []

        async def watch_children() -> None:
            # Its own task: a reload may take seconds, a restart must not wait for it.
            while True:
                child_exited.clear()
                code = self.heal()
                if code is not None:
                    fatal.append(code)
                    stop.set()
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child_exited.wait(), 0.1)

        watcher = asyncio.create_task(watch_children())
        control_server = grpc.aio.server()
        add_AccessLogServiceServicer_to_server(AttemptLog(self.control), control_server)
        self.paths.control_socket.unlink(missing_ok=True)
        control_server.add_insecure_port(f"unix:{self.paths.control_socket}")
        await control_server.start()
        tokens = await listen_for_tokens(self.control, self.paths.root / TOKENS_SOCKET)
        control = asyncio.create_task(self.control.run(self.paths.deployments))
        from llmux_extproc.observability import budgets

        budget_metrics = asyncio.create_task(budgets.watch(lambda: self.config))
        try:
            while not stop.is_set():
                if self.config_path:
                    await self.maybe_reload()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.settings.reload_poll_s)
            if fatal:
                return fatal[0]
            await self.drain(cut)
            return 0
        finally:
            watcher.cancel()
            control.cancel()
            budget_metrics.cancel()
            tokens.close()
            await control_server.stop(grace=None)

    # -- drain and stop ------------------------------------------------------------

    def _admin_post(self, path: str) -> None:
        try:
            status, text = admin_get(self.config.settings.admin, path, method="POST")
        except OSError as exc:
            log.warning("Envoy admin POST %s failed: %s", path, exc)
            return
        if status != 200:
            log.warning("Envoy admin POST %s: %d %s", path, status, text.strip()[:200])

    def active_requests(self) -> int | None:
        """Requests Envoy's listener is serving (health probes included); None if Envoy
        is gone."""
        if self.envoy is None or self.envoy.poll() is not None:
            return None
        try:
            status, text = admin_get(
                self.config.settings.admin, "/stats?filter=^http\\.llmux\\.downstream_rq_active$"
            )
        except OSError:
            return None
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if status == 200 and name.strip() == "http.llmux.downstream_rq_active":
                return int(value)
        return None

    async def drain(self, cut: asyncio.Event) -> None:
        """Readiness 503 (health_check filter), new requests 503 (the drain fault filter)
        and every connection told to close (Envoy's drain), then wait for in-flight
        requests."""
        self.draining = True
        timeout = self.config.settings.drain_timeout_s
        log.info(
            "draining: in-flight requests have up to %.0fs (llmux.drain_timeout) to finish;"
            " a second SIGTERM cuts them",
            timeout,
        )
        for path in (
            "/healthcheck/fail",
            f"/runtime_modify?{envoy_config.DRAINING_RUNTIME_KEY}=100",
            "/drain_listeners?graceful",
        ):
            await asyncio.to_thread(self._admin_post, path)
        started = time.monotonic()
        while True:
            active = await asyncio.to_thread(self.active_requests)
            if active is None:
                log.warning("drain: Envoy is gone; stopping the workers")
                return
            if active == 0:
                log.info("drained in %.1fs", time.monotonic() - started)
                # The last answers' access log entries (their accounting, spend logs
                # included) wait in Envoy's gRPC log buffer for up to its flush interval.
                await asyncio.sleep(ACCESS_LOG_SETTLE_S)
                return
            if cut.is_set() or time.monotonic() - started > timeout:
                log.warning(
                    "drain %s: cutting %d request(s) still in flight",
                    "interrupted" if cut.is_set() else f"timed out after {timeout:.0f}s",
                    active,
                )
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut.wait(), 0.1)

    def stop(self) -> None:
        # Envoy first: the workers serve its in-flight exchanges until it is gone.
        for group in ([self.envoy] if self.envoy else [], self.workers):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if not self.config.settings.runtime_dir:
            shutil.rmtree(self.paths.root, ignore_errors=True)


# Settings Envoy or the processes take only at start, by config key: a reload changing one is
# rejected naming it, instead of reporting success and keeping the old value. Everything
# else takes effect on reload (routes, clusters, the workers' config, the control plane).
RESTART_ONLY = {
    "listen": "listen",
    "admin": "admin",
    "metrics": "metrics",
    "workers": "workers",
    "runtime_dir": "runtime_dir",
    # Envoy's listener (bootstrap): its access log and the response buffer of its filters.
    "access_log": "access_log",
    "max_response_body_bytes": "max_response_body_bytes",
    # Envoy's --drain-time-s: how long its listener keeps answering while draining.
    "drain_timeout_s": "drain_timeout",
    # Envoy's tracer and its collector cluster are in the bootstrap.
    "tracing": "tracing",
    # Each worker's spend log queue is made at its start.
    "spend_log_queue": "spend_log_queue",
    # Envoy's connection manager and overload manager (bootstrap).
    "client_body_timeout_s": "client_body_timeout",
    "connection_idle_timeout_s": "connection_idle_timeout",
    "max_connections": "max_connections",
    # The ext_proc cluster's circuit breaker (bootstrap).
    "max_streams_per_worker": "max_streams_per_worker",
}


def _check_reloadable(old: Config, new: Config) -> None:
    """Settings that shape processes, sockets or Envoy's listener need a restart; say so
    instead of half-applying."""
    for field, key in RESTART_ONLY.items():
        if getattr(old.settings, field) != getattr(new.settings, field):
            raise ConfigError(
                f"llmux.{key}: changing it needs a restart of llmux run (from "
                f"{getattr(old.settings, field)!s} to {getattr(new.settings, field)!s})"
            )
    # Each worker holds a pool and a listener on the database it started with.
    if old.database_url != new.database_url:
        raise ConfigError("general_settings.database_url: changing it needs a restart of llmux run")
    if old.redis_url != new.redis_url:
        # Each worker connects to Redis at its start (rate limits and budgets).
        raise ConfigError("router_settings.redis_*: changing Redis needs a restart of llmux run")
    if (old.master_key is None) != (new.master_key is None) and new.database_url:
        raise ConfigError(
            "general_settings.master_key: setting or removing it with a database needs a restart"
        )


def migrate_at_start(dsn: str) -> None:
    """LiteLLM migrates its schema at start (unless disable_prisma_schema_update); so does
    LLMux. A database that is down must not keep the gateway from serving the master key:
    the failure is logged and virtual keys get 503 until it is back and migrated."""
    from llmux_extproc.db.migrate import MigrationError, migrate

    try:
        applied = migrate(dsn, connect_timeout=5)
    except MigrationError as exc:
        log.error(
            "database migrations not applied (%s); virtual keys get 503 until the database is"
            " reachable and migrated (`llmux db migrate`)",
            exc,
        )
        return
    log.info("database schema up to date%s", f" ({', '.join(applied)} applied)" if applied else "")


def run(config_path: str | None) -> int:
    text, config = read_config(config_path)
    logs.apply_levels(config.settings.log_levels)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    sup = Supervisor(config_path, config, text)
    # Must precede the first import of prometheus_client in this process and the workers.
    prom_dir = sup.paths.root / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    from llmux_extproc.observability import metrics

    m = config.settings.metrics
    if m.path:
        raise ConfigError("llmux.metrics: must be host:port")
    metrics.serve(m.host or "127.0.0.1", m.port or 9464)
    started = time.monotonic()
    if config.database_url and config.schema_update:
        migrate_at_start(config.database_url)
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
