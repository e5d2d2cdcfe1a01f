"""Spend logs: one row per answered request, written to LiteLLM's tables off the request path.

The request path only appends a `SpendRow` to a bounded in-memory queue (no I/O, no lock:
each worker has its own queue and its own event loop). A background task of the worker
writes what is queued in one transaction, once a second or sooner when `batch_max` rows
wait: the rows into `LiteLLM_SpendLogs`, their spend added to the key's, team's and user's
`spend` columns (as LiteLLM does), and the daily aggregates into `LiteLLM_DailyUserSpend`
and `LiteLLM_DailyTeamSpend`. LiteLLM wrote a row per request on the request path (its
#38312); a batch here is seven statements whatever its size: ~2 ms of the worker's CPU
per batch plus ~10 µs per row (a 500-row batch 6-7 ms, measured), and 20-60 ms of the
loaded test machine's PostgreSQL, awaited off the request path.

PostgreSQL down: a batch that fails goes back to the queue and is retried on the next tick;
the queue keeps at most `bound` rows, what does not fit is dropped and counted
(`llmux_spend_log_dropped_total`), so memory stays bounded through a long outage. The
connection pool reconnects by itself. A replayed batch (a commit whose reply was lost)
cannot count twice: rows are inserted with ON CONFLICT (request_id) DO NOTHING and only the
rows actually inserted add to the totals and daily tables.

At shutdown the worker calls `close()`, which writes what is left before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from psycopg import sql

from llmux_extproc.observability import metrics

log = logging.getLogger("llmux.spend")

INTERVAL_S = 1.0
BATCH_MAX = 500
# ~1 KB a row: 50 000 rows are ~50 MB per worker at most, about a minute of 800 req/s.
QUEUE_BOUND = 50_000
CLOSE_TIMEOUT_S = 3.0
# Serializes the daily upserts of all writers (workers, replicas): their unique keys have
# nullable columns, which ON CONFLICT cannot match, so they are updated-else-inserted.
DAILY_LOCK_ID = 0x6C6C6D7578_0002  # "llmux", 2
CALL_TYPES = {"chat": "acompletion", "embeddings": "aembedding"}


@dataclass(slots=True)
class SpendRow:
    request_id: str
    call_type: str
    api_key: str  # the key's sha256 (LiteLLM's token); never the key
    user: str | None
    team_id: str | None
    key_alias: str | None
    model: str  # the provider's model name
    model_group: str  # the public model name the client asked for
    model_id: str  # the deployment id
    provider: str
    api_base: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    spend: float
    start: float  # epoch seconds
    end: float
    status: str  # "success" or "failure", as LiteLLM writes it
    error: str | None = None

    @property
    def date(self) -> str:
        return _day(int(self.start // 86400))


@functools.lru_cache(maxsize=16)
def _day(days: int) -> str:
    """The UTC date `days` after the epoch (LiteLLM's daily tables key on it); cached, as a
    batch's rows share a day or two."""
    return (datetime(1970, 1, 1) + timedelta(days=days)).strftime("%Y-%m-%d")


class SpendQueue:
    """Bounded FIFO of rows waiting to be written; `put` is the only request-path call."""

    def __init__(self, bound: int = QUEUE_BOUND, batch_max: int = BATCH_MAX) -> None:
        self.bound = bound
        self.batch_max = batch_max
        self.rows: deque[SpendRow] = deque()
        self.dropped = 0
        # Set when a full batch waits, so the writer need not sleep out its interval.
        self.full = asyncio.Event()

    def __len__(self) -> int:
        return len(self.rows)

    def put(self, row: SpendRow) -> None:
        rows = self.rows
        if len(rows) >= self.bound:
            self._drop(1)
            return
        rows.append(row)
        if len(rows) >= self.batch_max:
            self.full.set()

    def take(self) -> list[SpendRow]:
        rows = self.rows
        n = min(len(rows), self.batch_max)
        batch = [rows.popleft() for _ in range(n)]
        if len(rows) < self.batch_max:
            self.full.clear()
        return batch

    def give_back(self, batch: list[SpendRow]) -> None:
        """A batch that could not be written goes back in front, oldest first; what then
        exceeds the bound (the newest rows) is dropped and counted."""
        self.rows.extendleft(reversed(batch))
        over = len(self.rows) - self.bound
        for _ in range(max(0, over)):
            self.rows.pop()
        if over > 0:
            self._drop(over)

    def _drop(self, n: int) -> None:
        if self.dropped == 0 or self.dropped // 1000 != (self.dropped + n) // 1000:
            log.error(
                "spend log queue full (%d rows): %d row(s) dropped so far",
                self.bound,
                self.dropped + n,
            )
        self.dropped += n
        metrics.SPEND_LOG_DROPPED.inc(n)


Sink = Callable[[list[SpendRow]], Awaitable[None]]


class SpendWriter:
    """Writes the queue through `sink` in batches: every `interval_s`, or at once when a
    full batch waits. `clock` and `pause` are injectable so the policy is tested without
    waiting."""

    def __init__(
        self,
        queue: SpendQueue,
        sink: Sink,
        *,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.queue = queue
        self.sink = sink
        self.interval_s = interval_s
        self.clock = clock
        self.pause = pause
        self.last = clock()
        self.written = 0
        self.failing = False
        self._task: asyncio.Task[None] | None = None

    def due(self) -> bool:
        queue = self.queue
        if not queue.rows:
            return False
        return len(queue) >= queue.batch_max or self.clock() - self.last >= self.interval_s

    async def tick(self) -> int:
        """Write one batch if one is due; the rows written (0 when none or on failure)."""
        if not self.due():
            return 0
        self.last = self.clock()
        return await self._write_one()

    async def _write_one(self) -> int:
        batch = self.queue.take()
        if not batch:
            return 0
        try:
            await self.sink(batch)
        except Exception as exc:  # the database's errors, whatever the driver raised
            self.queue.give_back(batch)
            if not self.failing:
                self.failing = True
                log.error(
                    "spend logs not written (%s): %d row(s) kept for the next try",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    len(self.queue),
                )
            return 0
        if self.failing:
            self.failing = False
            log.info("spend logs written again")
        self.written += len(batch)
        return len(batch)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmux-spend-writer")

    async def _run(self) -> None:
        while True:
            wait = max(0.0, self.interval_s - (self.clock() - self.last))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.full.wait(), wait)
            if self.queue.rows:
                await self.tick()
                if self.failing:
                    # A full queue keeps `full` set: without a pause a database that fails
                    # at once (a missing table) would be retried in a busy loop.
                    await self.pause(self.interval_s)
            else:
                self.last = self.clock()

    async def close(self, within_s: float = CLOSE_TIMEOUT_S) -> int:
        """Stop the loop and write everything left, trying for `within_s`; the rows that
        could not be written (logged and counted as dropped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = self.clock() + within_s
        while self.queue.rows and self.clock() < deadline:
            if await self._write_one() == 0:
                await asyncio.sleep(0.2)
        left = len(self.queue)
        if left:
            log.error("shutdown: %d spend log row(s) could not be written and are lost", left)
            self.queue.rows.clear()
            self.queue._drop(left)
        return left


# -- PostgreSQL ---------------------------------------------------------------------------

_LOG_COLUMNS = (
    "request_id",
    "call_type",
    "api_key",
    "spend",
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "startTime",
    "endTime",
    "request_duration_ms",
    "model",
    "model_id",
    "model_group",
    "custom_llm_provider",
    "api_base",
    "user",
    "metadata",
    "cache_hit",
    "request_tags",
    "team_id",
    "status",
)
_LOG_TYPES = (
    "text", "text", "text", "float8", "int4", "int4", "int4", "timestamp", "timestamp",
    "int4", "text", "text", "text", "text", "text", "text", "jsonb", "text", "jsonb", "text",
    "text",
)  # fmt: skip
# The batch travels as one JSON document (orjson, in C) that PostgreSQL splits into rows:
# psycopg dumps arrays element by element in Python: 500 rows as 21 text arrays cost 24 ms
# of the worker's CPU (80% of it escaping), as binary arrays 10 ms, as JSON 6-7 ms (all
# statements of the batch included; measured with process_time).
_INSERT_LOGS = sql.SQL(
    'INSERT INTO "LiteLLM_SpendLogs" ({columns}) SELECT {columns} FROM'
    " jsonb_to_recordset(%s::jsonb) AS r({typed})"
    " ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
).format(
    columns=sql.SQL(", ").join(map(sql.Identifier, _LOG_COLUMNS)),
    typed=sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
        for c, t in zip(_LOG_COLUMNS, _LOG_TYPES, strict=True)
    ),
)


def _utc(epoch: float) -> datetime:
    # Prisma's `timestamp(3) without time zone`, holding UTC.
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


def _metadata(row: SpendRow) -> dict[str, Any]:
    # What LiteLLM's UI reads from a spend log's metadata; the key alias and the error type.
    meta: dict[str, Any] = {
        "user_api_key": row.api_key,
        "user_api_key_alias": row.key_alias,
        "user_api_key_team_id": row.team_id,
        "user_api_key_user_id": row.user,
        "status": row.status,
        "usage_object": {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": row.cached_tokens},
        },
    }
    if row.error:
        meta["error_information"] = {"error_class": row.error}
    return meta


def _document(rows: list[SpendRow]) -> str:
    return orjson.dumps(
        [
            {
                "request_id": r.request_id,
                "call_type": r.call_type,
                "api_key": r.api_key,
                "spend": r.spend,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "startTime": _utc(r.start),
                "endTime": _utc(r.end),
                "request_duration_ms": round((r.end - r.start) * 1000),
                "model": r.model,
                "model_id": r.model_id,
                "model_group": r.model_group,
                "custom_llm_provider": r.provider,
                "api_base": r.api_base,
                "user": r.user or "",
                "metadata": _metadata(r),
                "cache_hit": "False",
                "request_tags": [],
                "team_id": r.team_id,
                "status": r.status,
            }
            for r in rows
        ]
    ).decode()


def _sums(pairs: Iterable[tuple[str | None, float]]) -> tuple[list[str], list[float]]:
    totals: dict[str, float] = {}
    for ident, spend in pairs:
        if ident:
            totals[ident] = totals.get(ident, 0.0) + spend
    return list(totals), list(totals.values())


_ADD_SPEND = (
    "UPDATE {table} t SET spend = t.spend + d.spend FROM "
    "(SELECT unnest(%s::text[]) AS id, unnest(%s::float8[]) AS spend) d "
    "WHERE t.{column} = d.id"
)

DailyKey = tuple[str | None, str, str, str, str]  # owner, date, api_key, model, provider


@dataclass(slots=True)
class Daily:
    model_group: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read: int = 0
    cache_creation: int = 0
    spend: float = 0.0
    requests: int = 0
    successes: int = 0
    failures: int = 0

    def add(self, row: SpendRow) -> None:
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.cache_read += row.cached_tokens
        self.cache_creation += row.cache_write_tokens
        self.spend += row.spend
        self.requests += 1
        if row.status == "success":
            self.successes += 1
        else:
            self.failures += 1


def daily(
    rows: Iterable[SpendRow], owner: Callable[[SpendRow], str | None]
) -> dict[DailyKey, Daily]:
    """LiteLLM's daily aggregates of `rows`, keyed as its unique index (without the MCP tool
    and endpoint columns, which LLMux leaves NULL)."""
    out: dict[DailyKey, Daily] = {}
    for row in rows:
        key = (owner(row), row.date, row.api_key, row.model, row.provider)
        entry = out.get(key)
        if entry is None:
            entry = out[key] = Daily(row.model_group)
        entry.add(row)
    return out


_DAILY_UPSERT = """
WITH d AS (
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
        %b::text[], %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::float8[],
        %b::int8[], %b::int8[], %b::int8[])
        AS d(owner, date, api_key, model, provider, model_group, prompt_tokens,
             completion_tokens, cache_read, cache_creation, spend, requests, successes,
             failures)
), updated AS (
    UPDATE {table} t SET
        prompt_tokens = t.prompt_tokens + d.prompt_tokens,
        completion_tokens = t.completion_tokens + d.completion_tokens,
        cache_read_input_tokens = t.cache_read_input_tokens + d.cache_read,
        cache_creation_input_tokens = t.cache_creation_input_tokens + d.cache_creation,
        spend = t.spend + d.spend,
        api_requests = t.api_requests + d.requests,
        successful_requests = t.successful_requests + d.successes,
        failed_requests = t.failed_requests + d.failures,
        updated_at = %s
    FROM d
    WHERE t.{owner} IS NOT DISTINCT FROM d.owner AND t.date = d.date
        AND t.api_key = d.api_key AND t.model IS NOT DISTINCT FROM d.model
        AND t.custom_llm_provider IS NOT DISTINCT FROM d.provider
        AND t.mcp_namespaced_tool_name IS NULL AND t.endpoint IS NULL
    RETURNING d.owner, d.date, d.api_key, d.model, d.provider
)
INSERT INTO {table} (id, {owner}, date, api_key, model, model_group, custom_llm_provider,
    prompt_tokens, completion_tokens, cache_read_input_tokens, cache_creation_input_tokens,
    spend, api_requests, successful_requests, failed_requests, created_at, updated_at)
