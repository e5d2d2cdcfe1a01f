"""Per-deployment health: LiteLLM's cooldowns and the seed's circuit breaker.

Everything here is driven by `Outcome`s (one per upstream attempt) and a clock; nothing does
I/O. The caller turns `DeploymentHealth.routable()` into the endpoints' `health_status` and calls
`tick()` at `next_change()` so timed transitions (cooldown end, open -> half-open) happen.

Cooldown follows LiteLLM's router (litellm/router_utils/cooldown_handlers.py, constants in
litellm/constants.py). LiteLLM has two rules and picks one per router:

- the default, "v2" rule, used while `allowed_fails` is left at LiteLLM's default (3) and no
  `allowed_fails_policy` is set (`_is_allowed_fails_set_on_router` compares against the
  default, so an explicit `allowed_fails: 3` also selects it): a failing attempt cools its
  deployment down when it was a 429 and the group has other deployments; or when more than
  50% of the deployment's attempts this minute failed, with at least 5 attempts, and the
  group has other deployments; or when every attempt failed with at least 1000 attempts
  this minute (even if alone); or when the status is one LiteLLM never retries (401, 404:
  `litellm._should_retry` is false), even if the deployment is alone in its group;
- the "v1" rule, used as soon as `allowed_fails` differs from 3 or `allowed_fails_policy` is
  set: cool down when the failures counted this minute exceed `allowed_fails`, or the
  `allowed_fails_policy` count for the failure's exception class. LiteLLM applies no
  alone-in-group exemption here (`should_cooldown_based_on_allowed_fails_policy`).

The circuit breaker is the seed's own rule (see `BreakerSettings`); it has no LiteLLM
equivalent and runs alongside the cooldown.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

# LiteLLM defaults, litellm/constants.py.
DEFAULT_ALLOWED_FAILS = 3
DEFAULT_COOLDOWN_TIME_S = 5.0
FAILURE_THRESHOLD_PERCENT = 0.5  # DEFAULT_FAILURE_THRESHOLD_PERCENT
FAILURE_THRESHOLD_MINIMUM_REQUESTS = 5  # DEFAULT_FAILURE_THRESHOLD_MINIMUM_REQUESTS
SINGLE_DEPLOYMENT_TRAFFIC_FAILURE_THRESHOLD = 1000

# A provider's Retry-After replaces cooldown_time (LiteLLM's deployment_callback_on_failure
# reads it from the exception headers), but a provider asking for an hour would take a
# deployment out for an hour on one response; cap it.
MAX_RETRY_AFTER_S = 300.0

# LiteLLM's AllowedFailsPolicy fields (litellm/types/router.py), and the statuses LiteLLM's
# exception mapping turns into each class. BadRequestError and ContentPolicyViolationError
# are 400s, which LiteLLM's `_is_cooldown_required` rejects before any policy is read, so at
# router level their counts never apply; they are accepted so LiteLLM configs load.
ALLOWED_FAILS_POLICY_KEYS = frozenset(
    {
        "BadRequestErrorAllowedFails",
        "ContentPolicyViolationErrorAllowedFails",
        "AuthenticationErrorAllowedFails",
        "TimeoutErrorAllowedFails",
        "RateLimitErrorAllowedFails",
        "InternalServerErrorAllowedFails",
        "ServiceUnavailableErrorAllowedFails",
        "BadGatewayErrorAllowedFails",
        "NotFoundErrorAllowedFails",
    }
)

Status = Literal["healthy", "cooldown", "open", "half_open"]
_Breaker = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Outcome:
    deployment: str  # deployment id
    status: int  # HTTP status of the attempt; 0 = no response (connect failure, reset, timeout)
    latency_s: float  # attempt duration until the last byte (or failure)
    ttft_s: float | None  # time to first upstream byte, for streams
    stream: bool
    retry_after_s: float | None = None  # provider's Retry-After, seconds
    error_class: str | None = (
        None  # optional: "context_window", "content_policy", "rate_limit", ...
    )
    # Output tokens of a successful attempt, when known: LiteLLM's latency strategy ranks
    # on seconds per output token (litellm/router_strategy/lowest_latency.py).
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class CooldownSettings:
    """LiteLLM's router_settings cooldown knobs, with LiteLLM's names and defaults."""

    allowed_fails: int = DEFAULT_ALLOWED_FAILS
    cooldown_time_s: float = DEFAULT_COOLDOWN_TIME_S
    disable_cooldowns: bool = False
    allowed_fails_policy: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        unknown = set(self.allowed_fails_policy) - ALLOWED_FAILS_POLICY_KEYS
        if unknown:
            raise ValueError(
                f"unknown allowed_fails_policy keys {sorted(unknown)}; "
                f"known: {sorted(ALLOWED_FAILS_POLICY_KEYS)}"
            )

    @property
    def counts_failures(self) -> bool:
        """True for LiteLLM's v1 (count-based) rule, False for its default v2 rule."""
        return bool(self.allowed_fails_policy) or self.allowed_fails != DEFAULT_ALLOWED_FAILS


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """The seed's breaker rule."""

    failure_rate: float = 0.5  # opens when failures/requests > this ...
    min_requests: int = 10  # ... over at least this many requests in the window
    window_s: float = 60.0
    open_s: float = 30.0  # then half-open
    half_open_probes: int = 3  # at most this many probes; all succeed -> closed; any fails -> open


