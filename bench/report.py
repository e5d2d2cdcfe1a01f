"""Raw results to Markdown tables: each figure as the median and range over repetitions,
the gateway's figure next to bare Envoy's, and the difference."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from bench.mock_upstream import STREAM_CHUNKS
from bench.targets import ALL_KINDS, FAILOVER, KIND_LABELS, KINDS, STREAMING

Record = dict[str, Any]
NON_STREAMING = {"openai_stream": "openai", "anthropic_stream": "anthropic"}


# -- aggregation ---------------------------------------------------------------------------


def spread(values: Iterable[float | None]) -> tuple[float, float, float] | None:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt(values: Iterable[float | None], digits: int = 0, unit: str = "") -> str:
    s = spread(values)
    if s is None:
        return "n/a"
    med, lo, hi = s
    if lo == hi:
        return f"{med:,.{digits}f}{unit}"
    return f"{med:,.{digits}f}{unit} ({lo:,.{digits}f} to {hi:,.{digits}f})"


class Results:
    """Index over the raw runs: (target, kind, mode, connections-or-rate) -> rep -> record."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.runs: list[Record] = data["runs"]
        self.targets: list[tuple[str, str]] = []
        self.index: dict[tuple[str, str, str, float], dict[int, Record]] = {}
        # Scenario targets: the (target, kind) their figures are compared with.
        self.baselines: dict[str, tuple[str, str]] = {}
        for run in self.runs:
            if (run["target"], run["label"]) not in self.targets:
                self.targets.append((run["target"], run["label"]))
            if run.get("baseline"):
                self.baselines[run["target"]] = (run["baseline"][0], run["baseline"][1])
            for m in run.get("measurements", []):
                param = m["connections"] if m["mode"] == "closed" else m["rate"]
                key = (run["target"], m["kind"], m["mode"], float(param))
                self.index.setdefault(key, {})[run["rep"]] = m

    def label(self, target: str) -> str:
        return dict(self.targets).get(target, target)

    def gateways(self) -> list[str]:
        return [t for t, _ in self.targets if t != "bare"]

    def values(
        self, target: str, kind: str, mode: str, param: float, get: Callable[[Record], Any]
    ) -> dict[int, float | None]:
        out: dict[int, float | None] = {}
        for rep, m in self.index.get((target, kind, mode, float(param)), {}).items():
            try:
                v = get(m)
            except (KeyError, TypeError):
                v = None
            out[rep] = float(v) if v is not None else None
        return out

    def added(
        self,
        target: str,
        kind: str,
        mode: str,
        param: float,
        get: Callable[[Record], Any],
        floor: tuple[str, str] | None = None,
    ) -> list[float | None]:
        """Per repetition, the target's figure minus bare Envoy's in the same repetition
        (or minus that of `floor`, another (target, kind))."""
        mine = self.values(target, kind, mode, param, get)
        floor_target, floor_kind = floor or ("bare", kind)
        floor_values = self.values(floor_target, floor_kind, mode, param, get)
        return [
            (v - f) if v is not None and (f := floor_values.get(rep)) is not None else None
            for rep, v in mine.items()
        ]

    def per_event(self, target: str, kind: str, mode: str, param: float, role: str) -> list[float]:
        """Marginal CPU per SSE event of a streaming kind: its CPU per request minus that of
        the same provider's non-streaming request at the same load, same repetition, over
        the events in one stream."""
        base = NON_STREAMING.get(kind)
        if base is None:
            return []
        mine = self.values(target, kind, mode, param, cpu_getter(role))
        plain = self.values(target, base, mode, param, cpu_getter(role))
        return [
            (v - p) / STREAM_CHUNKS
            for rep, v in mine.items()
            if v is not None and (p := plain.get(rep)) is not None
        ]

    def has(self, target: str, kind: str, mode: str) -> bool:
        return any(k[0] == target and k[1] == kind and k[2] == mode for k in self.index)


