"""DeploymentHealth: LiteLLM's cooldown rules and the seed's circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest

from llmux_extproc.policy.health import (
    BreakerSettings,
    CooldownSettings,
    DeploymentHealth,
    Outcome,
    counts_as_failure,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NO_COOLDOWN = CooldownSettings(disable_cooldowns=True)
GROUPS = {"gpt": ["a", "b"], "solo": ["s"]}


def make(
    cooldown: CooldownSettings | None = None,
    breaker: BreakerSettings | None = None,
    clock: FakeClock | None = None,
) -> tuple[DeploymentHealth, FakeClock]:
    clock = clock or FakeClock()
    health = DeploymentHealth(
        GROUPS, cooldown or CooldownSettings(), breaker or BreakerSettings(), clock
    )
    return health, clock


def out(dep: str, status: int, retry_after: float | None = None) -> Outcome:
    return Outcome(dep, status, latency_s=0.1, ttft_s=None, stream=False, retry_after_s=retry_after)


def test_status_classes_follow_litellm() -> None:
    for status in (0, 401, 404, 408, 429, 500, 502, 503, 504):
        assert counts_as_failure(status), status
    for status in (200, 204, 301, 400, 403, 409, 413, 422):
        assert not counts_as_failure(status), status


# -- cooldown, LiteLLM's v1 rule (allowed_fails set) -------------------------------------------


def test_cooldown_starts_after_allowed_fails_plus_one_failures_in_a_minute() -> None:
    health, _ = make(CooldownSettings(allowed_fails=2))
    assert health.record(out("a", 500)) == []
    assert health.record(out("a", 500)) == []
    assert health.state("a").status == "healthy"
    logs = health.record(out("a", 500))
    assert health.state("a").status == "cooldown"
    assert any("cooling down" in line for line in logs)


def test_failures_are_counted_per_minute() -> None:
    health, clock = make(CooldownSettings(allowed_fails=2))
    clock.now = 50.0
    health.record(out("a", 500))
    health.record(out("a", 500))
    clock.now = 61.0  # next minute: the count starts again
    health.record(out("a", 500))
    assert health.state("a").status == "healthy"


def test_400_does_not_count() -> None:
    health, _ = make(CooldownSettings(allowed_fails=0))
    for _ in range(20):
        health.record(out("a", 400))
        health.record(out("a", 422))
    assert health.state("a").status == "healthy"
    health.record(out("a", 500))
    assert health.state("a").status == "cooldown"


def test_allowed_fails_policy_sets_the_count_per_exception_class() -> None:
    health, _ = make(
        CooldownSettings(allowed_fails=0, allowed_fails_policy={"RateLimitErrorAllowedFails": 2})
    )
    health.record(out("a", 429))
    health.record(out("a", 429))
    assert health.state("a").status == "healthy"
    health.record(out("a", 429))
    assert health.state("a").status == "cooldown"
    # A class without a policy entry falls back to allowed_fails (0): first failure cools.
    health.record(out("b", 500))
    assert health.state("b").status == "cooldown"


def test_unknown_policy_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="RateLimitErrorsAllowedFails"):
        CooldownSettings(allowed_fails_policy={"RateLimitErrorsAllowedFails": 1})


def test_retry_after_is_honoured_and_capped() -> None:
    health, clock = make(CooldownSettings(allowed_fails=0))
    clock.now = 10.0
    health.record(out("a", 429, retry_after=42.0))
    assert health.state("a").until == pytest.approx(52.0)
    health.record(out("b", 429, retry_after=86400.0))
    assert health.state("b").until == pytest.approx(310.0)


def test_retry_after_zero_means_no_cooldown() -> None:
    health, _ = make(CooldownSettings(allowed_fails=0))
    health.record(out("a", 429, retry_after=0.0))
    assert health.state("a").status == "healthy"


def test_cooldown_ends_after_cooldown_time() -> None:
    health, clock = make(CooldownSettings(allowed_fails=0, cooldown_time_s=5.0))
    clock.now = 100.0
    health.record(out("a", 503))
    assert health.next_change() == pytest.approx(105.0)
    clock.now = 104.9
    assert health.state("a").status == "cooldown"
    assert health.routable("gpt") == {"a": False, "b": True}
    clock.now = 105.0
    assert health.tick() == ["deployment a: cooldown ended"]
    assert health.state("a").status == "healthy"
    assert health.routable("gpt") == {"a": True, "b": True}
    assert health.next_change() is None


def test_disable_cooldowns() -> None:
    health, _ = make(CooldownSettings(allowed_fails=0, disable_cooldowns=True))
    health.record(out("a", 500))
    health.record(out("a", 429))
    assert health.state("a").status == "healthy"


def test_all_cooling_group_keeps_least_recently_failed_routable() -> None:
    health, clock = make(CooldownSettings(allowed_fails=0, cooldown_time_s=60.0))
    clock.now = 1.0
    health.record(out("a", 500))
    clock.now = 2.0
    health.record(out("b", 500))
    assert health.state("a").status == health.state("b").status == "cooldown"
    assert health.routable("gpt") == {"a": True, "b": False}


# -- cooldown, LiteLLM's default v2 rule ---------------------------------------------------------


def test_default_429_cools_down_at_once_when_the_group_has_alternatives() -> None:
    health, _ = make()
    health.record(out("a", 429))
    assert health.state("a").status == "cooldown"


def test_default_429_never_cools_a_deployment_alone_in_its_group() -> None:
    health, _ = make(breaker=BreakerSettings(min_requests=1000))  # the breaker is not under test
    for _ in range(20):
        health.record(out("s", 429))
    assert health.state("s").status == "healthy"


def test_default_failure_rate_needs_five_attempts_and_alternatives() -> None:
    health, _ = make()
    for _ in range(4):
        health.record(out("a", 500))
        health.record(out("s", 500))
    assert health.state("a").status == "healthy"  # 4/4 failed, but fewer than 5 attempts
    health.record(out("a", 500))
    health.record(out("s", 500))
    assert health.state("a").status == "cooldown"  # 5/5 > 50%
    assert health.state("s").status == "healthy"  # alone: LiteLLM avoids cooling it down


def test_default_failure_rate_must_exceed_half() -> None:
    health, _ = make()
    for status in (200, 500, 200, 500, 200, 500):
        health.record(out("a", status))
    assert health.state("a").status == "healthy"  # 3/6 is not > 50%
    health.record(out("a", 500))
    assert health.state("a").status == "cooldown"  # 4/7


def test_default_non_retryable_status_cools_even_a_lone_deployment() -> None:
    health, _ = make()
    health.record(out("s", 401))
    assert health.state("s").status == "cooldown"
    # ... and the group still answers: its only deployment stays routable.
    assert health.routable("solo") == {"s": True}


# -- circuit breaker -----------------------------------------------------------------------------


def test_breaker_opens_above_half_of_at_least_ten() -> None:
    health, clock = make(NO_COOLDOWN)
    clock.now = 5.0
    for _ in range(4):
        health.record(out("a", 200))
    logs: list[str] = []
    for _ in range(6):
        logs += health.record(out("a", 500))
    state = health.state("a")
    assert state.status == "open"
    assert state.until == pytest.approx(35.0)
    assert any("circuit open (6/10 failed)" in line for line in logs)


def test_breaker_stays_closed_at_half() -> None:
    health, _ = make(NO_COOLDOWN)
    for _ in range(5):
        health.record(out("a", 200))
        health.record(out("a", 500))
    assert health.state("a").status == "healthy"  # 5/10 is not > 50%
    health.record(out("a", 500))
    assert health.state("a").status == "open"  # 6/11


def test_breaker_needs_min_requests() -> None:
    health, _ = make(NO_COOLDOWN)
    for _ in range(9):
        health.record(out("a", 500))
    assert health.state("a").status == "healthy"
    health.record(out("a", 500))
    assert health.state("a").status == "open"


def test_breaker_window_forgets_old_attempts() -> None:
    health, clock = make(NO_COOLDOWN)
    for _ in range(9):
        health.record(out("a", 500))
    clock.now = 61.0
    health.record(out("a", 500))  # the nine are out of the 60 s window
    assert health.state("a").status == "healthy"


def test_breaker_ignores_client_errors() -> None:
    health, _ = make(NO_COOLDOWN)
    for _ in range(20):
        health.record(out("a", 400))
    assert health.state("a").status == "healthy"


def open_circuit(health: DeploymentHealth, dep: str = "a") -> None:
    for _ in range(10):
        health.record(out(dep, 500))
    assert health.state(dep).status == "open"


def test_open_becomes_half_open_after_open_s() -> None:
    health, clock = make(NO_COOLDOWN)
    open_circuit(health)
    assert health.routable("gpt") == {"a": False, "b": True}
    assert health.next_change() == pytest.approx(30.0)
    clock.now = 30.0
    assert health.tick() == ["deployment a: circuit half-open"]
    assert health.state("a").status == "half_open"
    assert health.routable("gpt") == {"a": True, "b": True}


def test_half_open_admits_at_most_three_probes() -> None:
    health, clock = make(NO_COOLDOWN)
    open_circuit(health)
    clock.now = 30.0
    for _ in range(2):
        health.started("a")
        assert health.routable("gpt")["a"] is True
    health.started("a")
    assert health.routable("gpt") == {"a": False, "b": True}
    # A resolved probe does not make room for a fourth: the three decide.
    health.record(out("a", 200))
    assert health.routable("gpt")["a"] is False


def test_half_open_closes_after_three_successes() -> None:
    health, clock = make(NO_COOLDOWN)
    open_circuit(health)
    clock.now = 30.0
    for _ in range(3):
        health.started("a")
    assert health.record(out("a", 200)) == []
    assert health.record(out("a", 200)) == []
    assert health.record(out("a", 200)) == ["deployment a: circuit closed (3 probes succeeded)"]
    assert health.state("a").status == "healthy"
    # The failures that opened it are forgotten: one more failure does not reopen it.
    health.record(out("a", 500))
    assert health.state("a").status == "healthy"


def test_half_open_reopens_on_a_probe_failure() -> None:
    health, clock = make(NO_COOLDOWN)
    open_circuit(health)
    clock.now = 30.0
    health.started("a")
    health.started("a")
    health.record(out("a", 200))
    logs = health.record(out("a", 502))
    state = health.state("a")
    assert state.status == "open"
    assert state.until == pytest.approx(60.0)
    assert "probe failed with status 502" in logs[0]


def test_half_open_reopens_when_probes_never_report() -> None:
    health, clock = make(NO_COOLDOWN)
    open_circuit(health)
    clock.now = 30.0
    health.started("a")
    assert health.next_change() == pytest.approx(90.0)
    clock.now = 90.0
    assert health.state("a").status == "open"


def test_open_circuit_and_cooldown_both_count() -> None:
    # Defaults: the 500s cool "a" down (v2 rate rule) and open its circuit; open wins.
    health, clock = make()
    open_circuit(health)
    assert health.state("a").status == "open"
    clock.now = 30.0
    assert health.state("a").status == "half_open"  # the 5 s cooldown ended long ago
