"""Spend log batching: the queue and writer policy with a fake clock and a recording sink,
then `write_batch` against the real PostgreSQL (LiteLLM's tables from the migrations)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest

from llmux_extproc.accounting.spendlog import SpendQueue, SpendRow, SpendWriter, write_batch
from llmux_extproc.db.migrate import migrate
from llmux_extproc.observability import metrics
from tests.pg import execute, fresh_database

T0 = 1_780_000_000.0  # 2026-05-28 UTC


def row(n: int, **fields: object) -> SpendRow:
    base = SpendRow(
        request_id=f"req-{n}",
        call_type="acompletion",
        api_key="a" * 64,
        user="user-1",
        team_id="team-1",
        key_alias="alias-1",
        model="gpt-4o-mini",
        model_group="gpt",
        model_id="dep-1",
        provider="openai",
        api_base="http://127.0.0.1:1/v1",
        prompt_tokens=10,
        completion_tokens=5,
        cached_tokens=2,
        cache_write_tokens=0,
        spend=0.25,
        start=T0 + n,
        end=T0 + n + 0.5,
        status="success",
    )
    return replace(base, **fields)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.failing = False

    async def __call__(self, rows: list[SpendRow]) -> None:
        if self.failing:
            raise psycopg.OperationalError("connection refused")
        self.batches.append([r.request_id for r in rows])


def dropped() -> float:
    return float(metrics.SPEND_LOG_DROPPED._value.get())


async def test_nothing_is_written_before_the_interval_unless_a_batch_is_full() -> None:
    clock, sink = Clock(), Sink()
    queue = SpendQueue(bound=100, batch_max=3)
    writer = SpendWriter(queue, sink, interval_s=1.0, clock=clock)
    queue.put(row(1))
    queue.put(row(2))
    assert await writer.tick() == 0
    clock.now += 0.5
    assert await writer.tick() == 0 and sink.batches == []
    queue.put(row(3))  # a full batch does not wait for the interval
    assert queue.full.is_set()
    assert await writer.tick() == 3
    assert sink.batches == [["req-1", "req-2", "req-3"]]
    assert not queue.full.is_set()
    queue.put(row(4))
    assert await writer.tick() == 0
    clock.now += 1.0
    assert await writer.tick() == 1
    assert sink.batches[-1] == ["req-4"]


async def test_a_failed_batch_is_kept_in_order_and_written_when_the_database_is_back() -> None:
    clock, sink = Clock(), Sink()
    queue = SpendQueue(bound=100, batch_max=10)
    writer = SpendWriter(queue, sink, interval_s=1.0, clock=clock)
    for n in range(3):
        queue.put(row(n))
    sink.failing = True
    clock.now += 1
    assert await writer.tick() == 0
    assert [r.request_id for r in queue.rows] == ["req-0", "req-1", "req-2"]
    queue.put(row(3))
    sink.failing = False
    clock.now += 1
    assert await writer.tick() == 4
    assert sink.batches == [["req-0", "req-1", "req-2", "req-3"]]


async def test_the_queue_is_bounded_and_counts_what_it_drops() -> None:
    clock, sink = Clock(), Sink()
    queue = SpendQueue(bound=5, batch_max=3)
    writer = SpendWriter(queue, sink, interval_s=1.0, clock=clock)
    before = dropped()
    for n in range(7):
        queue.put(row(n))
    assert len(queue) == 5 and queue.dropped == 2
    assert dropped() - before == 2
    # A batch given back after a failure while new rows came: the newest go over the bound.
    sink.failing = True
    assert await writer.tick() == 0
    assert len(queue) == 5 and queue.dropped == 2
    batch = queue.take()
    queue.put(row(7))
    queue.put(row(8))
    queue.put(row(9))
    queue.give_back(batch)
    assert [r.request_id for r in queue.rows] == ["req-0", "req-1", "req-2", "req-3", "req-4"]
    assert queue.dropped == 5 and dropped() - before == 5


async def test_close_writes_everything_left_in_batches() -> None:
    clock, sink = Clock(), Sink()
    queue = SpendQueue(bound=100, batch_max=2)
    writer = SpendWriter(queue, sink, interval_s=1.0, clock=clock)
    for n in range(5):
        queue.put(row(n))
    assert await writer.close() == 0
    assert sink.batches == [["req-0", "req-1"], ["req-2", "req-3"], ["req-4"]]


async def test_close_gives_up_after_its_time_and_counts_the_rows_lost() -> None:
    sink = Sink()
    sink.failing = True
    queue = SpendQueue(bound=100, batch_max=10)
    writer = SpendWriter(queue, sink, interval_s=1.0)
    queue.put(row(1))
    before = dropped()
    assert await writer.close(within_s=0.3) == 1
    assert len(queue) == 0 and dropped() - before == 1


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    with fresh_database() as url:
        migrate(url)
        execute(
            url,
            'INSERT INTO "LiteLLM_VerificationToken" (token, spend, models) VALUES (%s, 1.0, %s)',
            ("a" * 64, []),
        )
        execute(
            url,
            'INSERT INTO "LiteLLM_TeamTable" (team_id, spend, models, admins, members,'
            " updated_at) VALUES ('team-1', 0, '{}', '{}', '{}', now())",
        )
        execute(
            url,
            'INSERT INTO "LiteLLM_UserTable" (user_id, spend, models) VALUES (%s, 0, %s)',
            ("user-1", []),
        )
        yield url


async def write(url: str, rows: list[SpendRow]) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await write_batch(conn, rows)


def spend(url: str, table: str, column: str, ident: str) -> float:
    found = execute(url, f'SELECT spend FROM "{table}" WHERE {column} = %s', (ident,))
    return float(found[0][0])  # type: ignore[arg-type]


async def test_a_batch_writes_rows_totals_and_daily_tables_once(db: str) -> None:
    rows = [row(1), row(2, status="failure", spend=0.0, prompt_tokens=0, completion_tokens=0)]
    rows.append(row(3, team_id=None, user=None, api_key="b" * 64, spend=1.5))
    assert await write(db, rows) == 3
    logged = execute(
        db,
        'SELECT request_id, api_key, spend, total_tokens, "user", team_id, model_group,'
        " model_id, custom_llm_provider, status, call_type, request_duration_ms,"
        ' "startTime" FROM "LiteLLM_SpendLogs" ORDER BY request_id',
    )
    assert [r[0] for r in logged] == ["req-1", "req-2", "req-3"]
    first = logged[0]
    assert first[1:12] == (
        "a" * 64,
        0.25,
        15,
        "user-1",
        "team-1",
        "gpt",
        "dep-1",
        "openai",
        "success",
        "acompletion",
        500,
    )
    assert logged[1][9] == "failure"
    assert logged[2][4:6] == ("", None)
    assert str(first[12]) == "2026-05-28 20:26:41"
    assert spend(db, "LiteLLM_VerificationToken", "token", "a" * 64) == pytest.approx(1.25)
    assert spend(db, "LiteLLM_TeamTable", "team_id", "team-1") == pytest.approx(0.25)
    assert spend(db, "LiteLLM_UserTable", "user_id", "user-1") == pytest.approx(0.25)
    daily = execute(
        db,
        "SELECT user_id, date, api_key, model, model_group, custom_llm_provider,"
        " prompt_tokens, completion_tokens, cache_read_input_tokens, spend, api_requests,"
        ' successful_requests, failed_requests FROM "LiteLLM_DailyUserSpend"'
        " ORDER BY api_key",
    )
    assert daily == [
        ("user-1", "2026-05-28", "a" * 64, "gpt-4o-mini", "gpt", "openai", 10, 5, 4, 0.25, 2, 1, 1),
        (None, "2026-05-28", "b" * 64, "gpt-4o-mini", "gpt", "openai", 10, 5, 2, 1.5, 1, 1, 0),
    ]
    team_daily = execute(db, 'SELECT team_id, api_requests, spend FROM "LiteLLM_DailyTeamSpend"')
    assert team_daily == [("team-1", 2, 0.25)]

    # The same rows again (a commit whose reply was lost) change nothing; a new row adds
    # to the same daily rows, the NULL user's included.
    assert await write(db, rows) == 0
    assert spend(db, "LiteLLM_VerificationToken", "token", "a" * 64) == pytest.approx(1.25)
    assert await write(db, [row(4), row(5, team_id=None, user=None, api_key="b" * 64)]) == 2
    counts = execute(
        db,
        'SELECT api_key, api_requests FROM "LiteLLM_DailyUserSpend" ORDER BY api_key',
    )
    assert counts == [("a" * 64, 3), ("b" * 64, 2)]
    assert execute(db, 'SELECT api_requests FROM "LiteLLM_DailyTeamSpend"') == [(3,)]
    assert spend(db, "LiteLLM_TeamTable", "team_id", "team-1") == pytest.approx(0.5)


async def test_a_batch_is_all_or_nothing(db: str) -> None:
    before = execute(db, 'SELECT count(*) FROM "LiteLLM_SpendLogs"')[0][0]
    bad = row(90, request_id="req-90", prompt_tokens=2**40)  # overflows the INTEGER column
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        await write(db, [row(91), bad])
    assert execute(db, 'SELECT count(*) FROM "LiteLLM_SpendLogs"')[0][0] == before


def test_the_caller_travels_through_the_marks_to_the_access_log() -> None:
    """What a passed-through answer's marks say about the caller comes back, from Envoy's
    metadata, as the same team, user, alias and key hash (accesslog._caller)."""
    from urllib.parse import unquote

    from google.protobuf.struct_pb2 import Struct

    from llmux_extproc.dataplane.accesslog import _caller
    from llmux_extproc.dataplane.gateway import caller_marks
    from llmux_extproc.dataplane.marks import encode_marks
    from llmux_extproc.policy.keys import Principal

    principal = Principal(
        token="f" * 64,
        key_alias="a;b=c",
        key_name="sk-...wxyz",
        user_id="ü",
        team_id="t 1",
        team_alias="search",
    )
    header = encode_marks({"deployment": "d1", "caller": caller_marks(principal)})
    metadata = Struct()
    for pair in header.split(";"):  # as response.lua reads the header
        name, _, value = pair.partition("=")
        metadata.update({name: unquote(value[1:])})
    caller = _caller(metadata.fields)
    assert (caller.token, caller.team, caller.user_id, caller.key_alias) == (
        "f" * 64,
        "t 1",
        "ü",
        "a;b=c",
    )
    assert caller.principal is not None
    assert (caller.principal.team_alias, caller.principal.key_name) == ("search", "sk-...wxyz")
    unnamed = _caller(Struct().fields)
    assert unnamed.token is None and unnamed.team == "default"


async def test_a_batch_writes_into_a_database_litellm_made(database: str) -> None:
    """LiteLLM's own tables (every column, as its Prisma made them), migrated by LLMux."""
    from pathlib import Path

    execute(database, (Path(__file__).parent / "fixtures" / "litellm_schema.sql").read_text())
    migrate(database)
    rows = [row(1), row(2, user=None, team_id=None)]
    assert await write(database, rows) == 2
    found = execute(
        database,
        'SELECT request_id, team_id, "user", spend FROM "LiteLLM_SpendLogs" ORDER BY 1',
    )
    assert found == [("req-1", "team-1", "user-1", 0.25), ("req-2", None, "", 0.25)]
    daily = execute(
        database, 'SELECT user_id, api_requests FROM "LiteLLM_DailyUserSpend" ORDER BY 1'
    )
    assert daily == [("user-1", 1), (None, 1)]


async def test_a_failing_database_with_a_full_queue_is_not_retried_in_a_loop() -> None:
    import asyncio

    sink = Sink()
    sink.failing = True
    attempts: list[str] = []

    async def counting(rows: list[SpendRow]) -> None:
        attempts.append("write")
        await sink(rows)

    async def pause(seconds: float) -> None:
        attempts.append(f"pause {seconds}")
        if len(attempts) >= 6:
            raise asyncio.CancelledError

    queue = SpendQueue(bound=100, batch_max=2)
    writer = SpendWriter(queue, counting, interval_s=0.2, pause=pause)
    for n in range(4):
        queue.put(row(n))
    assert queue.full.is_set()
    with pytest.raises(asyncio.CancelledError):
        await writer._run()
    # Every failed write is followed by a pause of the interval, never by another write.
    assert attempts == ["write", "pause 0.2"] * 3
    assert len(queue) == 4