def lat_getter(metric: str, q: str) -> Callable[[Record], Any]:
    return lambda m: m["result"][metric].get(q)


def rps(m: Record) -> Any:
    return m["result"]["throughput_rps"]


def cpu_getter(role: str) -> Callable[[Record], Any]:
    return lambda m: m.get("cpu_us_per_request", {}).get(role)


def error_count(m: Record) -> int:
    return sum(int(n) for n in m["result"]["errors"].values())


def error_rate(m: Record) -> Any:
    """Share of the measured requests the client got no 2xx answer for."""
    errors = error_count(m)
    asked = m["result"]["ok"] + errors
    return errors / asked if asked else None


def failing_per_request(m: Record) -> Any:
    return m.get("failing_attempts_per_request")


# -- tables ----------------------------------------------------------------------------------


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def availability_table(res: Results) -> str:
    avail: dict[str, dict[str, str]] = res.data.get("availability", {})
    header = ["scenario", *(res.label(t) for t, _ in res.targets)]
    rows = []
    for kind in ALL_KINDS:
        if kind not in KINDS and not any(kind in avail.get(t, {}) for t in res.gateways()):
            continue
        row = [KIND_LABELS[kind]]
        for t, _ in res.targets:
            status = avail.get(t, {}).get(kind)
            if status is None:
                # A scenario target (failover) serves only its scenario, the others not it.
                row.append("—" if kind == FAILOVER or t in res.baselines else "**no**: not run")
            else:
                row.append("yes" if status == "ok" else "**no**: " + _short(status))
        rows.append(row)
    return md_table(header, rows)


def _short(text: str, n: int = 160) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def throughput_table(res: Results) -> str:
    conns = sorted({k[3] for k in res.index if k[2] == "closed"})
    # Scenario targets (failover) have a table of their own.
    targets = [(t, label) for t, label in res.targets if t not in res.baselines]
    header = ["scenario", "connections", *(label for _, label in targets)]
    rows = []
    for kind in KINDS:
        for c in conns:
            if not any(res.has(t, kind, "closed") for t, _ in targets):
                continue
            row = [KIND_LABELS[kind], f"{c:g}"]
            for t, _ in targets:
                row.append(fmt(res.values(t, kind, "closed", c, rps).values()))
            rows.append(row)
    return md_table(header, rows)


def latency_table(res: Results, metric: str = "latency_ms") -> str:
    rates = sorted({k[3] for k in res.index if k[2] == "open"})
    gateways = [
        t
        for t in res.gateways()
        if t not in res.baselines and any(res.has(t, k, "open") for k in KINDS)
    ]
    header = ["scenario", "offered req/s", "bare Envoy p50 / p99 (ms)"]
    for t in gateways:
        header += [f"{res.label(t)} p50 / p99 (ms)", f"{res.label(t)} added p50 / p99 (ms)"]
    rows = []
    for kind in KINDS:
        if metric == "ttfb_ms" and kind not in STREAMING:
            continue
        for rate in rates:
            if not any(res.has(t, kind, "open") for t in gateways):
                continue
            p50, p99 = lat_getter(metric, "p50"), lat_getter(metric, "p99")
            row = [
                KIND_LABELS[kind],
                f"{rate:g}",
                f"{fmt(res.values('bare', kind, 'open', rate, p50).values(), 2)} / "
                f"{fmt(res.values('bare', kind, 'open', rate, p99).values(), 2)}",
            ]
            for t in gateways:
                row.append(
                    f"{fmt(res.values(t, kind, 'open', rate, p50).values(), 2)} / "
                    f"{fmt(res.values(t, kind, 'open', rate, p99).values(), 2)}"
                )
                row.append(
                    f"{fmt(res.added(t, kind, 'open', rate, p50), 2)} / "
                    f"{fmt(res.added(t, kind, 'open', rate, p99), 2)}"
                )
            rows.append(row)
    return md_table(header, rows)