@dataclass(frozen=True, slots=True)
class DeploymentState:
    status: Status
    until: float | None  # clock time the status ends by itself; None if it does not
    reason: str


def counts_as_failure(status: int) -> bool:
    """Whether an attempt's status is the deployment's fault.

    LiteLLM's `_is_cooldown_required`: 429, 401, 404 and 408 count, every other 4xx is the
    caller's problem and does not, and everything else (5xx) counts. Status 0 (no response:
    connect failure, reset, timeout) counts as LiteLLM's Timeout. LiteLLM skips its own
    client-side `APIConnectionError`; here a connect failure is the upstream's, so it counts.
    """
    if status == 0:
        return True
    if 200 <= status < 400:
        return False
    if 400 <= status < 500:
        return status in (401, 404, 408, 429)
    return status >= 500 or status < 200


def is_retryable(status: int) -> bool:
    """`litellm._should_retry`: 408, 409, 429 and 5xx are retried; 0 is a timeout."""
    return status in (0, 408, 409, 429) or status >= 500


def policy_key(outcome: Outcome) -> str | None:
    """The allowed_fails_policy field LiteLLM would match for this failure's exception."""
    status = outcome.status
    if outcome.error_class == "content_policy":
        return "ContentPolicyViolationErrorAllowedFails"
    if status == 429 or outcome.error_class == "rate_limit":
        return "RateLimitErrorAllowedFails"
    if status == 401 or outcome.error_class == "auth":
        return "AuthenticationErrorAllowedFails"
    if status in (0, 408, 504) or outcome.error_class == "timeout":
        return "TimeoutErrorAllowedFails"
    if status == 404:
        return "NotFoundErrorAllowedFails"
    if status == 502:
        return "BadGatewayErrorAllowedFails"
    if status == 503:
        return "ServiceUnavailableErrorAllowedFails"
    if status >= 500:
        return "InternalServerErrorAllowedFails"
    if 400 <= status < 500:
        return "BadRequestErrorAllowedFails"
    return None


@dataclass(slots=True)
class _Dep:
    # LiteLLM counts per calendar minute (track_deployment_metrics keys on the minute); the
    # counters reset when the minute changes.
    minute: int = -1
    successes: int = 0
    failures: int = 0
    last_failure: float | None = None
    cooldown_until: float | None = None
    cooldown_reason: str = ""
    # Breaker: the window holds (time, failed) per attempt while closed.
    breaker: _Breaker = "closed"
    window: deque[tuple[float, bool]] = field(default_factory=deque)
    window_failures: int = 0
    open_until: float | None = None
    breaker_reason: str = ""
    probes_started: int = 0
    probe_successes: int = 0
    probe_deadline: float | None = None


