"""Admission and settlement rules (policy/limits.py, budgets.py), on each state: dicts,
the shared SQLite file of one replica's workers (two limiters on one file, alternating),
and Redis (the Lua script, a prefix of its own); a fake clock throughout."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from llmux_extproc.policy import budgets
from llmux_extproc.policy.keys import Limits, Principal
from llmux_extproc.policy.limits import (
    Ask,
    Budget,
    Decision,
    Limit,
    LocalLimiter,
    MemoryState,
    Settled,
    SharedState,
    ratelimit_headers,
)
from llmux_extproc.policy.redis_limits import RedisLimiter
from tests import redis_server


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Limiters:
    """One or two limiters on one state; calls alternate between them."""

    def __init__(self, clock: Clock, limiters: list[LocalLimiter | RedisLimiter]) -> None:
        self.clock = clock
        self._cycle = itertools.cycle(limiters)
        self.all = limiters

    async def admit(self, ask: Ask) -> Decision:
        return await next(self._cycle).admit(ask)

    async def settle(self, rid: str, tokens: int, cost: float) -> Settled:
        return await next(self._cycle).settle(rid, tokens, cost)


@pytest.fixture(params=["memory", "shared", "redis"])
async def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Limiters]:
    clock = Clock()
    if request.param == "memory":
        yield Limiters(clock, [LocalLimiter(MemoryState(), clock)])
        return
    if request.param == "shared":
        path = tmp_path / "limits.sqlite"
        yield Limiters(
            clock, [LocalLimiter(SharedState(path), clock), LocalLimiter(SharedState(path), clock)]
        )
        return
    redis_server.client().close()  # fails the test, saying how to start Redis, if absent
    prefix = redis_server.new_prefix()
    clients = [aioredis.Redis.from_url(redis_server.URL) for _ in range(2)]
    yield Limiters(
        clock,
        [
            RedisLimiter(c, LocalLimiter(MemoryState(), clock), prefix, clock_from_redis=False)
            for c in clients
        ],
    )
    for c in clients:
        await c.aclose()
    redis_server.drop_prefix(prefix)


ids = (f"req-{n}" for n in itertools.count())


def ask(
    *limits: Limit,
    budgets: tuple[Budget, ...] = (),
    tokens: int = 0,
    cost: float = 0.0,
    ttl: float = 600.0,
) -> Ask:
    return Ask(next(ids), limits, budgets, tokens, cost, ttl)


RPM = Limit("api_key:k1:requests", "requests", 3, "key k1", "rpm_limit")
TPM = Limit("api_key:k1:tokens", "tokens", 1000, "key k1", "tpm_limit")
PAR = Limit("api_key:k1:parallel", "parallel", 2, "key k1", "max_parallel_requests")
TEAM_RPM = Limit("team_id:t1:requests", "requests", 1, "team t1", "rpm_limit")


async def test_rpm_bucket_admits_its_capacity_then_refills(limiter: Limiters) -> None:
    admitted = [(await limiter.admit(ask(RPM))).admitted for _ in range(4)]
    assert admitted == [True, True, True, False]
    refused = await limiter.admit(ask(RPM))
    assert refused.refused == RPM
    assert refused.retry_after_s == pytest.approx(20.0)  # one token at 3/60 per second
    limiter.clock.now += 19.0
    assert not (await limiter.admit(ask(RPM))).admitted
    limiter.clock.now += 1.0
    assert (await limiter.admit(ask(RPM))).admitted
    assert not (await limiter.admit(ask(RPM))).admitted


async def test_a_look_at_the_buckets_takes_nothing(limiter: Limiters) -> None:
    assert (await limiter.admit(ask(RPM, TPM, PAR, tokens=100))).admitted
    for lim in limiter.all:
        head = await lim.peek((RPM, TPM, PAR))
        assert [(h.limit, h.remaining) for h in head] == [(RPM, 2.0), (TPM, 900.0)]
    assert [(await limiter.admit(ask(RPM))).admitted for _ in range(3)] == [True, True, False]


async def test_tpm_reserves_the_estimate_and_settles_the_real_usage(limiter: Limiters) -> None:
    first = ask(TPM, tokens=600)
    decision = await limiter.admit(first)
    assert decision.admitted
    assert decision.headroom[0].remaining == pytest.approx(400)
    assert (await limiter.admit(ask(TPM, tokens=600))).admitted  # a positive balance suffices
    third = await limiter.admit(ask(TPM, tokens=1))
    assert third.refused == TPM  # -200 left
    # The first answer used 100 tokens, not 600: 500 come back.
    settled = await limiter.settle(first.id, 100, 0.0)
    assert settled.found
    after = await limiter.admit(ask(TPM, tokens=10))
    assert after.admitted
    assert after.headroom[0].remaining == pytest.approx(300 - 10)
    assert not (await limiter.settle(first.id, 100, 0.0)).found  # once only


async def test_settling_more_than_reserved_takes_the_difference(limiter: Limiters) -> None:
    first = ask(TPM, tokens=100)
    await limiter.admit(first)
    await limiter.settle(first.id, 1100, 0.0)  # a stream that ran long: 1100 used
    refused = await limiter.admit(ask(TPM, tokens=1))
    assert refused.refused == TPM
    assert refused.retry_after_s == pytest.approx((1 + 100) * 60 / 1000)


async def test_max_parallel_counts_in_flight_requests(limiter: Limiters) -> None:
    one, two = ask(PAR), ask(PAR)
    assert (await limiter.admit(one)).admitted
    assert (await limiter.admit(two)).admitted
    assert (await limiter.admit(ask(PAR))).refused == PAR
    await limiter.settle(one.id, 0, 0.0)
    assert (await limiter.admit(ask(PAR))).admitted


async def test_a_reservation_nothing_settles_gives_its_place_back_when_it_expires(
    limiter: Limiters,
) -> None:
    short, settled = ask(PAR, ttl=10.0), ask(PAR, ttl=10.0)
    assert (await limiter.admit(short)).admitted
    assert (await limiter.admit(settled)).admitted
    await limiter.settle(settled.id, 0, 0.0)
    assert (await limiter.admit(ask(PAR, ttl=600.0))).admitted  # the settled one's place
    assert (await limiter.admit(ask(PAR))).refused == PAR
    limiter.clock.now += 10.0  # `short` expires (the settled one is not released twice)
    assert (await limiter.admit(ask(PAR))).admitted
    assert (await limiter.admit(ask(PAR))).refused == PAR


def test_settled_reservations_do_not_pile_up_in_memory() -> None:
    clock = Clock()
    state = MemoryState()
    limiter = LocalLimiter(state, clock)
    for _ in range(5000):
        one = ask(PAR)
        assert limiter.admit_now(one).admitted
        assert limiter.settle_now(one.id, 0, 0.0).found
    assert not state.reservations
    assert len(state._expiries) <= 64 + 1


async def test_all_buckets_or_none(limiter: Limiters) -> None:
    assert (await limiter.admit(ask(RPM, TEAM_RPM, PAR))).admitted
    refused = await limiter.admit(ask(RPM, TEAM_RPM, PAR))
    assert refused.refused == TEAM_RPM
    # The key's RPM and parallel buckets gave nothing to the refused request.
    assert (await limiter.admit(ask(RPM, PAR))).admitted
    assert (await limiter.admit(ask(RPM))).admitted
    assert not (await limiter.admit(ask(RPM))).admitted


async def test_a_reservation_never_settled_expires(limiter: Limiters) -> None:
    cap = Budget("spend:api_key:k1:all", 0.01, None, 0.0, "key k1")
    lost = ask(PAR, budgets=(cap,), cost=0.006, ttl=30.0)
    assert (await limiter.admit(lost)).admitted  # its worker dies: no settlement
    assert (await limiter.admit(ask(PAR, budgets=(cap,), cost=0.006, ttl=30.0))).admitted
    blocked = await limiter.admit(ask(PAR, budgets=(cap,), cost=0.006))
    assert blocked.refused == PAR
    limiter.clock.now += 31.0  # both expired: their places and reserved cost come back
    assert (await limiter.admit(ask(PAR, budgets=(cap,), cost=0.006))).admitted
    assert (await limiter.admit(ask(PAR, budgets=(cap,), cost=0.003))).admitted
    assert not (await limiter.settle(lost.id, 10, 1.0)).found  # too late: nothing changes


async def test_budget_reserves_in_flight_cost_and_settles_the_real_cost(
    limiter: Limiters,
) -> None:
    cap = Budget("spend:api_key:k1:all", 0.01, 0.002, 0.0, "key k1")
    asks = [ask(budgets=(cap,), cost=0.004) for _ in range(3)]
    results = [await limiter.admit(a) for a in asks]
    assert [r.admitted for r in results] == [True, True, True]  # 0, 0.004, 0.008 < 0.01
    over = await limiter.admit(ask(budgets=(cap,), cost=0.004))
    assert over.refused == cap and over.spent == pytest.approx(0.012)
    settled = [await limiter.settle(a.id, 10, 0.001) for a in asks]
    assert settled[-1].spend["spend:api_key:k1:all"] == pytest.approx(0.003)
    assert settled[-1].soft == {"spend:api_key:k1:all": 0.002}
    assert (await limiter.admit(ask(budgets=(cap,), cost=0.004))).admitted


async def test_a_soft_budget_alone_is_tracked_and_never_refuses(limiter: Limiters) -> None:
    soft = Budget("spend:user_id:u1:all", None, 0.01, 0.0, "user u1")
    spends = []
    for _ in range(3):
        request = ask(budgets=(soft,), cost=0.02)
        assert (await limiter.admit(request)).admitted
        settled = await limiter.settle(request.id, 0, 0.008)
        spends.append(round(settled.spend["spend:user_id:u1:all"], 6))
    assert spends == [0.008, 0.016, 0.024]
    assert settled.soft == {"spend:user_id:u1:all": 0.01}


async def test_budget_follows_the_persisted_spend(limiter: Limiters) -> None:
    first = ask(budgets=(Budget("spend:team_id:t1:all", 1.0, None, 0.5, "team t1"),), cost=0.1)
    await limiter.admit(first)
    await limiter.settle(first.id, 0, 0.3)  # 0.8 spent: 0.5 persisted + 0.3 settled here
    # The spend writer flushed the 0.3 (0.8 persisted): counted once, not twice.
    later = Budget("spend:team_id:t1:all", 1.0, None, 0.8, "team t1")
    assert (await limiter.admit(ask(budgets=(later,), cost=0.15))).admitted  # 0.8 < 1
    assert (await limiter.admit(ask(budgets=(later,), cost=0.15))).admitted  # 0.95 < 1
    refused = await limiter.admit(ask(budgets=(later,), cost=0.15))
    assert refused.refused == later and refused.spent == pytest.approx(1.1)
    # Someone else (a LiteLLM proxy on the same database) spent 0.5 meanwhile.
    elsewhere = Budget("spend:team_id:t1:all", 1.0, None, 1.3, "team t1")
    assert (await limiter.admit(ask(budgets=(elsewhere,)))).refused == elsewhere


async def test_redis_admission_is_one_round_trip() -> None:
    redis_server.client().close()
    prefix = redis_server.new_prefix()
    client = aioredis.Redis.from_url(redis_server.URL)
    clock = Clock()
    limiter = RedisLimiter(
        client, LocalLimiter(MemoryState(), clock), prefix, clock_from_redis=False
    )
    try:
        request = ask(
            RPM,
            TPM,
            PAR,
            TEAM_RPM,
            budgets=(Budget("spend:x:all", 1.0, None, 0.0, "x"),),
            tokens=10,
            cost=0.01,
        )
        assert (await limiter.admit(request)).admitted
        assert (limiter.script_calls, limiter.pipelines) == (1, 1)  # after SCRIPT LOAD, once
        await limiter.settle(request.id, 5, 0.001)
        assert (limiter.script_calls, limiter.pipelines) == (2, 2)
        # Requests arriving while a pipeline is out share the next one.
        asks = [ask(RPM, tokens=1) for _ in range(50)]
        await asyncio.gather(*(limiter.admit(a) for a in asks))
        assert limiter.script_calls == 52 and limiter.pipelines <= 4
    finally:
        await client.aclose()
        redis_server.drop_prefix(prefix)


async def test_redis_down_falls_back_to_the_local_buckets(caplog: pytest.LogCaptureFixture) -> None:
    from llmux_extproc.observability import metrics
    from tests.harness import free_port

    clock = Clock()
    dead = aioredis.Redis(
        host="127.0.0.1", port=free_port(), socket_timeout=0.05, socket_connect_timeout=0.05
    )
    limiter = RedisLimiter(dead, LocalLimiter(MemoryState(), clock), "x:", clock_from_redis=False)
    before = metrics.REDIS_ERRORS._value.get()
    results = [(await limiter.admit(ask(RPM))).admitted for _ in range(4)]
    assert results == [True, True, True, False]  # the local bucket holds the limit
    assert metrics.REDIS_ERRORS._value.get() == before + 1  # then 1 s without asking Redis
    assert sum("Redis unreachable" in r.message for r in caplog.records) == 1
    await dead.aclose()


def test_rate_limit_headers_name_the_tightest_bucket() -> None:
    state = MemoryState()
    limiter = LocalLimiter(state, Clock())
    wide = Limit("team_id:t:requests", "requests", 100, "team t", "rpm_limit")
    decision = limiter.admit_now(ask(RPM, wide, TPM, PAR, tokens=300))
    headers = ratelimit_headers(decision.headroom)
    assert headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "20",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "18",
    }


def principal(**limits: object) -> Principal:
    return Principal(
        token="h" * 64,
        key_alias="ci",
        team_id="t1",
        user_id="u1",
        limits=Limits(**limits),  # type: ignore[arg-type]
        team_limits=Limits(
            rpm_limit=50, max_budget=5.0, budget_duration="1h", budget_reset_at=2000.0, spend=4.0
        ),
        user_limits=Limits(),
    )


def test_what_a_request_asks_for() -> None:
    p = principal(
        rpm_limit=10,
        tpm_limit=1000,
        max_parallel_requests=2,
        max_budget=1.0,
        model_rpm_limit={"gpt-4o": 5},
        model_tpm_limit={"gpt-4o": 500},
    )
    request = budgets.ask_for(p, "r1", "gpt-4o", {"max_tokens": 100}, 400, (1e-6, 2e-6), 1000.0, 60)
    assert [(lim.key, lim.kind, lim.limit, lim.param) for lim in request.limits] == [
        (f"api_key:{'h' * 64}:requests", "requests", 10, "rpm_limit"),
        (f"api_key:{'h' * 64}:tokens", "tokens", 1000, "tpm_limit"),
        (f"api_key:{'h' * 64}:parallel", "parallel", 2, "max_parallel_requests"),
        ("team_id:t1:requests", "requests", 50, "rpm_limit"),
        (f"model_per_key:{'h' * 64}:gpt-4o:requests", "requests", 5, "model_rpm_limit"),
        (f"model_per_key:{'h' * 64}:gpt-4o:tokens", "tokens", 500, "model_tpm_limit"),
    ]
    assert request.tokens == 101 + 100
    assert request.cost == pytest.approx(101e-6 + 200e-6)
    assert [(b.key, b.max_budget, b.spend) for b in request.budgets] == [
        (f"spend:api_key:{'h' * 64}:all", 1.0, 0.0),
        ("spend:team_id:t1:2000", 5.0, 4.0),
    ]


def test_a_passed_budget_window_starts_from_zero() -> None:
    # budget_reset_at 2000, 1h windows: at 9000 the window ending 9200 runs, and the
    # persisted 4.0 belongs to a window that ended (LiteLLM resets the row there).
    team = budgets.budgets_of(principal(), 9000.0)[0]
    assert (team.key, team.spend) == ("spend:team_id:t1:9200", 0.0)


@pytest.mark.parametrize(
    ("refused", "status", "kind", "param"),
    [
        (RPM, 429, "rate_limit_error", "rpm_limit"),
        (
            Budget("spend:api_key:k:all", 0.01, None, 0.0, "key ci"),
            400,
            "budget_exceeded",
            "max_budget",
        ),
    ],
)
def test_refusals_are_openai_shaped(
    refused: Limit | Budget, status: int, kind: str, param: str
) -> None:
    err = budgets.refusal(Decision(False, refused, 12.3, spent=0.011))
    assert (err.status, err.type, err.param) == (status, kind, param)
    assert ("12 s" in err.message) if status == 429 else ("0.011" in err.message)


def test_a_soft_budget_is_a_log_line_and_a_metric_once(caplog: pytest.LogCaptureFixture) -> None:
    from llmux_extproc.observability import metrics

    key = "spend:team_id:soft-test:all"
    counter = metrics.SOFT_BUDGET_EXCEEDED.labels("team_id")
    before = counter._value.get()
    budgets.soft_budget_crossed(Settled(True, {key: 0.009}, {key: 0.01}))  # below: nothing
    for _ in range(3):
        budgets.soft_budget_crossed(Settled(True, {key: 0.02}, {key: 0.01}))
    assert counter._value.get() == before + 1
    assert sum("soft budget reached" in r.message for r in caplog.records) == 1


def test_keys_without_limits_skip_the_limiter() -> None:
    assert not Principal(token="t", team_limits=Limits(), user_limits=Limits()).limited
    assert Principal(token="t", team_limits=Limits(tpm_limit=5)).limited
    assert Principal(token="t", limits=Limits(model_rpm_limit={"m": 1})).limited
    assert Principal(token="t", user_limits=Limits(soft_budget=1.0)).limited