def open_loop_health_table(res: Results) -> str:
    """What the generator achieved: offered vs answered rate, errors, its own send lag."""

    def lag(m: Record, q: str) -> Any:
        return m["result"]["send_lag_ms"].get(q)

    header = [
        "target",
        "scenario",
        "offered req/s",
        "answered in the window, req/s",
        "errors",
        "send lag p50/p99 (ms)",
    ]
    rows = []
    for t, label in res.targets:
        for kind in ALL_KINDS:
            for key, reps in sorted(res.index.items()):
                if key[:3] != (t, kind, "open"):
                    continue
                errors: dict[str, int] = {}
                for m in reps.values():
                    for name, n in m["result"]["errors"].items():
                        if n:
                            errors[name] = errors.get(name, 0) + n
                rows.append(
                    [
                        label,
                        KIND_LABELS[kind],
                        f"{key[3]:g}",
                        fmt(m["result"]["throughput_rps"] for m in reps.values()),
                        ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0",
                        f"{fmt((lag(m, 'p50') for m in reps.values()), 2)} / "
                        f"{fmt((lag(m, 'p99') for m in reps.values()), 2)}",
                    ]
                )
    return md_table(header, rows)


def noise_line(res: Results) -> str:
    """How busy the rest of the machine was during the measurements."""
    shares = []
    noisy = []
    for run in res.runs:
        for m in run.get("measurements", []):
            share = m.get("machine", {}).get("other_share")
            if share is None:
                continue
            shares.append(share * 100)
            if share > 0.10:
                load = f"{m['connections']} conns" if m["mode"] == "closed" else f"{m['rate']:g}/s"
                noisy.append(f"{run['label']} rep {run['rep'] + 1} {m['kind']} {load}")
    if not shares:
        return ""
    text = (
        "CPU used by processes outside the benchmark (other users of the machine) during "
        f"the measurements: median {statistics.median(shares):.1f}% of the machine, "
        f"max {max(shares):.1f}%."
    )
    if noisy:
        text += (
            f" Over 10% in {len(noisy)} of {len(shares)} measurements: "
            + "; ".join(noisy[:12])
            + ("; ..." if len(noisy) > 12 else "")
            + "."
        )
    return text


def cpu_table(res: Results) -> str:
    header = [
        "target",
        "scenario",
        "load",
        "role",
        "CPU µs / request",
        f"marginal CPU µs / SSE event (vs non-streaming, {STREAM_CHUNKS} events)",
    ]
    rows = []
    for t, label in res.targets:
        roles = sorted(
            {
                r
                for (tt, *_), reps in res.index.items()
                if tt == t
                for m in reps.values()
                for r in m["cpu_s"]
            }
        )
        for kind in ALL_KINDS:
            loads = [
                ("closed", c)
                for c in sorted({k[3] for k in res.index if k[:3] == (t, kind, "closed")})
            ]
            loads += [
                ("open", r) for r in sorted({k[3] for k in res.index if k[:3] == (t, kind, "open")})
            ]
            for mode, param in loads:
                load = f"{param:g} conns" if mode == "closed" else f"{param:g} req/s"
                for role in roles:
                    per_req = res.values(t, kind, mode, param, cpu_getter(role)).values()
                    per_chunk = (
                        fmt(res.per_event(t, kind, mode, param, role), 1)
                        if kind in STREAMING
                        else ""
                    )
                    rows.append([label, KIND_LABELS[kind], load, role, fmt(per_req, 1), per_chunk])
    return md_table(header, rows)


def memory_table(res: Results) -> str:
    header = ["target", "process", "peak RSS, MiB (VmHWM)"]
    rows = []
    for t, label in res.targets:
        by_proc: dict[str, list[float]] = {}
        totals: dict[str, list[float]] = {}
        for run in res.runs:
            if run["target"] != t or "memory" not in run:
                continue
            counts: dict[str, int] = {}
            sums: dict[str, float] = {}
            for p in run["memory"]:
                counts[p["role"]] = counts.get(p["role"], 0) + 1
                name = f"{p['role']} #{counts[p['role']]}"
                by_proc.setdefault(name, []).append(p["peak_rss_mib"])
                sums[p["role"]] = sums.get(p["role"], 0.0) + p["peak_rss_mib"]
            for role, total in sums.items():
                if counts[role] > 1:
                    totals.setdefault(f"{role} (all {counts[role]})", []).append(total)
        for name, vals in [*sorted(by_proc.items()), *sorted(totals.items())]:
            rows.append([label, name, fmt(vals, 1)])
    return md_table(header, rows)


