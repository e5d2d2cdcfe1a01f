"""The scenario runner: for each repetition, start each target fresh and measure it.

Per target start: cold start (spawn until the first 200), then for every request kind the
target serves correctly, closed-loop maximum throughput at each connection count and, for
targets with the full suite, open-loop latency at each fixed rate; CPU seconds of each
process role around every measurement; peak RSS (VmHWM) of every process after the suite;
then (first repetitions only) the held-streams test. Kinds a target does not serve
correctly are recorded with the reason and skipped, never faked. The failover scenario's
measurements also count the attempts that reached the failing deployment (the mock's
admin stats) and get their own fixed rates (`failover_rates`).
"""

from __future__ import annotations

import http.client
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import loadgen
from bench.loadgen import LoadResult
from bench.procstats import (
    Proc,
    cpu_by_role,
    cpu_delta,
    fd_limit,
    memory,
    open_fds,
    rss_by_role,
    system_busy_seconds,
)
from bench.targets import FAILOVER, HOLD, STREAMING, Target
from bench.wrk import run_wrk


@dataclass
class Settings:
    repetitions: int = 3
    duration: float = 4.0  # measured seconds of each closed-loop run
    rate_duration: float = 5.0  # measured seconds of each open-loop run
    warmup: float = 1.0
    connections: tuple[int, ...] = (32, 128)
    rates: tuple[float, ...] = (200.0, 500.0, 1000.0)
    failover: bool = True  # run the failover scenario (needs LLMux)
    failover_rates: tuple[float, ...] = (200.0,)
    keys: bool = True  # run the virtual-key scenarios (needs PostgreSQL and Redis)
    keys_rates: tuple[float, ...] = (200.0,)
    streams: int = 10_000
    hold_s: float = 15.0
    hold_repetitions: int = 1
    first_byte_timeout: float = 30.0
    settle_limit_s: float = 60.0  # max wait for the target to go idle before a measurement
    wrk: str | None = None
    wrk_threads: int = 1
    workers: tuple[int, ...] = (1, 2)
    full_suite_workers: tuple[int, ...] = (1,)
    compare_litellm: bool = False
    litellm_workers: int = 2
    access_log: str = "off"
    smoke: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def rates_for(self, kind: str) -> tuple[float, ...]:
        return self.failover_rates if kind == FAILOVER else self.rates


@dataclass
class TargetPlan:
    target: Target
    open_loop: bool  # run the fixed-rate latency scenarios
    hold: bool  # run the held-streams test
    rates: tuple[float, ...] | None = None  # its open-loop rates, when not the settings'


@dataclass
class Availability:
    kinds: dict[str, str] = field(default_factory=dict)  # kind -> "ok" or the reason not

    def ok(self, kind: str) -> bool:
        return self.kinds.get(kind) == "ok"


