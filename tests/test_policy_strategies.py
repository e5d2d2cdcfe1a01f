"""Routing strategies as EDS weights, on a fake clock."""

from __future__ import annotations

import pytest

from llmux_extproc.policy.health import Outcome
from llmux_extproc.policy.strategies import (
    MAX_WEIGHT,
    CostBased,
    DeploymentInfo,
    LatencyBased,
    LeastBusy,
    SimpleShuffle,
    UsageBased,
    make_strategy,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


ALL = {"a": True, "b": True, "c": True}


def deps(*ids: str) -> list[DeploymentInfo]:
    return [DeploymentInfo(i) for i in ids]


def ok(dep: str, latency: float, ttft: float | None = None) -> Outcome:
    return Outcome(dep, 200, latency_s=latency, ttft_s=ttft, stream=ttft is not None)


# -- simple-shuffle / least-busy -----------------------------------------------------------------


def test_simple_shuffle_uses_weight_then_rpm_then_tpm() -> None:
    s = SimpleShuffle()
    weighted = [DeploymentInfo("a", weight=1, rpm=100), DeploymentInfo("b", weight=3, rpm=1)]
    assert s.weights(weighted, ALL) == {"a": 333333, "b": MAX_WEIGHT}
    by_rpm = [DeploymentInfo("a", rpm=100, tpm=1), DeploymentInfo("b", rpm=300, tpm=1)]
    assert s.weights(by_rpm, ALL) == {"a": 333333, "b": MAX_WEIGHT}
    by_tpm = [DeploymentInfo("a", rpm=100, tpm=1000), DeploymentInfo("b", tpm=4000)]
    assert s.weights(by_tpm, ALL) == {"a": 250000, "b": MAX_WEIGHT}
    assert s.weights(deps("a", "b"), ALL) == {"a": MAX_WEIGHT, "b": MAX_WEIGHT}


def test_simple_shuffle_zeroes_unroutable_and_never_zeroes_a_whole_group() -> None:
    s = SimpleShuffle()
    assert s.weights(deps("a", "b"), {"a": False, "b": True}) == {"a": 0, "b": MAX_WEIGHT}
    zero = [DeploymentInfo("a", weight=0), DeploymentInfo("b", weight=2)]
    assert s.weights(zero, {"a": True, "b": False}) == {"a": MAX_WEIGHT, "b": 0}


def test_tiny_share_rounds_up_to_one_not_to_unhealthy() -> None:
    tiny = [DeploymentInfo("a", weight=1e-9), DeploymentInfo("b", weight=1)]
    assert SimpleShuffle().weights(tiny, ALL) == {"a": 1, "b": MAX_WEIGHT}


def test_least_busy_is_equal_weights() -> None:
    weighted = [DeploymentInfo("a", weight=1), DeploymentInfo("b", weight=9)]
    assert LeastBusy().weights(weighted, {"a": True, "b": False}) == {"a": MAX_WEIGHT, "b": 0}


# -- latency-based-routing -----------------------------------------------------------------------


def test_latency_explores_unmeasured_then_prefers_the_faster() -> None:
    clock = FakeClock()
    s = LatencyBased(clock=clock)
    group = deps("a", "b")
    assert s.weights(group, ALL) == {"a": 1000, "b": 1000}  # nothing measured: both explored
    s.observe(ok("a", 0.2))
    assert s.weights(group, ALL) == {"a": 1000, "b": 1000}  # b still unmeasured
    s.observe(ok("b", 0.8))
    assert s.weights(group, ALL) == {"a": 1000, "b": 10}  # b keeps a token share


def test_latency_buffer_lets_close_deployments_share() -> None:
    clock = FakeClock()
    s = LatencyBased(lowest_latency_buffer=0.5, clock=clock)
    group = deps("a", "b", "c")
    s.observe(ok("a", 1.0))
    s.observe(ok("b", 1.5))  # within 50% of a
    s.observe(ok("c", 1.6))  # not
    assert s.weights(group, ALL) == {"a": 1000, "b": 1000, "c": 10}
    # The fastest not routable: the buffer is measured from the fastest routable one.
    assert s.weights(group, {"a": False, "b": True, "c": True}) == {"a": 0, "b": 1000, "c": 1000}


def test_latency_is_a_rolling_average_of_the_last_samples() -> None:
    clock = FakeClock()
    s = LatencyBased(max_latency_list_size=3, clock=clock)
    group = deps("a", "b")
    s.observe(ok("a", 10.0))
    s.observe(ok("b", 1.0))
    assert s.weights(group, ALL) == {"a": 10, "b": 1000}
    for _ in range(3):
        s.observe(ok("a", 0.5))  # pushes the 10 s sample out of a's window of 3
    assert s.weights(group, ALL) == {"a": 1000, "b": 10}


def test_latency_uses_ttft_for_streams() -> None:
    s = LatencyBased(clock=FakeClock())
    # a streams long answers but starts fast; b answers quickly but starts slow.
    s.observe(ok("a", 20.0, ttft=0.2))
    s.observe(ok("b", 2.0, ttft=1.0))
    assert s.weights(deps("a", "b"), ALL) == {"a": 1000, "b": 10}


def test_latency_per_output_token_when_known() -> None:
    s = LatencyBased(clock=FakeClock())
    s.observe(Outcome("a", 200, 4.0, None, False, completion_tokens=400))  # 10 ms/token
    s.observe(Outcome("b", 200, 1.0, None, False, completion_tokens=20))  # 50 ms/token
    assert s.weights(deps("a", "b"), ALL) == {"a": 1000, "b": 10}


def test_latency_timeout_penalty_and_ttl() -> None:
    clock = FakeClock()
    s = LatencyBased(ttl_s=3600.0, clock=clock)
    group = deps("a", "b")
    s.observe(ok("a", 0.1))
    s.observe(ok("b", 0.5))
    s.observe(Outcome("a", 0, 30.0, None, False))  # timeout: 1000 s penalty
    s.observe(Outcome("b", 400, 0.01, None, False))  # client error: not a measurement
    assert s.weights(group, ALL) == {"a": 10, "b": 1000}
    clock.now = 3601.0  # every sample expired: both are explored again
    assert s.weights(group, ALL) == {"a": 1000, "b": 1000}


# -- usage-based-routing-v2 ----------------------------------------------------------------------


def test_usage_skips_a_full_deployment_and_recovers_next_minute() -> None:
    clock = FakeClock(5.0)
    s = UsageBased(clock=clock)
    group = [DeploymentInfo("a", rpm=2), DeploymentInfo("b", rpm=100)]
    s.observe_request("a")
    assert s.weights(group, ALL)["a"] > 0
    s.observe_request("a")
    assert s.weights(group, ALL) == {"a": 0, "b": MAX_WEIGHT}
    assert s.next_change() == pytest.approx(60.0)
    clock.now = 60.0
    assert s.weights(group, ALL) == {"a": MAX_WEIGHT, "b": MAX_WEIGHT}


def test_usage_tpm_limit_and_lowest_use_preferred() -> None:
    clock = FakeClock()
    s = UsageBased(smoothing_tokens=1000.0, clock=clock)
    group = [DeploymentInfo("a", tpm=10_000), DeploymentInfo("b"), DeploymentInfo("c")]
    s.observe_tokens("b", 3000)  # (0 + 1000) / (3000 + 1000) of the top share
    assert s.weights(group, ALL) == {"a": MAX_WEIGHT, "b": 250000, "c": MAX_WEIGHT}
    s.observe_tokens("a", 10_000)
    assert s.weights(group, ALL) == {"a": 0, "b": 250000, "c": MAX_WEIGHT}


def test_usage_everything_full_gives_all_zero() -> None:
    s = UsageBased(clock=FakeClock())
    group = [DeploymentInfo("a", rpm=1)]
    s.observe_request("a")
    assert s.weights(group, {"a": True}) == {"a": 0}


# -- cost-based-routing --------------------------------------------------------------------------


def priced(dep: str, i: float | None, o: float | None) -> DeploymentInfo:
    return DeploymentInfo(dep, input_cost_per_token=i, output_cost_per_token=o)


def test_cost_picks_cheapest_and_falls_back_when_it_is_not_routable() -> None:
    s = CostBased()
    group = [priced("a", 3e-6, 1.5e-5), priced("b", 1e-6, 2e-6), priced("c", 1e-5, 3e-5)]
    assert s.weights(group, ALL) == {"a": 1, "b": MAX_WEIGHT, "c": 1}
    assert s.weights(group, {"a": True, "b": False, "c": True}) == {"a": MAX_WEIGHT, "b": 0, "c": 1}


def test_cost_ties_share_and_unknown_cost_comes_last() -> None:
    s = CostBased()
    group = [priced("a", 1e-6, 2e-6), priced("b", 2e-6, 1e-6), priced("c", None, None)]
    assert s.weights(group, ALL) == {"a": MAX_WEIGHT, "b": MAX_WEIGHT, "c": 1}


# -- make_strategy -------------------------------------------------------------------------------


def test_make_strategy_litellm_names() -> None:
    assert type(make_strategy("simple-shuffle", {})) is SimpleShuffle
    assert type(make_strategy("least-busy", {})) is LeastBusy
    assert type(make_strategy("usage-based-routing-v2", {"ttl": 60})) is UsageBased
    assert type(make_strategy("usage-based-routing", {})) is UsageBased
    assert type(make_strategy("cost-based-routing", {})) is CostBased
    latency = make_strategy(
        "latency-based-routing",
        {"lowest_latency_buffer": "0.25", "ttl": 60, "max_latency_list_size": 5},
    )
    assert isinstance(latency, LatencyBased)
    assert (latency.buffer, latency.ttl_s, latency.size) == (0.25, 60.0, 5)


def test_make_strategy_rejects_unknowns() -> None:
    with pytest.raises(ValueError, match="unknown routing_strategy"):
        make_strategy("lowest-latency", {})
    with pytest.raises(ValueError, match="lowest_latency_bufer"):
        make_strategy("latency-based-routing", {"lowest_latency_bufer": 0.1})
    with pytest.raises(ValueError, match="must be a number"):
        make_strategy("latency-based-routing", {"ttl": "an hour"})
