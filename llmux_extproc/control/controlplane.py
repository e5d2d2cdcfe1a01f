"""The supervisor as a small control plane: attempts' outcomes in, endpoints out.

Envoy reports every upstream attempt (the router's upstream log, over gRPC, batched) with
its status, timing and the deployment id of the endpoint it chose. The policies
(`policy.health`: LiteLLM's cooldowns and the seed's breaker; `policy.strategies`: weights
for latency-, usage- and cost-based routing) turn those into each endpoint's health and
weight, which reach Envoy as the group clusters' endpoints (CDS; see
envoy_routing.group_cluster for why not EDS); Envoy enforces them for every worker thread
and every processor alike. Provider names are resolved here so that each deployment is one
host (its further addresses as Envoy's additional addresses) whatever its name resolves to.
The state is per replica (docs/architecture.md says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.accesslog.v3.als_pb2_grpc import AccessLogServiceServicer

from llmux_extproc.control import envoy_routing
from llmux_extproc.control.config import Config
from llmux_extproc.policy.health import (
    BreakerSettings,
    CooldownSettings,
    DeploymentHealth,
    Outcome,
)
from llmux_extproc.policy.strategies import DeploymentInfo, Strategy, make_strategy

log = logging.getLogger("llmux.control")

# The custom tag the upstream log carries: the chosen endpoint's `llmux.d` metadata.
HOST_TAG = "llmux_host"
# As LiteLLM's litellm_deployment_state: 0 healthy, 1 partial (probing), 2 down.
STATE_VALUES = {"healthy": 0, "half_open": 1, "cooldown": 2, "open": 2}
DNS_REFRESH_S = 30.0
TOKENS_SOCKET = "tokens.sock"  # in the runtime dir: workers' token reports


def deployment_infos(config: Config, group: str) -> list[DeploymentInfo]:
    from llmux_extproc.dataplane.gateway import price_for

    out = []
    for level in envoy_routing.priorities(config, group):
        for d in level:
            price = price_for(d)
            out.append(
                DeploymentInfo(
                    d.id,
                    d.weight,
                    d.rpm,
                    d.tpm,
                    price.input_cost_per_token if price else None,
                    price.output_cost_per_token if price else None,
                )
            )
    return out


# A change of weights alone waits since the last push: each push replaces the group's
# cluster (new connections), and latency or usage averages move all the time. A weight
# that at least halves or doubles (a deployment becoming the fast or the cheap one) waits
# MATERIAL_EVERY_S, smaller drift WEIGHTS_EVERY_S. Health changes (cooldown, breaker) go
# out at once.
WEIGHTS_EVERY_S = 5.0
MATERIAL_EVERY_S = 1.0


class ControlPlane:
    """Per-deployment health and weights for one config, published as group clusters."""

    def __init__(
        self,
        config: Config,
        sink_port: int,
        publish: Callable[[list[dict[str, Any]]], object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink_port = sink_port
        self.publish = publish
        self.clock = clock
        self.addresses: dict[str, list[str]] = {}
        self._states_written: bytes | None = None
        self._published: dict[str, tuple[bytes, list[int]]] = {}  # group: (health, weights)
        self._weights_at = -WEIGHTS_EVERY_S
        self.changed = asyncio.Event()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """A new config: policies start afresh (their deployments and settings may differ)."""
        r = config.router
        self.config = config
        groups = {name: [d.id for d in config.group(name)] for name in config.model_names}
        self.health = DeploymentHealth(
            groups,
            CooldownSettings(
                allowed_fails=r.allowed_fails,
                cooldown_time_s=r.cooldown_time_s,
                disable_cooldowns=r.disable_cooldowns,
                allowed_fails_policy=r.allowed_fails_policy,
            ),
            _breaker_settings(config),
            self.clock,
        )
        self.strategy: Strategy = make_strategy(
            r.routing_strategy, r.routing_strategy_args, self.clock
        )
        self._observe = getattr(self.strategy, "observe", None)
        self._observe_request = getattr(self.strategy, "observe_request", None)
        # Strategies whose weights move with outcomes (latency, usage) need the loop to look.
        self._weighs = self._observe is not None or self._observe_request is not None
        self._attempts: dict[tuple[str, str], Any] = {}
        # LiteLLM's deployment metrics, when the config asks for them: labels per
        # deployment, the children per (deployment, status) as they are met.
        from llmux_extproc.observability import metrics

        self._litellm = config.litellm_metrics
        self._dep_labels = {
            d.id: (*metrics.deployment_labels(d), d.model_name) for d in config.deployments
        }
        self._litellm_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._transition = False
        self._limits = {d.id: (d.rpm, d.tpm) for d in config.deployments}
        self.infos = {name: deployment_infos(config, name) for name in config.model_names}
        self.groups_of: dict[str, list[str]] = {}
        for name in config.model_names:
            for d in config.group(name):
                self.groups_of.setdefault(d.id, []).append(name)

    # -- outcomes ------------------------------------------------------------------

    def record(self, outcome: Outcome, kind: str = "first") -> None:
        """One attempt's outcome. Only a transition (or a strategy that weighs outcomes)
        wakes the publishing loop: this runs for every attempt of every request, and when
        every upstream-log batch recomputed the clusters the supervisor cost 245 us per
        request at 200 req/s, 145 us after (/proc ticks over 2,000 requests)."""
        dep = outcome.deployment
        if dep not in self.groups_of:
            return  # a deployment removed by a reload since
        counter = self._attempts.get((dep, kind))
        if counter is None:
            from llmux_extproc.observability import metrics

            counter = self._attempts[(dep, kind)] = metrics.ATTEMPTS.labels(dep, kind)
        counter.inc()
        if self._litellm:
            self._litellm_attempt(dep, outcome.status)
        before = self.health.state(dep).status
        lines = self.health.record(outcome)
        for line in lines:
            log.warning("%s", line)
        self._count_transition(dep, before, outcome.status)
        if self._observe is not None:
            self._observe(outcome)
        if self._observe_request is not None:
            self._observe_request(outcome.deployment)
        # A full deployment (usage-based routing's rpm/tpm) is taken out at once, as a
        # health transition is; averages that only move wait for the next look.
        if lines or self._at_limit(dep):
            self._transition = True
        if self._transition or self._weighs:
            self.changed.set()

    def observed_tokens(self, dep: str) -> None:
        if self._at_limit(dep):
            self._transition = True
        self.changed.set()

    def _at_limit(self, dep: str) -> bool:
        """usage-based routing: the deployment just reached its rpm or tpm this minute."""
        rpm, tpm = self._limits.get(dep, (None, None))
        usage = getattr(self.strategy, "usage", None)
        if usage is None or (rpm is None and tpm is None):
            return False
        requests, tokens = usage(dep)
        return bool((rpm and requests >= rpm) or (tpm and tokens >= tpm))

    def tick(self) -> None:
        before = {d: self.health.state(d).status for d in self.groups_of}
        for line in self.health.tick():
            log.info("%s", line)
        for dep, status in before.items():
            self._count_transition(dep, status)

    def _litellm_attempt(self, dep: str, status: int) -> None:
        children = self._litellm_children.get((dep, status))
        if children is None:
            from llmux_extproc.observability import metrics

            labels = self._dep_labels[dep]
            outcome = (
                metrics.LITELLM_DEPLOYMENT_SUCCESS.labels(*labels)
                if 200 <= status < 400
                else metrics.LITELLM_DEPLOYMENT_FAILURE.labels(*labels, str(status))
            )
            children = (metrics.LITELLM_DEPLOYMENT_REQUESTS.labels(*labels), outcome)
            self._litellm_children[(dep, status)] = children
        for child in children:
            child.inc()

    def _count_transition(self, dep: str, before: str, status: int | None = None) -> None:
        from llmux_extproc.observability import metrics

        after = self.health.state(dep).status
        if after == before:
            return
        if after == "cooldown":
            metrics.COOLDOWNS.labels(dep).inc()
            if self._litellm:
                labels = self._dep_labels[dep][:4]
                metrics.LITELLM_DEPLOYMENT_COOLED_DOWN.labels(*labels, str(status or 0)).inc()
        elif after in ("open", "half_open") or before in ("open", "half_open"):
            metrics.BREAKER.labels(dep, "closed" if after == "healthy" else after).inc()

    # -- endpoints -----------------------------------------------------------------

    def assignment(self, group: str) -> dict[str, Any]:
        routable: dict[str, bool] = {}
        for level in envoy_routing.priorities(self.config, group):
            # Each group's own rule (all-excluded keeps the least recently failed) applies
            # to its deployments wherever they appear.
            routable.update(self.health.routable(level[0].model_name))
        infos = self.infos[group]
        weights = self.strategy.weights(infos, routable)
        healthy = {i.id: routable.get(i.id, True) and weights.get(i.id, 1) > 0 for i in infos}
        return envoy_routing.load_assignment(
            self.config,
            group,
            self.sink_port,
            addresses=self.addresses,
            weights=weights,
            healthy=healthy,
        )

    def clusters(self) -> list[dict[str, Any]]:
        """Every cluster CDS serves for this config, with today's health and weights."""
        assignments = {g: self.assignment(g) for g in self.config.model_names}
        return envoy_routing.provider_clusters(self.config, self.sink_port, assignments)

    def update(self, *, force: bool = False) -> bool:
        """Publish the clusters if a group's health changed, or its weights and the last
        weight change is WEIGHTS_EVERY_S old; True when published."""
        now = self.clock()
        health_changed = weights_changed = material = False
        current: dict[str, tuple[bytes, list[int]]] = {}
        for group in self.config.model_names:
            doc = self.assignment(group)
            endpoints = [ep for level in doc["endpoints"] for ep in level["lb_endpoints"]]
            health = orjson.dumps([(e["health_status"], e["endpoint"]) for e in endpoints])
            weights = [e["load_balancing_weight"] for e in endpoints]
            current[group] = (health, weights)
            before = self._published.get(group)
            health_changed |= before is None or before[0] != health
            if before is not None and before[1] != weights:
                weights_changed = True
                material |= any(
                    not 0.5 < new / old < 2 for new, old in zip(weights, before[1], strict=False)
                )
        wait = MATERIAL_EVERY_S if material else WEIGHTS_EVERY_S
        due = weights_changed and now - self._weights_at >= wait
        if not (force or health_changed or due):
            return False
        if weights_changed:
            self._weights_at = now
        self._published = current
        self.publish(self.clusters())
        return True

    def states(self) -> dict[str, Any]:
        """Every deployment's state, for /health and metrics; no secrets. `until` is wall
        clock time (seconds since the epoch), rounded so the file changes on transitions."""
        offset = time.time() - self.clock()
        out = {}
        for d in self.config.deployments:
            st = self.health.state(d.id)
            out[d.id] = {
                "model_name": d.model_name,
                "provider": d.provider,
                "state": st.status,
                "until": None if st.until is None else round(st.until + offset, 1),
                "reason": st.reason,
            }
        return out

    def write_states(self, path: Path) -> None:
        from llmux_extproc.control.supervisor import write_atomic
        from llmux_extproc.observability import metrics

        states = self.states()
        body = orjson.dumps(states, option=orjson.OPT_SORT_KEYS)
        if self._states_written == body:
            return
        write_atomic(path, body)
        self._states_written = body
        for dep_id, st in states.items():
            value = STATE_VALUES[st["state"]]
            metrics.DEPLOYMENT_STATE.labels(dep_id, st["model_name"]).set(value)
            if self._litellm:
                labels = self._dep_labels[dep_id][:4]
                metrics.LITELLM_DEPLOYMENT_STATE.labels(*labels).set(value)

    def _names(self) -> set[str]:
        """Provider hosts given by name (resolved here; IPs need nothing)."""
        return {
            d.upstream.host
            for d in self.config.deployments
            if d.upstream and not envoy_routing.is_ip(d.upstream.host)
        }

    async def resolve(self) -> None:
        """Resolve provider names; a changed address reaches Envoy with the next update()."""
        loop = asyncio.get_running_loop()
        for host in sorted(self._names()):
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                if host not in self.addresses:
                    log.warning("cannot resolve %s: %s", host, exc)
                continue  # keep what resolved before
            v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
            v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
            found = list(dict.fromkeys(v4 + v6))
            if found:
                self.addresses[host] = found

    def unresolved(self) -> list[str]:
        return sorted(self._names() - set(self.addresses))

    async def run(self, states: Path) -> None:
        """Keep Envoy's group clusters (and the `/health` states file) in step with
        outcomes, timed transitions and DNS."""
        next_dns = time.monotonic() + DNS_REFRESH_S
        while True:
            wake = self.health.next_change()
            timeout = 1.0 if wake is None else max(0.0, min(1.0, wake - self.clock()))
            # A weight change held back is published when it is due.
            timeout = min(timeout, MATERIAL_EVERY_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)
            if not self._transition:
                # Outcomes that only move averages: look at most five times a second.
                await asyncio.sleep(0.2)
            self._transition = False
            self.changed.clear()
            self.tick()
            if time.monotonic() >= next_dns:
                next_dns = time.monotonic() + DNS_REFRESH_S
                await self.resolve()
            self.update()
            self.write_states(states)


