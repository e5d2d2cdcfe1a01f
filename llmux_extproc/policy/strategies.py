"""LiteLLM's routing strategies, expressed as endpoint load-balancing weights.

LiteLLM picks one deployment per request. Here Envoy picks, by weighted round robin over the
endpoints the supervisor pushes, so each strategy answers "what weight should each deployment
of a group have now". A weight is an int in 1..1_000_000 (Envoy's range); 0 means "not
routable now" and the caller marks that endpoint unhealthy.

Since weights are pushed from time to time and not recomputed per request, a strategy that
is an argmin in LiteLLM (lowest latency, lowest usage, lowest cost) is a strong preference
here, never "everything to one deployment between two updates" unless LiteLLM itself would
never pick the others.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmux_extproc.policy.health import Outcome

MAX_WEIGHT = 1_000_000  # Envoy's load_balancing_weight upper bound we use as "full share"


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    id: str
    # As in llmux_extproc/config.py: weight 1 everywhere means "not set".
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None


class Strategy(Protocol):
    def weights(
        self, deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]
    ) -> dict[str, int]:
        """Envoy load_balancing_weight per deployment id; 0 means "not routable now"."""
        ...


def _is_routable(routable: Mapping[str, bool], dep_id: str) -> bool:
    # A deployment the health tracker does not list has nothing against it.
    return routable.get(dep_id, True)


def _to_eds(raw: Mapping[str, float]) -> dict[str, int]:
    """Scale non-negative shares to Envoy weights: the largest gets MAX_WEIGHT, every other
    positive share at least 1 (a tiny share must not round to "unhealthy"), 0 stays 0."""
    top = max((v for v in raw.values() if v > 0), default=0.0)
    out: dict[str, int] = {}
    for dep_id, value in raw.items():
        if value <= 0 or top <= 0:
            out[dep_id] = 0
        else:
            out[dep_id] = max(1, min(MAX_WEIGHT, round(value / top * MAX_WEIGHT)))
    return out


def _equal(deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]) -> dict[str, int]:
    return {d.id: MAX_WEIGHT if _is_routable(routable, d.id) else 0 for d in deployments}


class SimpleShuffle:
    """LiteLLM's default, litellm/router_strategy/simple_shuffle.py: a random pick weighted
    by `weight` when set, else by `rpm`, else by `tpm`, else uniform.

    LiteLLM decides which field to use from the first healthy deployment and treats the
    field missing on the others as 0 (never picked). Like llmux_extproc/router.py, this uses
    `weight` when any deployment sets it (differs from 1), and `rpm`/`tpm` only when every
    deployment sets it, so the choice does not depend on which deployment is healthy first.
    """

    def weights(
        self, deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]
    ) -> dict[str, int]:
        shares = _configured_shares(deployments)
        raw = {
            d.id: max(0.0, shares[d.id]) if _is_routable(routable, d.id) else 0.0
            for d in deployments
        }
        if not any(v > 0 for v in raw.values()):
            # Every routable deployment has weight 0: LiteLLM's random.choices would raise;
            # share equally rather than take the group down.
            return _equal(deployments, routable)
        return _to_eds(raw)


def _configured_shares(deployments: Sequence[DeploymentInfo]) -> dict[str, float]:
    if any(d.weight != 1 for d in deployments):
        return {d.id: float(d.weight) for d in deployments}
    rpms = [d.rpm for d in deployments]
    if all(rpms):
        return {d.id: float(d.rpm or 0) for d in deployments}
    tpms = [d.tpm for d in deployments]
    if all(tpms):
        return {d.id: float(d.tpm or 0) for d in deployments}
    return {d.id: 1.0 for d in deployments}


class LeastBusy(SimpleShuffle):
    """ "least-busy": every routable deployment gets the same weight and Envoy's
    LEAST_REQUEST load balancer does the work (fewest active requests, which is what
    LiteLLM's least_busy.py counts by hand)."""

    def weights(
        self, deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]
    ) -> dict[str, int]:
        return _equal(deployments, routable)


# LiteLLM's lowest_latency.py appends a 1000 s latency for a timed-out attempt.
TIMEOUT_PENALTY_S = 1000.0


