"""Budgets and spend of teams and keys as gauges, read from the key database.

The supervisor re-reads the rows that have a `max_budget` every `user_api_key_cache_ttl`
seconds (LiteLLM re-reads them every few minutes for its own budget metrics), so alerts can
say a budget is nearly spent. Spend is the database's `spend` column, LiteLLM's: whatever
writes it (LLMux's spend logs, a LiteLLM proxy on the same database) is what the gauges
show. Labels are ids and aliases from those rows, never a key: a key is named by its alias,
else LiteLLM's `sk-...abcd` key name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from llmux_extproc.control.config import Config
from llmux_extproc.observability import metrics

log = logging.getLogger("llmux.budgets")

TEAMS = """
SELECT "team_id", COALESCE("team_alias", ''), "max_budget", "spend"
FROM "LiteLLM_TeamTable" WHERE "max_budget" IS NOT NULL ORDER BY "team_id"
"""
KEYS = """
SELECT COALESCE("key_alias", "key_name", left("token", 12)), COALESCE("team_id", 'default'),
       "max_budget", "spend"
FROM "LiteLLM_VerificationToken" WHERE "max_budget" IS NOT NULL ORDER BY "token"
"""


@dataclass(frozen=True, slots=True)
class Budget:
    name: str  # team id, or the key's alias / key name
    group: str  # team alias, or the key's team
    max_budget: float
    spend: float


def read(dsn: str) -> tuple[list[Budget], list[Budget]]:
    """(teams, keys) with a budget; blocking, run in a thread."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        teams = [Budget(str(a), str(b), float(c), float(d)) for a, b, c, d in conn.execute(TEAMS)]
        keys = [Budget(str(a), str(b), float(c), float(d)) for a, b, c, d in conn.execute(KEYS)]
    return teams, keys


def publish(teams: list[Budget], keys: list[Budget], litellm: bool) -> None:
    for t in teams:
        metrics.TEAM_BUDGET.labels(t.name, t.group).set(t.max_budget)
        metrics.TEAM_SPEND.labels(t.name, t.group).set(t.spend)
        if litellm:
            metrics.LITELLM_TEAM_MAX_BUDGET.labels(t.name, t.group).set(t.max_budget)
            metrics.LITELLM_TEAM_REMAINING.labels(t.name, t.group).set(t.max_budget - t.spend)
    for k in keys:
        metrics.KEY_BUDGET.labels(k.name, k.group).set(k.max_budget)
        metrics.KEY_SPEND.labels(k.name, k.group).set(k.spend)
        if litellm:
            metrics.LITELLM_KEY_MAX_BUDGET.labels(k.name).set(k.max_budget)
            metrics.LITELLM_KEY_REMAINING.labels(k.name).set(k.max_budget - k.spend)


async def watch(config: Callable[[], Config]) -> None:
    """Re-read and publish budgets for as long as the supervisor runs; a database that is
    down is logged once per outage and tried again at the next interval."""
    failing = False
    while True:
        current = config()
        if current.database_url:
            try:
                teams, keys = await asyncio.to_thread(read, current.database_url)
            except psycopg.Error as exc:
                if not failing:
                    log.warning("budget metrics: cannot read the key database (%s)", exc)
                failing = True
            else:
                failing = False
                publish(teams, keys, current.litellm_metrics)
        await asyncio.sleep(current.key_cache_ttl_s)