def cold_start_table(res: Results) -> str:
    header = ["target", "spawn → first 200 (ms)"]
    rows = []
    for t, label in res.targets:
        vals = [
            r["cold_start_s"] * 1000 for r in res.runs if r["target"] == t and "cold_start_s" in r
        ]
        rows.append([label, fmt(vals, 0)])
    return md_table(header, rows)


def hold_table(res: Results) -> str:
    header = [
        "target",
        "asked",
        "established",
        "alive after hold",
        "time to open (s)",
        "RSS during hold, MiB by role",
        "RSS before, MiB",
        "errors / notes",
    ]
    rows = []
    for run in res.runs:
        h = run.get("hold")
        if not h:
            continue
        during = h.get("during_hold", {}).get("rss_mib_by_role", {})
        notes = ", ".join(f"{k}: {v}" for k, v in h["errors"].items())
        if h.get("capped"):
            notes = (notes + "; " if notes else "") + h["capped"]
        rows.append(
            [
                run["label"],
                str(h["requested"]),
                str(h["established"]),
                f"{h['alive_after_hold']} (after {h['hold_s']:g}s)",
                f"{h['establish_s']:.1f}",
                ", ".join(f"{k} {v:.0f}" for k, v in during.items()),
                ", ".join(f"{k} {v:.0f}" for k, v in h.get("rss_mib_before", {}).items()),
                _short(notes or "none", 200),
            ]
        )
    return md_table(header, rows) if rows else "_not run_"


# -- the failover scenario -------------------------------------------------------------------


def failover_targets(res: Results) -> list[str]:
    """Targets measured on the failover group, bare Envoy (its own retry) first."""
    out = [t for t, _ in res.targets if any(k[:2] == (t, FAILOVER) for k in res.index)]
    return sorted(out, key=lambda t: t != "bare")


def _pct(values: Iterable[float | None]) -> str:
    return fmt((v * 100 if v is not None else None for v in values), 2, "%")


def _pair(res: Results, target: str, kind: str, rate: float) -> str:
    p50, p99 = lat_getter("latency_ms", "p50"), lat_getter("latency_ms", "p99")
    return (
        f"{fmt(res.values(target, kind, 'open', rate, p50).values(), 2)} / "
        f"{fmt(res.values(target, kind, 'open', rate, p99).values(), 2)}"
    )


def _added_pair(res: Results, target: str, rate: float, floor: tuple[str, str] | None) -> str:
    if floor is None:
        return "—"
    p50, p99 = lat_getter("latency_ms", "p50"), lat_getter("latency_ms", "p99")
    return (
        f"{fmt(res.added(target, FAILOVER, 'open', rate, p50, floor), 2)} / "
        f"{fmt(res.added(target, FAILOVER, 'open', rate, p99, floor), 2)}"
    )