class DeploymentHealth:
    """Per-deployment cooldown (LiteLLM semantics) and circuit breaker (seed semantics)."""

    def __init__(
        self,
        groups: Mapping[str, Sequence[str]],
        cooldown: CooldownSettings,
        breaker: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._groups = {name: tuple(ids) for name, ids in groups.items()}
        self._cooldown = cooldown
        self._breaker = breaker
        self._clock = clock
        self._deps: dict[str, _Dep] = {}
        # "Alone" is LiteLLM's is_single_deployment_model_group: no group this deployment
        # serves has another deployment to send the traffic to instead.
        self._has_alternatives: dict[str, bool] = {}
        for ids in self._groups.values():
            for dep_id in ids:
                self._deps.setdefault(dep_id, _Dep())
                alternatives = len(set(ids)) > 1
                self._has_alternatives[dep_id] = self._has_alternatives.get(dep_id, False) or (
                    alternatives
                )

    # -- inputs -----------------------------------------------------------------------------

    def started(self, deployment: str) -> None:
        """An attempt was sent to `deployment`; while half-open it is one of the probes."""
        now = self._clock()
        dep = self._dep(deployment)
        self._advance(deployment, dep, now)
        if dep.breaker == "half_open":
            dep.probes_started += 1
            if dep.probe_deadline is None:
                # A probe that never reports back would keep the deployment half-open and
                # closed to traffic forever; treat silence for a whole window as a failure.
                dep.probe_deadline = now + self._breaker.window_s

    def record(self, outcome: Outcome) -> list[str]:
        """Account one finished attempt; returns log lines for the transitions it caused."""
        now = self._clock()
        name = outcome.deployment
        dep = self._dep(name)
        logs = self._advance(name, dep, now)
        failed = counts_as_failure(outcome.status)
        # A status that is not the deployment's fault (400, 413, 422...) is a correct answer:
        # it counts as a success both for the minute's failure rate and for the breaker.
        self._count_minute(dep, now, failed)
        if failed:
            dep.last_failure = now
        logs += self._breaker_record(name, dep, now, outcome, failed)
        if failed:
            logs += self._maybe_cool_down(name, dep, now, outcome)
        return logs

    def tick(self) -> list[str]:
        """Apply the timed transitions due by now; call it at `next_change()`."""
        now = self._clock()
        logs: list[str] = []
        for name, dep in self._deps.items():
            logs += self._advance(name, dep, now)
        return logs

    # -- outputs ----------------------------------------------------------------------------

    def state(self, deployment: str) -> DeploymentState:
        dep = self._dep(deployment)
        now = self._clock()
        self._advance(deployment, dep, now)
        # Priority: open (nothing may go there) over cooldown over half-open (some may).
        if dep.breaker == "open":
            return DeploymentState("open", dep.open_until, dep.breaker_reason)
        if dep.cooldown_until is not None:
            return DeploymentState("cooldown", dep.cooldown_until, dep.cooldown_reason)
        if dep.breaker == "half_open":
            return DeploymentState("half_open", dep.probe_deadline, dep.breaker_reason)
        return DeploymentState("healthy", None, "")

    def routable(self, group: str) -> dict[str, bool]:
        """Which deployments of `group` Envoy may use now.

        A group whose every deployment is excluded still answers: its least-recently-failed
        deployment stays routable (LiteLLM would instead answer 429 "No deployments
        available"; sending one deployment a chance is better for a gateway than failing
        every request until a timer ends).
        """
        now = self._clock()
        ids = self._groups[group]
        result: dict[str, bool] = {}
        for name in ids:
            dep = self._dep(name)
            self._advance(name, dep, now)
            result[name] = not self._excluded(dep)
        if ids and not any(result.values()):

            def failed_at(name: str) -> float:
                last = self._deps[name].last_failure
                return -math.inf if last is None else last

            # min() keeps the first of equals, so ties go to the group's config order.
            result[min(ids, key=failed_at)] = True
        return result

    def next_change(self) -> float | None:
        """Clock time of the next timed transition, or None if nothing is pending."""
        now = self._clock()
        times: list[float] = []
        for name, dep in self._deps.items():
            self._advance(name, dep, now)
            for t in (dep.cooldown_until, dep.open_until, dep.probe_deadline):
                if t is not None:
                    times.append(t)
        return min(times, default=None)

    # -- internals --------------------------------------------------------------------------

    def _dep(self, name: str) -> _Dep:
        dep = self._deps.get(name)
        if dep is None:
            dep = self._deps[name] = _Dep()
        return dep

    def _excluded(self, dep: _Dep) -> bool:
        if dep.breaker == "open" or dep.cooldown_until is not None:
            return True
        return dep.breaker == "half_open" and dep.probes_started >= self._breaker.half_open_probes

    def _advance(self, name: str, dep: _Dep, now: float) -> list[str]:
        logs: list[str] = []
        if dep.cooldown_until is not None and now >= dep.cooldown_until:
            dep.cooldown_until = None
            dep.cooldown_reason = ""
            logs.append(f"deployment {name}: cooldown ended")
        if dep.breaker == "open" and dep.open_until is not None and now >= dep.open_until:
            dep.breaker = "half_open"
            dep.open_until = None
            dep.probes_started = dep.probe_successes = 0
            dep.probe_deadline = None
            dep.breaker_reason = f"probing with up to {self._breaker.half_open_probes} requests"
            logs.append(f"deployment {name}: circuit half-open")
        if (
            dep.breaker == "half_open"
            and dep.probe_deadline is not None
            and now >= dep.probe_deadline
        ):
            logs.append(self._open(name, dep, now, "probes did not report back in time"))
        return logs

    def _count_minute(self, dep: _Dep, now: float, failed: bool) -> None:
        minute = math.floor(now / 60.0)
        if minute != dep.minute:
            dep.minute, dep.successes, dep.failures = minute, 0, 0
        if failed:
            dep.failures += 1
        else:
            dep.successes += 1

    def _breaker_record(
        self, name: str, dep: _Dep, now: float, outcome: Outcome, failed: bool
    ) -> list[str]:
        b = self._breaker
        if dep.breaker == "open":
            # Attempts that were in flight when the circuit opened (or sent to the group's
            # last resort) say nothing new; the open period runs its course.
            return []
        if dep.breaker == "half_open":
            if failed:
                return [self._open(name, dep, now, f"probe failed with status {outcome.status}")]
            dep.probe_successes += 1
            if dep.probe_successes >= b.half_open_probes:
                dep.breaker = "closed"
                dep.breaker_reason = ""
                dep.probes_started = dep.probe_successes = 0
                dep.probe_deadline = None
                return [
                    f"deployment {name}: circuit closed ({b.half_open_probes} probes succeeded)"
                ]
            return []
        dep.window.append((now, failed))
        dep.window_failures += failed
        horizon = now - b.window_s
        while dep.window and dep.window[0][0] <= horizon:
            _, old_failed = dep.window.popleft()
            dep.window_failures -= old_failed
        total = len(dep.window)
        if total >= b.min_requests and dep.window_failures / total > b.failure_rate:
            return [self._open(name, dep, now, f"{dep.window_failures}/{total} failed")]
        return []

    def _open(self, name: str, dep: _Dep, now: float, why: str) -> str:
        dep.breaker = "open"
        dep.open_until = now + self._breaker.open_s
        dep.breaker_reason = why
        dep.probes_started = dep.probe_successes = 0
        dep.probe_deadline = None
        # The window starts afresh once the circuit closes again: the failures that opened
        # it are history (nothing is added to the window while open or half-open).
        dep.window.clear()
        dep.window_failures = 0
        return f"deployment {name}: circuit open ({why}) until t={dep.open_until:.3f}"

    def _cooldown_duration(self, outcome: Outcome) -> float:
        # LiteLLM (router.py deployment_callback_on_failure): the provider's Retry-After when
        # it sent one, else the router's cooldown_time.
        if outcome.retry_after_s is not None and outcome.retry_after_s >= 0:
            return min(outcome.retry_after_s, MAX_RETRY_AFTER_S)
        return self._cooldown.cooldown_time_s

    def _maybe_cool_down(self, name: str, dep: _Dep, now: float, outcome: Outcome) -> list[str]:
        settings = self._cooldown
        if settings.disable_cooldowns:
            return []
        duration = self._cooldown_duration(outcome)
        # LiteLLM's _should_run_cooldown_logic: a cooldown time of 0 (e.g. "Retry-After: 0")
        # means no cooldown at all.
        if duration <= 0:
            return []
        reason = self._cooldown_reason(name, dep, outcome)
        if reason is None:
            return []
        until = now + duration
        # LiteLLM re-adds the deployment with a fresh TTL; never shorten a running cooldown.
        if dep.cooldown_until is None or until > dep.cooldown_until:
            dep.cooldown_until = until
            dep.cooldown_reason = reason
        return [f"deployment {name}: cooling down for {duration:g}s until t={until:.3f} ({reason})"]

    def _cooldown_reason(self, name: str, dep: _Dep, outcome: Outcome) -> str | None:
        settings = self._cooldown
        status = outcome.status
        if settings.counts_failures:
            # v1 (cooldown_handlers.py should_cooldown_based_on_allowed_fails_policy): the
            # failure's class count from allowed_fails_policy, else allowed_fails. LiteLLM's
            # counter is keyed per deployment and shared by all classes; so is this one.
            # (LiteLLM once used `policy or allowed_fails`, so a policy count of 0 fell back to
            # allowed_fails; it now checks `is not None`, and so does this.)
            key = policy_key(outcome)
            allowed = settings.allowed_fails
            if key is not None and key in settings.allowed_fails_policy:
                allowed = settings.allowed_fails_policy[key]
            if dep.failures > allowed:
                return f"{dep.failures} failures this minute > {allowed} allowed"
            return None
        # v2 (cooldown_handlers.py _should_cooldown_deployment), in LiteLLM's order.
        alone = not self._has_alternatives.get(name, False)
        total = dep.successes + dep.failures
        rate = dep.failures / total if total else 0.0
        if status == 429 and not alone:
            return "rate limited (429)"
        if rate == 1.0 and total >= SINGLE_DEPLOYMENT_TRAFFIC_FAILURE_THRESHOLD:
            return f"all {total} attempts this minute failed"
        # "by default we should avoid cooldowns on single deployment model groups"
        if (
            rate > FAILURE_THRESHOLD_PERCENT
            and total >= FAILURE_THRESHOLD_MINIMUM_REQUESTS
            and not alone
        ):
            return f"{dep.failures}/{total} attempts failed this minute"
        if not is_retryable(status):
            return f"status {status} is not retryable"
        return None