SELECT gen_random_uuid()::text, d.owner, d.date, d.api_key, d.model, d.model_group,
    d.provider, d.prompt_tokens, d.completion_tokens, d.cache_read, d.cache_creation,
    d.spend, d.requests, d.successes, d.failures, %s, %s
FROM d WHERE NOT EXISTS (
    SELECT 1 FROM updated u WHERE u.owner IS NOT DISTINCT FROM d.owner AND u.date = d.date
        AND u.api_key = d.api_key AND u.model IS NOT DISTINCT FROM d.model
        AND u.provider IS NOT DISTINCT FROM d.provider
)
"""


async def _upsert_daily(cur: Any, table: str, column: str, totals: dict[DailyKey, Daily]) -> None:
    """One statement per table: the daily rows that exist are added to, the others made
    (the daily lock, taken by the caller, keeps two writers from making the same row)."""
    if not totals:
        return
    keys, values = list(totals), list(totals.values())
    now = datetime.now(UTC).replace(tzinfo=None)
    columns: list[list[Any]] = [[k[i] for k in keys] for i in range(5)]
    columns.append([d.model_group for d in values])
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "cache_read",
        "cache_creation",
        "spend",
        "requests",
        "successes",
        "failures",
    ):
        columns.append([getattr(d, name) for d in values])
    statement = sql.SQL(_DAILY_UPSERT).format(
        table=sql.Identifier(table), owner=sql.Identifier(column)
    )
    await cur.execute(statement, [*columns, now, now, now])


async def write_batch(conn: Any, rows: list[SpendRow]) -> int:
    """One transaction: the rows, the spend totals of their keys, teams and users, and the
    daily tables; the rows newly inserted (a replayed row adds nothing)."""
    unique = list({r.request_id: r for r in rows}.values())
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(_INSERT_LOGS, (_document(unique),))
        inserted = {r[0] for r in await cur.fetchall()}
        new = [r for r in unique if r.request_id in inserted]
        if not new:
            return 0
        for table, column, pairs in (
            ("LiteLLM_VerificationToken", "token", ((r.api_key, r.spend) for r in new)),
            ("LiteLLM_TeamTable", "team_id", ((r.team_id, r.spend) for r in new)),
            ("LiteLLM_UserTable", "user_id", ((r.user, r.spend) for r in new)),
        ):
            ids, amounts = _sums(pairs)
            if ids:
                await cur.execute(
                    sql.SQL(_ADD_SPEND).format(
                        table=sql.Identifier(table), column=sql.Identifier(column)
                    ),
                    (ids, amounts),
                )
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (DAILY_LOCK_ID,))
        await _upsert_daily(cur, "LiteLLM_DailyUserSpend", "user_id", daily(new, lambda r: r.user))
        teams = daily((r for r in new if r.team_id), lambda r: r.team_id)
        await _upsert_daily(cur, "LiteLLM_DailyTeamSpend", "team_id", teams)
    return len(new)


def pool_sink(pool: Any) -> Sink:
    """A sink writing through a psycopg connection pool (the worker's key-store pool: spend
    logs take one of its connections for a few ms a second)."""

    async def sink(rows: list[SpendRow]) -> None:
        async with pool.connection() as conn:
            await write_batch(conn, rows)

    return sink