class LatencyBased:
    """ "latency-based-routing", litellm/router_strategy/lowest_latency.py.

    Per deployment, LiteLLM keeps the last `max_latency_list_size` (10) latencies of
    successful attempts (seconds per output token when the usage is known, else seconds) and
    their time to first token for streams; a timeout adds a 1000 s penalty. It ranks on the
    average TTFT when routing a stream (if there are TTFT samples) and on the average latency
    otherwise, and picks at random among the deployments within `lowest_latency_buffer`
    (a fraction: lowest * (1 + buffer)) of the fastest. A deployment never measured counts as
    latency 0, so it is tried first.

    As weights: the deployments within the buffer, and the unmeasured ones, share the
    traffic equally (`fast_weight`); the slower ones keep a token `slow_weight` so they are
    still measured and can win back traffic. Weights are not per request, so TTFT is used
    when every measured candidate has TTFT samples, total latency otherwise.

    Deviations, on purpose: a real rolling window (LiteLLM's full list keeps the first nine
    samples and overwrites the tenth); samples older than `ttl_s` are dropped one by one
    (LiteLLM's whole map expires `ttl` after its last write); the timeout penalty also goes
    into the TTFT window, else a deployment timing out on streams keeps its old good TTFT.
    """

    def __init__(
        self,
        lowest_latency_buffer: float = 0.0,
        ttl_s: float = 3600.0,
        max_latency_list_size: int = 10,
        fast_weight: int = 1000,
        slow_weight: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lowest_latency_buffer < 0 or ttl_s <= 0 or max_latency_list_size < 1:
            raise ValueError("latency-based-routing: buffer >= 0, ttl > 0, list size >= 1")
        if not 1 <= slow_weight <= fast_weight <= MAX_WEIGHT:
            raise ValueError("latency-based-routing: need 1 <= slow_weight <= fast_weight")
        self.buffer = lowest_latency_buffer
        self.ttl_s = ttl_s
        self.size = max_latency_list_size
        self.fast_weight = fast_weight
        self.slow_weight = slow_weight
        self._clock = clock
        self._latency: dict[str, deque[tuple[float, float]]] = {}
        self._ttft: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, outcome: Outcome) -> None:
        now = self._clock()
        dep = outcome.deployment
        if outcome.status in (0, 408):
            self._push(self._latency, dep, now, TIMEOUT_PENALTY_S)
            if self._ttft.get(dep):
                self._push(self._ttft, dep, now, TIMEOUT_PENALTY_S)
            return
        if not 200 <= outcome.status < 400:
            return  # LiteLLM only measures successes (and penalises timeouts)
        tokens = outcome.completion_tokens
        per = float(tokens) if tokens is not None and tokens > 0 else 1.0
        self._push(self._latency, dep, now, outcome.latency_s / per)
        if outcome.stream and outcome.ttft_s is not None:
            self._push(self._ttft, dep, now, outcome.ttft_s / per)

    def average(self, deployment: str) -> tuple[float | None, float | None]:
        """(average latency, average TTFT) over the live samples; None when unmeasured."""
        now = self._clock()
        return (
            self._mean(self._latency.get(deployment), now),
            self._mean(self._ttft.get(deployment), now),
        )

    def weights(
        self, deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]
    ) -> dict[str, int]:
        now = self._clock()
        candidates = [d.id for d in deployments if _is_routable(routable, d.id)]
        latency = {c: self._mean(self._latency.get(c), now) for c in candidates}
        ttft = {c: self._mean(self._ttft.get(c), now) for c in candidates}
        measured = [c for c in candidates if latency[c] is not None]
        use_ttft = bool(measured) and all(ttft[c] is not None for c in measured)
        scores: dict[str, float] = {}
        for c in measured:
            value = ttft[c] if use_ttft else latency[c]
            assert value is not None
            scores[c] = value
        threshold = min(scores.values(), default=0.0) * (1.0 + self.buffer)
        out = {d.id: 0 for d in deployments}
        for c in candidates:
            score = scores.get(c)
            fast = score is None or score <= threshold
            out[c] = self.fast_weight if fast else self.slow_weight
        return out

    def _push(
        self, table: dict[str, deque[tuple[float, float]]], dep: str, now: float, value: float
    ) -> None:
        window = table.get(dep)
        if window is None:
            window = table[dep] = deque(maxlen=self.size)
        window.append((now, value))

    def _mean(self, window: deque[tuple[float, float]] | None, now: float) -> float | None:
        if not window:
            return None
        horizon = now - self.ttl_s
        while window and window[0][0] <= horizon:
            window.popleft()
        if not window:
            return None
        return sum(v for _, v in window) / len(window)


def _minute(now: float) -> int:
    # LiteLLM keys usage on the UTC calendar minute ("%H-%M"); with a monotonic clock the
    # buckets are 60 s long but not aligned to wall-clock minutes.
    return math.floor(now / 60.0)


@dataclass(slots=True)
class _Usage:
    minute: int
    requests: int = 0
    tokens: int = 0