def failover_table(res: Results) -> str:
    """Closed-loop throughput and fixed-rate latency of the failover group, next to the
    same LLMux's healthy group (its baseline) and bare Envoy doing the same failover."""
    targets = failover_targets(res)
    if not targets:
        return "_not run_"
    baselines = list(dict.fromkeys(res.baselines[t] for t in targets if t in res.baselines))
    rows_of: list[tuple[str, str, str]] = [
        (t, FAILOVER, res.label(t) + (" (Envoy's own retry)" if t == "bare" else ""))
        for t in targets
    ]
    rows_of[1:1] = [(t, k, f"{res.label(t)}, healthy group ({k})") for t, k in baselines]

    def share_cells(t: str, kind: str, mode: str, param: float) -> list[str]:
        if kind != FAILOVER:
            return ["—", "—"]
        return [
            _pct(res.values(t, kind, mode, param, error_rate).values()),
            fmt(res.values(t, kind, mode, param, failing_per_request).values(), 2),
        ]

    conns = sorted({k[3] for k in res.index if k[1] == FAILOVER and k[2] == "closed"})
    closed = []
    for c in conns:
        for t, kind, label in rows_of:
            if res.has(t, kind, "closed"):
                answered = fmt(res.values(t, kind, "closed", c, rps).values())
                closed.append([label, f"{c:g}", answered, *share_cells(t, kind, "closed", c)])
    rates = sorted({k[3] for k in res.index if k[1] == FAILOVER and k[2] == "open"})
    opened = []
    for rate in rates:
        for t, kind, label in rows_of:
            if not res.has(t, kind, "open"):
                continue
            failover = kind == FAILOVER
            baseline = res.baselines.get(t)
            opened.append(
                [
                    label,
                    f"{rate:g}",
                    _pair(res, t, kind, rate),
                    _added_pair(res, t, rate, baseline) if failover else "—",
                    _added_pair(res, t, rate, ("bare", FAILOVER))
                    if failover and t != "bare"
                    else "—",
                    *share_cells(t, kind, "open", rate),
                ]
            )
    shares = ["client error rate", "attempts on the failing deployment per request"]
    return (
        md_table(["target", "connections", "answered req/s", *shares], closed)
        + "\n\n"
        + md_table(
            [
                "target",
                "offered req/s",
                "p50 / p99 (ms)",
                "added over the healthy group p50 / p99 (ms)",
                "added over bare Envoy's failover p50 / p99 (ms)",
                *shares,
            ],
            opened,
        )
    )


def failover_summary(res: Results) -> str:
    """One paragraph: what the failover figures show (medians over the repetitions)."""
    targets = [t for t in failover_targets(res) if t in res.baselines]
    if not targets:
        return ""
    rate = min((k[3] for k in res.index if k[1] == FAILOVER and k[2] == "open"), default=None)
    conns = max((k[3] for k in res.index if k[1] == FAILOVER and k[2] == "closed"), default=None)
    p50, p99 = lat_getter("latency_ms", "p50"), lat_getter("latency_ms", "p99")

    def median(values: Iterable[float | None]) -> float | None:
        s = spread(values)
        return s[0] if s else None

    errors: list[float] = []
    parts = []
    failing_of: dict[str, float | None] = {}
    for t in targets:
        base = res.baselines[t]
        failing: list[float | None] = []
        for key, reps in res.index.items():
            if key[:2] == (t, FAILOVER):
                errors += [e for m in reps.values() if (e := error_rate(m)) is not None]
                failing += [failing_per_request(m) for m in reps.values()]
        failing_of[t] = fail = median(failing)
        text = res.label(t).removeprefix("LLMux failover, ")
        if fail is not None:
            text += f": {fail:.2f} attempts"
        if rate is not None:
            a50 = median(res.added(t, FAILOVER, "open", rate, p50, base))
            a99 = median(res.added(t, FAILOVER, "open", rate, p99, base))
            if a50 is not None and a99 is not None:
                text += f", p50 {a50:+.2f} ms and p99 {a99:+.2f} ms at {rate:g} req/s"
        if conns is not None:
            mine = median(res.values(t, FAILOVER, "closed", conns, rps).values())
            healthy = median(res.values(base[0], base[1], "closed", conns, rps).values())
            if mine is not None and healthy:
                change = (mine / healthy - 1) * 100
                text += f", closed-loop throughput {change:+.0f}% ({conns:g} connections)"
        parts.append(text)
    worst = max(errors, default=None)
    if worst is None:
        answered = "the client figures are missing"
    elif worst == 0:
        answered = "every request was answered (no client errors)"
    else:
        answered = f"yet the client saw errors (up to {worst * 100:.2f}% of a measurement)"
    text = (
        "What it shows: with `num_retries: 1` a request that meets the failing deployment is "
        f"retried on the healthy one, and {answered}. Per variant, the attempts that reached "
        "the failing deployment per request, then what the failed attempt and the retry (a "
        "jittered back-off of up to 10 ms, a second upstream attempt through the processor) "
        "cost against the same LLMux's healthy group: " + "; ".join(parts) + "."
    )
    worst_case = next((failing_of[t] for t in targets if t.endswith("-no-cooldowns")), None)
    if worst_case is not None and worst_case > 0.6:
        text += (
            " Without cooldowns and breaker more requests start on the failing deployment "
            "than the half a random pick would send there: LLMux balances by least request, "
            "and a deployment that fails at once is the least busy one (bare Envoy here uses "
            "round robin); the cooldowns exist for exactly this."
        )
    defaults = next((failing_of[t] for t in targets if t.endswith("-defaults")), None)
    if defaults is not None and worst_case is not None and defaults < worst_case / 4:
        text += (
            " With the defaults the failing deployment is taken out of the rotation after a "
            "few failures, and most of the cost goes with it."
        )
    return text


