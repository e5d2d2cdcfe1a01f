"""What one request asks of the limiter: its buckets (per key, team, user, model per key),
its budget windows (per key, team, user), its token and cost estimates; and what a
settled budget's spend means (soft budget alerts).

Plain functions of a principal, the request and a clock (docs/architecture.md, "Keys,
limits and budgets"); `limits.py` applies them.

Budget windows. LiteLLM stores the end of the current window in `budget_reset_at` and
resets `spend` to 0 there (its reset job; `budget_duration` `30d`, `1h`, ...). The
window's id is that instant, so a new window starts a fresh reservation counter. Once
`now` passed `budget_reset_at` the persisted spend belongs to the finished window and
counts as 0 until the row is reset (by LiteLLM's job or LLMux's spend writer) and re-read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from llmux_extproc.db.management import duration_seconds
from llmux_extproc.errors import GatewayError
from llmux_extproc.observability import metrics
from llmux_extproc.policy.keys import Limits, Principal
from llmux_extproc.policy.limits import Ask, Budget, Decision, Limit, Settled

log = logging.getLogger("llmux.budgets")

# Completion tokens reserved for TPM and cost when the request sets no max_tokens: the
# settlement replaces it by the real count, so it only bounds what concurrent requests can
# take before the first of them ends.
DEFAULT_COMPLETION_ESTIMATE = 256
# ~4 bytes per token for JSON chat bodies: tiktoken would cost ~75 ns a byte on the hot
# path, and the estimate is replaced by the real usage when the answer ends.
BYTES_PER_TOKEN = 4


def _window(limits: Limits, now: float) -> tuple[str, float]:
    """The budget window's id and the spend PostgreSQL has for it."""
    reset_at = limits.budget_reset_at
    if limits.budget_duration is None or reset_at is None:
        return "all", limits.spend
    if now < reset_at:
        return f"{int(reset_at)}", limits.spend
    try:
        step = duration_seconds(limits.budget_duration, "budget_duration")
    except GatewayError:
        return "all", limits.spend
    step = max(step, 1)
    ends = reset_at + step * (int((now - reset_at) // step) + 1)
    return f"{int(ends)}", 0.0


def _scopes(principal: Principal) -> list[tuple[str, str, Limits]]:
    """(store key, what errors call it, limits) of the key, its team and its user."""
    scopes = [(f"api_key:{principal.token}", f"key {principal.label}", principal.limits)]
    if principal.team_id and principal.team_limits is not None:
        scopes.append(
            (f"team_id:{principal.team_id}", f"team {principal.team_id}", principal.team_limits)
        )
    if principal.user_id and principal.user_limits is not None:
        scopes.append(
            (f"user_id:{principal.user_id}", f"user {principal.user_id}", principal.user_limits)
        )
    return scopes


def limits_of(principal: Principal, model: str) -> tuple[Limit, ...]:
    """The buckets of a request (LiteLLM's scopes and key names: `api_key`, `team_id`,
    `user_id`, `model_per_key`)."""
    found: list[Limit] = []
    for key, name, lim in _scopes(principal):
        if lim.rpm_limit is not None:
            found.append(Limit(f"{key}:requests", "requests", lim.rpm_limit, name, "rpm_limit"))
        if lim.tpm_limit is not None:
            found.append(Limit(f"{key}:tokens", "tokens", lim.tpm_limit, name, "tpm_limit"))
        if lim.max_parallel_requests is not None:
            found.append(
                Limit(
                    f"{key}:parallel",
                    "parallel",
                    lim.max_parallel_requests,
                    name,
                    "max_parallel_requests",
                )
            )
    per_model = f"model_per_key:{principal.token}:{model}"
    rpm = principal.limits.model_rpm_limit.get(model)
    if rpm is not None:
        found.append(
            Limit(
                f"{per_model}:requests",
                "requests",
                rpm,
                f"key {principal.label} on {model}",
                "model_rpm_limit",
            )
        )
    tpm = principal.limits.model_tpm_limit.get(model)
    if tpm is not None:
        found.append(
            Limit(
                f"{per_model}:tokens",
                "tokens",
                tpm,
                f"key {principal.label} on {model}",
                "model_tpm_limit",
            )
        )
    return tuple(found)


def budgets_of(principal: Principal, now: float) -> tuple[Budget, ...]:
    found: list[Budget] = []
    for key, name, lim in _scopes(principal):
        if lim.max_budget is None and lim.soft_budget is None:
            continue
        window, spend = _window(lim, now)
        found.append(Budget(f"spend:{key}:{window}", lim.max_budget, lim.soft_budget, spend, name))
    return tuple(found)


def estimate_tokens(body: Mapping[str, Any], raw_length: int) -> tuple[int, int]:
    """(prompt, completion) token estimates of a request, without a tokenizer."""
    prompt = raw_length // BYTES_PER_TOKEN + 1
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(completion, int) or completion <= 0:
        completion = DEFAULT_COMPLETION_ESTIMATE
    return prompt, completion


def ask_for(
    principal: Principal,
    request_id: str,
    model: str,
    body: Mapping[str, Any],
    raw_length: int,
    prices: tuple[float, float],
    now: float,
    ttl_s: float,
) -> Ask:
    """What a request asks for; `prices` the highest (input, output) USD per token among
    the deployments that may answer it (a fallback may be dearer than the first choice)."""
    prompt, completion = estimate_tokens(body, raw_length)
    return Ask(
        id=request_id,
        limits=limits_of(principal, model),
        budgets=budgets_of(principal, now),
        tokens=prompt + completion,
        cost=prompt * prices[0] + completion * prices[1],
        ttl_s=ttl_s,
    )


def refusal(decision: Decision) -> GatewayError:
    """The client's error for a refused admission: LiteLLM's 429 for a rate limit (with
    the limit named) and its 400 `budget_exceeded` for a budget."""
    what = decision.refused
    if isinstance(what, Budget):
        assert what.max_budget is not None
        return GatewayError(
            400,
            f"Budget has been exceeded! {what.name} spend: {decision.spent:.6f}, "
            f"max budget: {what.max_budget}",
            type="budget_exceeded",
            param=what.param,
            code="400",
        )
    assert what is not None
    noun = {"requests": "requests per minute", "tokens": "tokens per minute"}.get(
        what.kind, "parallel requests"
    )
    return GatewayError(
        429,
        f"Rate limit exceeded for {what.name}: {what.param} {what.limit} ({noun}). "
        f"Retry after {max(1, round(decision.retry_after_s))} s.",
        param=what.param,
        code="rate_limit_exceeded",
    )


# Budget windows whose soft budget this worker has reported: once per window and worker,
# not on every later request.
_reported: set[str] = set()


def soft_budget_crossed(settled: Settled) -> None:
    """A log line and a metric for each budget whose soft limit the settled spend reached
    (`soft_budget`: never a refusal)."""
    for key, soft in settled.soft.items():
        total = settled.spend.get(key)
        if total is None or total < soft or key in _reported:
            continue
        if len(_reported) > 100_000:
            _reported.clear()
        _reported.add(key)
        scope = key.split(":")[1]  # spend:<scope>:<id>:<window>
        metrics.SOFT_BUDGET_EXCEEDED.labels(scope).inc()
        log.warning("soft budget reached: %s spent %.6f of soft_budget %s", key, total, soft)
