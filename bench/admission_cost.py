"""Worker CPU of rate-limit and budget admission per request (docs: README, Rate limits
and budgets): the admission a virtual key with limits costs in `Gateway.on_body` (what
the request asks for, the limiter's atomic step, the x-ratelimit-* headers) and its
settlement, measured with `time.process_time` over many requests.

    .venv/bin/python -m bench.admission_cost [--redis redis://127.0.0.1:6379/0]

Without Redis the step runs on the replica's shared SQLite file (the workers' state);
with Redis, the figures are the worker's CPU only (Redis's own is apart) and the round
trips are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

from llmux_extproc.policy import budgets
from llmux_extproc.policy.keys import Limits, Principal
from llmux_extproc.policy.limits import LocalLimiter, MemoryState, SharedState, ratelimit_headers

PRINCIPAL = Principal(
    token="a" * 64,
    key_alias="bench",
    team_id="team-1",
    user_id="user-1",
    limits=Limits(rpm_limit=10**9, tpm_limit=10**12, max_parallel_requests=10**6, max_budget=1e9),
    team_limits=Limits(rpm_limit=10**9, max_budget=1e9),
    user_limits=Limits(),
)
# The common case: a key with rpm_limit and tpm_limit, nothing else.
TYPICAL = Principal(
    token="b" * 64, key_alias="typical", limits=Limits(rpm_limit=10**9, tpm_limit=10**12)
)
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello " * 50}]}


async def measure(limiter: object, n: int, who: Principal = PRINCIPAL) -> tuple[float, float]:
    """(admission, settlement) CPU µs per request, one request at a time."""
    admit_cpu = settle_cpu = 0.0
    for i in range(n):
        rid = f"r{i}-{secrets.token_hex(4)}"
        t0 = time.process_time()
        ask = budgets.ask_for(who, rid, "gpt-4o", BODY, 400, (2.5e-6, 1e-5), time.time(), 660.0)
        decision = await limiter.admit(ask)  # type: ignore[attr-defined]
        ratelimit_headers(decision.headroom)
        t1 = time.process_time()
        await limiter.settle(rid, 100, 0.001)  # type: ignore[attr-defined]
        t2 = time.process_time()
        assert decision.admitted
        admit_cpu += t1 - t0
        settle_cpu += t2 - t1
    return admit_cpu / n * 1e6, settle_cpu / n * 1e6


async def measure_concurrent(limiter: object, n: int, concurrency: int) -> float:
    """Admission + settlement CPU µs per request with `concurrency` requests at a time."""

    async def one(i: int) -> None:
        rid = f"c{i}-{secrets.token_hex(4)}"
        ask = budgets.ask_for(
            PRINCIPAL, rid, "gpt-4o", BODY, 400, (2.5e-6, 1e-5), time.time(), 660.0
        )
        decision = await limiter.admit(ask)  # type: ignore[attr-defined]
        ratelimit_headers(decision.headroom)
        await limiter.settle(rid, 100, 0.001)  # type: ignore[attr-defined]

    t0 = time.process_time()
    for start in range(0, n, concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + concurrency))))
    return (time.process_time() - t0) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis")
    parser.add_argument("-n", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, limiter in (
            ("dicts (one process)", LocalLimiter(MemoryState())),
            ("shared SQLite file (one replica)", LocalLimiter(SharedState(Path(tmp, "l.sqlite")))),
        ):
            await measure(limiter, 200)  # warm up
            a, s = await measure(limiter, args.n)
            print(f"{name}: admission {a:.1f} µs, settlement {s:.1f} µs of CPU per request")
            a, s = await measure(limiter, args.n, TYPICAL)
            print(f"  typical key (rpm + tpm): admission {a:.1f} µs, settlement {s:.1f} µs")
    if args.redis:
        import redis.asyncio as aioredis

        from llmux_extproc.policy.redis_limits import RedisLimiter, redis_client

        prefix = f"llmux_bench_{secrets.token_hex(4)}:"
        client = redis_client(args.redis)
        shared = RedisLimiter(client, LocalLimiter(MemoryState()), prefix)
        await measure(shared, 200)
        before = shared.script_calls
        a, s = await measure(shared, args.n)
        trips = (shared.script_calls - before) / args.n
        pipelines = shared.pipelines
        together = await measure_concurrent(shared, args.n, 100)
        print(
            f"Redis, 100 requests at a time: {together:.1f} µs of worker CPU per request "
            f"(admission + settlement), {shared.pipelines - pipelines} pipelines "
            f"for {2 * args.n} script calls"
        )
        print(
            f"Redis: admission {a:.1f} µs, settlement {s:.1f} µs of worker CPU per request; "
            f"{trips:.2f} script calls per request (admission + settlement), "
            f"{pipelines} pipelines"
        )
        cleanup = aioredis.Redis.from_url(args.redis)
        keys = [k async for k in cleanup.scan_iter(match=f"{prefix}*")]
        if keys:
            await cleanup.delete(*keys)
        await cleanup.aclose()
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