def keys_targets(res: Results) -> list[str]:
    return [t for t, _ in res.targets if t.startswith("keys-")]


def keys_table(res: Results) -> str:
    """The virtual-key scenarios next to the same LLMux with the master key (their
    baseline): throughput, latency and the worker's CPU per request, and what each adds."""
    targets = keys_targets(res)
    if not targets:
        return "_not run_"
    reference = res.baselines[targets[0]][0]
    rows_of = [
        (reference, f"{res.label(reference)} (master key)"),
        *((t, res.label(t)) for t in targets),
    ]
    kinds = [k for k in KINDS if any(res.has(t, k, "closed") for t in targets)]
    conns = sorted({k[3] for k in res.index if k[0] in targets and k[2] == "closed"})
    rates = sorted({k[3] for k in res.index if k[0] in targets and k[2] == "open"})
    worker = cpu_getter("extproc")
    closed = []
    for kind in kinds:
        for c in conns:
            for t, label in rows_of:
                mine = res.values(t, kind, "closed", c, rps)
                ref = res.values(reference, kind, "closed", c, rps)
                change = [
                    (v / r - 1) * 100 if v is not None and (r := ref.get(rep)) else None
                    for rep, v in mine.items()
                ]
                closed.append(
                    [
                        label,
                        KIND_LABELS[kind],
                        f"{c:g}",
                        fmt(mine.values()),
                        "—" if t == reference else fmt(change, 1, "%"),
                    ]
                )
    opened = []
    p50, p99 = lat_getter("latency_ms", "p50"), lat_getter("latency_ms", "p99")
    for kind in kinds:
        for rate in rates:
            for t, label in rows_of:
                floor = (reference, kind)
                own = t == reference
                opened.append(
                    [
                        label,
                        KIND_LABELS[kind],
                        f"{rate:g}",
                        f"{fmt(res.values(t, kind, 'open', rate, p50).values(), 2)} / "
                        f"{fmt(res.values(t, kind, 'open', rate, p99).values(), 2)}",
                        "—"
                        if own
                        else f"{fmt(res.added(t, kind, 'open', rate, p50, floor), 2)} / "
                        f"{fmt(res.added(t, kind, 'open', rate, p99, floor), 2)}",
                        fmt(res.values(t, kind, "open", rate, worker).values(), 0),
                        "—" if own else fmt(res.added(t, kind, "open", rate, worker, floor), 0),
                    ]
                )
    return (
        md_table(["target", "scenario", "connections", "req/s", "change"], closed)
        + "\n\n"
        + md_table(
            [
                "target",
                "scenario",
                "offered req/s",
                "p50 / p99 (ms)",
                "added over the master key p50 / p99 (ms)",
                "ext_proc CPU per request (µs)",
                "added (µs)",
            ],
            opened,
        )
    )