def _breaker_settings(config: Config) -> BreakerSettings:
    b = config.settings.breaker
    defaults = BreakerSettings()
    return BreakerSettings(
        failure_rate=b.get("failure_rate", defaults.failure_rate),
        min_requests=int(b.get("min_requests", defaults.min_requests)),
        window_s=b.get("window_s", defaults.window_s),
        open_s=b.get("open_s", defaults.open_s),
        half_open_probes=int(b.get("half_open_probes", defaults.half_open_probes)),
    )


def outcome_from_entry(entry: Any) -> tuple[Outcome, str] | None:
    """One upstream-log entry (an attempt) as an Outcome and its kind (first, retry,
    fallback); None without a deployment tag (llmux_local)."""
    common = entry.common_properties
    tag = common.custom_tags.get(HOST_TAG)
    if not tag:
        return None
    status = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    flags = common.response_flags
    if status == 0 and not flags.ListFields():
        # Answered by the processor itself (mock, a bad request, a full bulkhead): the
        # upstream log then has neither a status nor a failure flag. Nothing reached the
        # deployment, so it says nothing about its health.
        return None
    priority, _, dep_id = tag.partition("|")
    kind = "fallback" if priority not in ("", "0") else "first"
    attempt = common.upstream_request_attempt_count
    if attempt <= 1:  # Envoy 1.40's upstream log: see the llmux_attempt tag (envoy_config.py)
        header = common.custom_tags.get("llmux_attempt", "")
        attempt = int(header) if header.isdigit() else 1
    if kind == "first" and attempt > 1:
        kind = "retry"
    if flags.upstream_request_timeout or flags.upstream_connection_failure:
        status = 0
    if flags.upstream_remote_reset or flags.upstream_connection_termination:
        status = 0 if status < 400 else status
    if common.HasField("time_to_last_upstream_rx_byte"):
        latency = _seconds(common.time_to_last_upstream_rx_byte)
    else:
        latency = _seconds(common.duration)
    ttft = (
        _seconds(common.time_to_first_upstream_rx_byte)
        if common.HasField("time_to_first_upstream_rx_byte")
        else None
    )
    retry_after = None
    value = entry.response.response_headers.get("retry-after")
    if value:
        try:
            retry_after = float(value)
        except ValueError:
            retry_after = None  # an HTTP date: cooldown_time applies
    stream = common.custom_tags.get("llmux_stream") == "true"
    return Outcome(dep_id, status, latency, ttft, stream, retry_after), kind


