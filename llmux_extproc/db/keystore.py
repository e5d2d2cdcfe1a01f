"""The key store of one worker: its cache of principals, filled from and kept in step with
PostgreSQL (docs/architecture.md, Keys, limits and budgets).

- A cache hit is answered by `KeyCache` alone (hash + dict lookup).
- A miss is one query by primary key (the key's row joined with its team, user and budget
  rows); concurrent misses for one key share it.
- Invalidation: `LISTEN llmux_auth` (the triggers of migration 0002 name every changed key,
  team, user or budget, whoever changed it), plus a re-read of every cached key each
  `user_api_key_cache_ttl` seconds and whenever the listener (re)connects, for
  notifications lost while its connection was down.
- PostgreSQL down: cached keys keep working as last seen; a miss fails with a 503 within
  `LOOKUP_TIMEOUT_S`, and at once for `FAIL_FAST_S` after a failure, so requests for new
  keys do not queue up behind a dead database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from llmux_extproc.errors import GatewayError
from llmux_extproc.policy.keys import (
    KeyCache,
    Limits,
    Missing,
    ModelScope,
    Principal,
    hash_key,
)

log = logging.getLogger("llmux.keys")

CHANNEL = "llmux_auth"
LOOKUP_TIMEOUT_S = 2.0
FAIL_FAST_S = 1.0
# Misses and management calls are rare next to hits: a few connections per worker keep
# LLMux far from PostgreSQL's max_connections (LiteLLM's "too many clients").
POOL_MAX = 3

_PRINCIPAL_SQL = """
SELECT k.token, k.key_name, k.key_alias, k.user_id, k.team_id, k.budget_id, k.models,
       k.blocked, k.expires, k.rpm_limit, k.tpm_limit, k.max_parallel_requests,
       k.max_budget, k.budget_duration, k.spend, k.metadata, k.aliases, k.budget_reset_at,
       b.soft_budget AS b_soft_budget, b.max_budget AS b_max_budget,
       b.rpm_limit AS b_rpm_limit, b.tpm_limit AS b_tpm_limit,
       b.max_parallel_requests AS b_max_parallel_requests,
       b.budget_duration AS b_budget_duration,
       t.team_id AS t_team_id, t.team_alias, t.models AS t_models, t.blocked AS t_blocked,
       t.rpm_limit AS t_rpm_limit, t.tpm_limit AS t_tpm_limit,
       t.max_parallel_requests AS t_max_parallel_requests, t.max_budget AS t_max_budget,
       t.soft_budget AS t_soft_budget, t.budget_duration AS t_budget_duration,
       t.spend AS t_spend, t.metadata AS t_metadata, t.budget_reset_at AS t_budget_reset_at,
       u.user_id AS u_user_id, u.rpm_limit AS u_rpm_limit, u.tpm_limit AS u_tpm_limit,
       u.max_parallel_requests AS u_max_parallel_requests, u.max_budget AS u_max_budget,
       u.budget_duration AS u_budget_duration, u.spend AS u_spend,
       u.budget_reset_at AS u_budget_reset_at