def max_streams_for_fd_limit() -> tuple[int, str]:
    """Envoy holds two descriptors per proxied stream (client side and upstream side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cap = max(0, (hard - 1000) // 2)
    return cap, f"RLIMIT_NOFILE hard limit {hard}: an Envoy process can hold ~{cap} streams"


# -- checking what a target serves -------------------------------------------------------


def probe(target: Target, kind: str) -> str:
    """'ok' when the target answers this kind correctly, else why not."""
    path, body = target.request(kind)
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    try:
        conn.request("POST", path, body, {"content-type": "application/json", **target.headers})
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"request failed: {exc}"
    finally:
        conn.close()
    snippet = data[:300].decode(errors="replace").replace("\n", " ")
    if status != 200:
        return f"HTTP {status}: {snippet}"
    if not target.gateway:
        return "ok"
    if kind in STREAMING:
        if b"chat.completion.chunk" not in data or b"data: [DONE]" not in data:
            return f"stream is not OpenAI SSE (passed through untranslated?): {snippet}"
        return "ok"
    try:
        doc = orjson.loads(data)
        content = doc["choices"][0]["message"]["content"]
        assert doc.get("object") == "chat.completion" and content
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AssertionError):
        return f"answer is not an OpenAI chat.completion: {snippet}"
    return "ok"


# -- one measurement ---------------------------------------------------------------------


def _per_request_us(cpu: dict[str, float], requests: int) -> dict[str, float]:
    if requests <= 0:
        return {}
    return {role: round(sec / requests * 1e6, 1) for role, sec in cpu.items()}


def measure(
    target: Target, kind: str, settings: Settings, *, connections: int = 0, rate: float = 0
) -> dict[str, Any]:
    """One measurement, with how much CPU the rest of the machine used meanwhile: processes
    that are neither the target, the mocks nor the generator (other users of a shared
    machine) make the figures noisier, and the record says so."""
    # An overloaded target may still be draining the previous run's backlog: wait for it.
    waited = settle(target, limit_s=settings.settle_limit_s)
    mocks = [Proc(p.pid, "mock") for p in target.upstreams.procs]
    busy0, mock0, wall0 = system_busy_seconds(), cpu_by_role(mocks), time.monotonic()
    record = _measure(target, kind, settings, connections=connections, rate=rate)
    wall = time.monotonic() - wall0
    busy = system_busy_seconds() - busy0
    mock = cpu_delta(mock0, cpu_by_role(mocks)).get("mock", 0.0)
    generator = record["result"]["generator_cpu_s"] + record["warmup_generator_cpu_s"]
    known = sum(record["cpu_s"].values()) + mock + generator
    other = max(0.0, busy - known)
    record["settled_s"] = round(waited, 2)
    record["machine"] = {
        "wall_s": round(wall, 2),
        "busy_cpu_s": round(busy, 2),
        "mock_cpu_s": round(mock, 3),
        "other_cpu_s": round(other, 2),
        "other_share": round(other / (wall * (os.cpu_count() or 1)), 3),
    }
    return record


def _measure(
    target: Target, kind: str, settings: Settings, *, connections: int = 0, rate: float = 0
) -> dict[str, Any]:
    path, body = target.request(kind)
    request = target.raw_request(kind)
    procs = target.processes
    result: LoadResult
    warmup_generator_cpu = 0.0

    def failing_attempts() -> int:
        return target.upstreams.failing_attempts() if kind == FAILOVER else 0

    if rate:
        before, failing0 = cpu_by_role(procs), failing_attempts()
        result = loadgen.run(
            loadgen.open_loop(
                "127.0.0.1",
                target.port,
                request,
                rate,
                settings.rate_duration,
                settings.warmup,
            )
        )
        cpu = cpu_delta(before, cpu_by_role(procs))
        requests = result.total
    elif settings.wrk:
        url = f"http://127.0.0.1:{target.port}{path}"
        if settings.warmup:
            warm = run_wrk(
                settings.wrk,
                url,
                body,
                connections,
                settings.warmup,
                settings.wrk_threads,
                target.headers,
            )
            warmup_generator_cpu = warm.generator_cpu_s
        before, failing0 = cpu_by_role(procs), failing_attempts()
        result = run_wrk(
            settings.wrk,
            url,
            body,
            connections,
            settings.duration,
            settings.wrk_threads,
            target.headers,
        )
        cpu = cpu_delta(before, cpu_by_role(procs))
        requests = result.total
    else:
        before, failing0 = cpu_by_role(procs), failing_attempts()
        result = loadgen.run(
            loadgen.closed_loop(
                "127.0.0.1", target.port, [request], connections, settings.duration, settings.warmup
            )
        )
        cpu = cpu_delta(before, cpu_by_role(procs))
        requests = result.total
    record: dict[str, Any] = {
        "kind": kind,
        "mode": "open" if rate else "closed",
        "connections": connections,
        "rate": rate,
        "result": result.to_json(),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_us_per_request": _per_request_us(cpu, requests),
        "warmup_generator_cpu_s": warmup_generator_cpu,
    }
    if kind == FAILOVER:
        # Same basis as the CPU per request: every answer in the window, warm-up included
        # for the open loop.
        failing = failing_attempts() - failing0
        record["failing_attempts"] = failing
        record["failing_attempts_per_request"] = round(failing / requests, 4) if requests else None
    return record


def stream_capacity(target: Target) -> tuple[int, str]:
    """How many more proxied streams the target's Envoy can hold with the descriptors it has
    left (two per stream: client side and upstream side)."""
    cap, why = max_streams_for_fd_limit()
    for p in target.processes:
        if p.role == "envoy":
            limit, used = fd_limit(p.pid), open_fds(p.pid)
            room = max(0, (limit - used - 200) // 2)
            if limit and room < cap:
                cap = room
                why = (
                    f"Envoy (pid {p.pid}) has {used} of its {limit} file descriptors in use "
                    f"(idle upstream connections from the earlier runs included); "
                    f"each held stream needs two more"
                )
    return cap, why


def held_streams(target: Target, settings: Settings) -> dict[str, Any]:
    cap, why = stream_capacity(target)
    count = min(settings.streams, cap)
    request = target.raw_request(HOLD)
    procs = target.processes
    before = rss_by_role(procs)

    async def sample() -> dict[str, Any]:
        return {"rss_mib_by_role": rss_by_role(procs), "processes": memory(procs)}

    result = loadgen.run(
        loadgen.hold_streams(
            "127.0.0.1",
            target.port,
            request,
            count,
            settings.hold_s,
            first_byte_timeout=settings.first_byte_timeout,
            during_hold=sample,
        )
    )
    out: dict[str, Any] = result.to_json()
    out["rss_mib_before"] = before
    if count < settings.streams:
        out["capped"] = f"asked for {settings.streams}, tried {count}: {why}"
    return out


# -- a whole run -------------------------------------------------------------------------


def settle(target: Target, limit_s: float = 20.0) -> float:
    """Wait until the target's processes are idle (start-up work such as loading tokenizers
    done), so it does not compete with the first measurement; returns the seconds waited."""
    started = time.monotonic()
    last = sum(cpu_by_role(target.processes).values())
    while time.monotonic() - started < limit_s:
        time.sleep(0.25)
        now = sum(cpu_by_role(target.processes).values())
        if now - last < 0.02:  # under 8% of one core over the interval
            break
        last = now
    return time.monotonic() - started


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_target(
    plan: TargetPlan, rep: int, settings: Settings, floor_kinds: set[str] | None
) -> tuple[dict[str, Any], Availability]:
    """Start, measure and stop one target; `floor_kinds` limits a non-gateway target to the
    kinds some gateway serves."""
    target = plan.target
    run: dict[str, Any] = {"rep": rep, "target": target.name, "label": target.label}
    if target.baseline:
        run["baseline"] = list(target.baseline)
    avail = Availability()
    try:
        run["cold_start_s"] = round(target.start(timeout=30 if settings.smoke else 90), 3)
    except RuntimeError as exc:
        target.stop()
        reason = f"did not start: {exc}; log: {target.log_tail(600)}"
        log(f"{target.label}: {reason}")
        run["error"] = reason
        return run, Availability({k: reason for k in target.kinds})
    log(f"{target.label} rep {rep + 1}: first 200 after {run['cold_start_s']:.3f}s")
    try:
        run["settle_s"] = round(settle(target), 2)
        for kind in target.kinds:
            if floor_kinds is not None and kind not in floor_kinds:
                avail.kinds[kind] = "not needed: no gateway serves this kind"
                continue
            avail.kinds[kind] = probe(target, kind)
            if not avail.ok(kind):
                log(f"{target.label}: {kind} not available: {avail.kinds[kind][:200]}")
        measurements: list[dict[str, Any]] = []
        for kind in target.kinds:
            if not avail.ok(kind):
                continue
            for conns in settings.connections:
                m = measure(target, kind, settings, connections=conns)
                log(f"{target.label} {kind} closed c={conns}: {_brief(m)}")
                measurements.append(m)
            if plan.open_loop:
                for rate in plan.rates or settings.rates_for(kind):
                    m = measure(target, kind, settings, rate=rate)
                    log(f"{target.label} {kind} open {rate:g}/s: {_brief(m)}")
                    measurements.append(m)
        run["measurements"] = measurements
        run["memory"] = memory(target.processes)
        if not plan.hold or rep >= settings.hold_repetitions or settings.streams <= 0:
            pass
        elif not avail.ok("openai_stream"):
            run["hold_skipped"] = "streaming passthrough not available: " + avail.kinds.get(
                "openai_stream", "not probed"
            )
        else:
            settle(target)
            run["hold"] = held_streams(target, settings)
            h = run["hold"]
            log(
                f"{target.label} held streams: {h['established']}/{h['requested']} "
                f"established in {h['establish_s']}s, {h['alive_after_hold']} alive after "
                f"{h['hold_s']}s, errors {h['errors']}"
            )
    finally:
        target.stop()
    return run, avail


def _brief(m: dict[str, Any]) -> str:
    r = m["result"]
    lat = r["latency_ms"]
    errs = f" errors={r['errors']}" if any(r["errors"].values()) else ""
    if m.get("failing_attempts_per_request") is not None:
        errs += f" failing-deployment attempts/req={m['failing_attempts_per_request']:.3f}"
    if m.get("settled_s", 0) > 2:
        errs += f" (waited {m['settled_s']:.0f}s for the target to go idle first)"
    return (
        f"{r['throughput_rps']:.0f} req/s p50={lat.get('p50', float('nan')):.2f}ms "
        f"p99={lat.get('p99', float('nan')):.2f}ms cpu/req={m['cpu_us_per_request']}{errs}"
    )


def run_all(plans: list[TargetPlan], settings: Settings) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    availability: dict[str, dict[str, str]] = {}
    gateway_kinds: set[str] = set()
    for rep in range(settings.repetitions):
        for plan in plans:
            floor = None if plan.target.gateway else gateway_kinds or {"openai", "openai_stream"}
            run, avail = run_target(plan, rep, settings, floor)
            runs.append(run)
            availability.setdefault(plan.target.name, avail.kinds)
            if plan.target.gateway:
                gateway_kinds |= {k for k in plan.target.kinds if avail.ok(k)}
    return {"runs": runs, "availability": availability}


def save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