def _seconds(duration: Any) -> float:
    # Duration.ToTimedelta builds a timedelta first: several times slower, on every entry.
    return float(duration.seconds) + float(duration.nanos) / 1e9


class TokenReports(asyncio.DatagramProtocol):
    """Tokens per answered request, from the workers (usage-based routing counts TPM; the
    upstream log knows requests, not tokens). One datagram `<deployment id>\t<tokens>`."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def datagram_received(self, data: bytes, addr: Any) -> None:
        dep, _, tokens = data.decode("utf-8", "replace").partition("\t")
        observe = getattr(self.control.strategy, "observe_tokens", None)
        if observe is not None and dep in self.control.groups_of and tokens.isdigit():
            observe(dep, int(tokens))
            self.control.observed_tokens(dep)


def _datagram_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)  # left by a supervisor that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


async def listen_for_tokens(control: ControlPlane, path: Path) -> asyncio.BaseTransport:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: TokenReports(control), sock=_datagram_socket(path)
    )
    return transport


class TokenReporter:
    """The worker's side: a datagram per accounted answer, only under usage-based routing;
    never blocks, and a supervisor not listening only costs the report."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def __call__(self, deployment: str, tokens: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(f"{deployment}\t{tokens}".encode(), self.path)


class AttemptLog(AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's upstream log stream: one entry per attempt."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                try:
                    found = outcome_from_entry(entry)
                    if found is not None:
                        self.control.record(*found)
                except Exception:
                    log.exception("could not read an upstream log entry")
        return als_pb2.StreamAccessLogsResponse()