FROM "LiteLLM_VerificationToken" k
LEFT JOIN "LiteLLM_TeamTable" t ON t.team_id = k.team_id
LEFT JOIN "LiteLLM_UserTable" u ON u.user_id = k.user_id
LEFT JOIN "LiteLLM_BudgetTable" b ON b.budget_id = k.budget_id
"""
_BY_TOKEN = _PRINCIPAL_SQL + " WHERE k.token = %s"
_BY_TOKENS = _PRINCIPAL_SQL + " WHERE k.token = ANY(%s)"


def unavailable(detail: str) -> GatewayError:
    return GatewayError(
        503,
        f"The key could not be verified: the key database is unavailable ({detail}). "
        "Retry later; keys already in use are not affected.",
        code="database_unavailable",
    )


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # Json columns some LiteLLM versions wrote as JSON text
        with contextlib.suppress(orjson.JSONDecodeError):
            value = orjson.loads(value)
    return value if isinstance(value, dict) else {}


def _epoch(value: datetime | None) -> float | None:
    # Prisma stores DateTime as UTC in `timestamp(3) without time zone`.
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int | float)}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def principal_from_row(row: Mapping[str, Any]) -> Principal:
    metadata = _json(row["metadata"])
    team_found = row["t_team_id"] is not None
    team_scope = ModelScope.parse(row["t_models"]) if team_found else ModelScope()
    team_metadata = _json(row["t_metadata"]) if team_found else {}
    return Principal(
        token=row["token"],
        key_name=row["key_name"],
        key_alias=row["key_alias"],
        user_id=row["user_id"],
        team_id=row["team_id"],
        team_alias=row["team_alias"],
        budget_id=row["budget_id"],
        models=ModelScope.parse(row["models"], team_scope),
        team_models=team_scope,
        blocked=bool(row["blocked"]),
        team_blocked=bool(row["t_blocked"]),
        expires=_epoch(row["expires"]),
        # A key's own limits, else those of the budget row it points at (LiteLLM's
        # litellm_budget_table).
        limits=Limits(
            rpm_limit=_first(row["rpm_limit"], row["b_rpm_limit"]),
            tpm_limit=_first(row["tpm_limit"], row["b_tpm_limit"]),
            max_parallel_requests=_first(
                row["max_parallel_requests"], row["b_max_parallel_requests"]
            ),
            max_budget=_first(row["max_budget"], row["b_max_budget"]),
            soft_budget=row["b_soft_budget"],
            budget_duration=_first(row["budget_duration"], row["b_budget_duration"]),
            spend=float(row["spend"] or 0.0),
            budget_reset_at=_epoch(row["budget_reset_at"]),
            model_rpm_limit=_int_map(metadata.get("model_rpm_limit")),
            model_tpm_limit=_int_map(metadata.get("model_tpm_limit")),
        ),
        team_limits=Limits(
            rpm_limit=row["t_rpm_limit"],
            tpm_limit=row["t_tpm_limit"],
            max_parallel_requests=row["t_max_parallel_requests"],
            max_budget=row["t_max_budget"],
            soft_budget=row["t_soft_budget"],
            budget_duration=row["t_budget_duration"],
            spend=float(row["t_spend"] or 0.0),
            budget_reset_at=_epoch(row["t_budget_reset_at"]),
            model_rpm_limit=_int_map(team_metadata.get("model_rpm_limit")),
            model_tpm_limit=_int_map(team_metadata.get("model_tpm_limit")),
        )
        if team_found
        else None,
        user_limits=Limits(
            rpm_limit=row["u_rpm_limit"],
            tpm_limit=row["u_tpm_limit"],
            max_parallel_requests=row["u_max_parallel_requests"],
            max_budget=row["u_max_budget"],
            budget_duration=row["u_budget_duration"],
            spend=float(row["u_spend"] or 0.0),
            budget_reset_at=_epoch(row["u_budget_reset_at"]),
        )
        if row["u_user_id"] is not None
        else None,
        metadata=metadata,
        aliases={str(k): v for k, v in _json(row["aliases"]).items() if isinstance(v, str)},
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return "its tables are missing: run `llmux db migrate`"
    if isinstance(exc, PoolTimeout | TimeoutError):
        return "no connection within the timeout"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cached(keys: int) -> None:
    # Imported here: the supervisor imports this module before it sets
    # PROMETHEUS_MULTIPROC_DIR, and metrics created before that are lost to /metrics.
    from llmux_extproc.observability import metrics

    metrics.KEY_CACHE.set(keys)


class KeyStore:
    def __init__(self, dsn: str, refresh_s: float, *, pool_max: int = POOL_MAX) -> None:
        self.dsn = dsn
        self.refresh_s = refresh_s
        # A hash found in no row is remembered as long as a change could go unnoticed.
        self.cache = KeyCache(unknown_ttl_s=refresh_s)
        self.pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_max,
            open=False,
            timeout=LOOKUP_TIMEOUT_S,
            name="llmux",
            kwargs={"autocommit": True, "connect_timeout": 2},
        )
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}
        self._down_until = 0.0
        self._down_logged = False
        # Counts invalidations: a lookup or re-read that overlapped one does not cache what
        # it read, which may predate the change.
        self._changes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()

    async def start(self) -> None:
        # Not waiting: a database that is down at start must not keep the worker from
        # serving the master key (the pool keeps connecting in the background).
        await self.pool.open(wait=False)
        _cached(0)  # this worker's series exists from the start
        self._tasks = [
            asyncio.create_task(self._listen(), name="llmux-keys-listen"),
            asyncio.create_task(self._refresh_loop(), name="llmux-keys-refresh"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close(timeout=1)

    # -- the request path ------------------------------------------------------------

    def cached(self, key: str) -> tuple[str, Principal | Missing | None]:
        token = hash_key(key)
        return token, self.cache.get(token)

    async def lookup(self, token: str) -> Principal | None:
        """The principal of a hashed key from PostgreSQL (None: no such key); a 503
        GatewayError when the database cannot say."""
        pending = self._inflight.get(token)
        if pending is not None:
            return await asyncio.shield(pending)
        if time.monotonic() < self._down_until:
            raise unavailable("it failed less than a second ago")
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[token] = future
        before = self._changes
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S + 0.5):
                rows = await self._query(_BY_TOKEN, (token,))
            principal = principal_from_row(rows[0]) if rows else None
        except (psycopg.Error, PoolTimeout, TimeoutError, OSError) as exc:
            self._down(exc)
            err = unavailable(_failure(exc))
            future.set_exception(err)
            future.exception()  # retrieved: waiters that never come must not warn
            raise err from exc
        finally:
            self._inflight.pop(token, None)
        self._up()
        if self._changes == before:
            self.cache.put(token, principal)
            _cached(len(self.cache))
        future.set_result(principal)
        return principal

    async def _query(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return await cur.fetchall()

    def _down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + FAIL_FAST_S
        if not self._down_logged:
            self._down_logged = True
            log.error(
                "key database unavailable (%s): cached keys keep working, new keys get 503",
                _failure(exc),
            )

    def _up(self) -> None:
        if self._down_logged:
            self._down_logged = False
            log.info("key database reachable again")

    # -- keeping the cache in step -----------------------------------------------------

    def notified(self, payload: str) -> None:
        """One `llmux_auth` notification: drop what it names."""
        kind, _, ident = payload.partition(":")
        self._changes += 1
        if kind == "k":
            self.cache.drop(ident)
        elif kind == "t":
            self.cache.drop_where(lambda p: p.team_id == ident)
        elif kind == "u":
            self.cache.drop_where(lambda p: p.user_id == ident)
        elif kind == "b":
            self.cache.drop_where(lambda p: p.budget_id == ident)
        else:  # a payload of a later version: be safe
            self.cache.clear()
        _cached(len(self.cache))

    async def refresh(self) -> bool:
        """Re-read every cached key in one query; False when the database could not say
        (the cache is kept as it is)."""
        tokens = self.cache.tokens()
        if not tokens:
            return True
        before = self._changes
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S * 5):
                rows = await self._query(_BY_TOKENS, (tokens,))
        except (psycopg.Error, PoolTimeout, TimeoutError, OSError) as exc:
            self._down(exc)
            return False
        self._up()
        found = {row["token"]: principal_from_row(row) for row in rows}
        if self._changes == before:
            self.cache.refreshed(tokens, found)
        else:  # a notification came meanwhile: only drop what is gone
            self.cache.refreshed((t for t in tokens if t not in found), {})
        _cached(len(self.cache))
        return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=2,
                    # A connection that died silently is noticed within ~20 s; the periodic
                    # re-read bounds what is missed meanwhile.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=2,
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    # Whatever changed while nobody listened.
                    self._changes += 1
                    await self.refresh()
                    self.listening.set()
                    async for note in conn.notifies():
                        self.notified(note.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                if self.listening.is_set():
                    log.warning("key change listener lost its connection: %s", _failure(exc))
            self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def tokens_of(keys: Iterable[str]) -> list[str]:
    """Hashed keys from raw `sk-` keys or hashes, as LiteLLM's `_hash_token_if_needed`."""
    return [hash_key(k) if k.startswith("sk-") else k for k in keys]