class UsageBased:
    """ "usage-based-routing-v2", litellm/router_strategy/lowest_tpm_rpm_v2.py.

    LiteLLM counts, per deployment and per minute, the requests sent (in its pre-call check)
    and the total tokens of successful answers; it skips a deployment whose requests reached
    its `rpm` or whose tokens reached its `tpm` (plus the new request's input tokens, which
    are unknown here), and picks the lowest-TPM deployment of the rest. When every
    deployment is full LiteLLM answers 429 "No deployments available"; here every weight is
    then 0 and the caller decides (`next_change()` says when the minute rolls over).

    As weights: a deployment's share is (lowest + s) / (its tokens + s), s =
    `smoothing_tokens`, so the least-used deployment gets the most traffic and the others
    less the more they used, without flapping at low counts.
    """

    def __init__(
        self, smoothing_tokens: float = 1000.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if smoothing_tokens <= 0:
            raise ValueError("usage-based-routing: smoothing_tokens must be > 0")
        self.smoothing = smoothing_tokens
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def observe_request(self, deployment: str) -> None:
        self._current(deployment, self._clock()).requests += 1

    def observe_tokens(self, deployment: str, tokens: int) -> None:
        if tokens > 0:
            self._current(deployment, self._clock()).tokens += tokens

    def usage(self, deployment: str) -> tuple[int, int]:
        """(requests, tokens) of `deployment` in the current minute."""
        u = self._current(deployment, self._clock())
        return u.requests, u.tokens

    def next_change(self) -> float | None:
        """Start of the next minute if anything was counted in this one, else None."""
        now = self._clock()
        minute = _minute(now)
        if any(u.minute == minute and (u.requests or u.tokens) for u in self._usage.values()):
            return (minute + 1) * 60.0
        return None

    def weights(
        self, deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]
    ) -> dict[str, int]:
        now = self._clock()
        used: dict[str, int] = {}
        for d in deployments:
            if not _is_routable(routable, d.id):
                continue
            u = self._current(d.id, now)
            full = (d.rpm is not None and u.requests >= d.rpm) or (
                d.tpm is not None and u.tokens >= d.tpm
            )
            if not full:
                used[d.id] = u.tokens
        lowest = min(used.values(), default=0)
        raw = {
            d.id: (lowest + self.smoothing) / (used[d.id] + self.smoothing) if d.id in used else 0.0
            for d in deployments
        }
        return _to_eds(raw)

    def _current(self, deployment: str, now: float) -> _Usage:
        minute = _minute(now)
        u = self._usage.get(deployment)
        if u is None or u.minute != minute:
            u = self._usage[deployment] = _Usage(minute)
        return u


# LiteLLM's lowest_cost.py: a deployment whose model is not in the cost map costs $5 per
# input token and $5 per output token, i.e. it comes last.
UNKNOWN_COST_PER_TOKEN = 5.0


class CostBased:
    """ "cost-based-routing", litellm/router_strategy/lowest_cost.py: the routable
    deployment with the lowest input_cost_per_token + output_cost_per_token.

    The cheapest deployments (equal cost share; LiteLLM takes the first of equals) get
    MAX_WEIGHT, the others 1, so Envoy still has somewhere to retry when the cheapest fails
    before the health tracker excludes it.
    """

    def weights(
        self, deployments: Sequence[DeploymentInfo], routable: Mapping[str, bool]
    ) -> dict[str, int]:
        costs = {d.id: cost_per_token(d) for d in deployments if _is_routable(routable, d.id)}
        cheapest = min(costs.values(), default=0.0)
        out: dict[str, int] = {}
        for d in deployments:
            if d.id not in costs:
                out[d.id] = 0
            elif math.isclose(costs[d.id], cheapest, rel_tol=1e-9, abs_tol=1e-15):
                out[d.id] = MAX_WEIGHT
            else:
                out[d.id] = 1
        return out


def cost_per_token(d: DeploymentInfo) -> float:
    i = d.input_cost_per_token
    o = d.output_cost_per_token
    return (UNKNOWN_COST_PER_TOKEN if i is None else i) + (
        UNKNOWN_COST_PER_TOKEN if o is None else o
    )


STRATEGY_NAMES = (
    "simple-shuffle",
    "least-busy",
    "latency-based-routing",
    "usage-based-routing-v2",
    "usage-based-routing",
    "cost-based-routing",
)


def make_strategy(
    name: str, args: Mapping[str, Any], clock: Callable[[], float] = time.monotonic
) -> Strategy:
    """The strategy for LiteLLM's `routing_strategy` name and `routing_strategy_args`.

    "least-busy" returns `LeastBusy`, equal weights: Envoy's LEAST_REQUEST load balancer
    does the work, so the caller should configure the cluster with it.
    "usage-based-routing" (LiteLLM's deprecated v1) is an alias of v2.
    """
    args = dict(args)

    def take(key: str, default: float) -> float:
        value = args.pop(key, default)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: routing_strategy_args.{key} must be a number") from None

    strategy: Strategy
    if name == "simple-shuffle":
        strategy = SimpleShuffle()
    elif name == "least-busy":
        strategy = LeastBusy()
    elif name == "latency-based-routing":
        strategy = LatencyBased(
            lowest_latency_buffer=take("lowest_latency_buffer", 0.0),
            ttl_s=take("ttl", 3600.0),
            max_latency_list_size=int(take("max_latency_list_size", 10)),
            clock=clock,
        )
    elif name in ("usage-based-routing-v2", "usage-based-routing"):
        # LiteLLM's `ttl` here is the expiry of its per-minute counters (60 s); the minute
        # buckets make it moot, so it is accepted and ignored.
        args.pop("ttl", None)
        strategy = UsageBased(clock=clock)
    elif name == "cost-based-routing":
        strategy = CostBased()
    else:
        raise ValueError(f"unknown routing_strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")
    if args:
        raise ValueError(f"{name}: unknown routing_strategy_args {sorted(args)}")
    return strategy
