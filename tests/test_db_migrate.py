"""Schema migrations against the real PostgreSQL: an empty database, a LiteLLM-created one,
replicas migrating at once, a failing migration, and `llmux db migrate`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from llmux_extproc.db.migrate import MigrationError, bundled_migrations, migrate
from tests.pg import execute

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_TABLES = (
    "LiteLLM_VerificationToken",
    "LiteLLM_TeamTable",
    "LiteLLM_UserTable",
    "LiteLLM_BudgetTable",
    "LiteLLM_SpendLogs",
    "LiteLLM_DailyUserSpend",
    "LiteLLM_DailyTeamSpend",
    "LiteLLM_DeletedVerificationToken",
    "LiteLLM_DeletedTeamTable",
)


def columns(url: str) -> dict[tuple[str, str], tuple[object, ...]]:
    rows = execute(
        url,
        "SELECT table_name, column_name, data_type, udt_name, is_nullable, datetime_precision"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " AND table_name LIKE %s",
        ("LiteLLM_%",),
    )
    return {(str(r[0]), str(r[1])): tuple(r[2:]) for r in rows}


def litellm_database(url: str) -> None:
    execute(url, (FIXTURES / "litellm_schema.sql").read_text())


def test_empty_database_gets_every_table_once(database: str) -> None:
    applied = migrate(database)
    assert applied == [m.name for m in bundled_migrations()]
    cols = columns(database)
    assert {t for t, _ in cols} == set(SHARED_TABLES)
    assert cols[("LiteLLM_VerificationToken", "token")][:3] == ("text", "text", "NO")
    assert cols[("LiteLLM_VerificationToken", "models")][:2] == ("ARRAY", "_text")
    assert cols[("LiteLLM_VerificationToken", "expires")] == (
        "timestamp without time zone",
        "timestamp",
        "YES",
        3,
    )
    assert cols[("LiteLLM_TeamTable", "tpm_limit")][:2] == ("bigint", "int8")
    # A second run (another replica, a restart) applies nothing and changes nothing.
    assert migrate(database) == []
    assert columns(database) == cols
    assert execute(database, "SELECT count(*) FROM llmux_schema_migrations") == [
        (len(bundled_migrations()),)
    ]


def test_columns_are_litellm_s(database: str, tmp_path: Path) -> None:
    """Every column LLMux creates has the type, nullability and precision LiteLLM's Prisma
    schema gives it, so either can create the database for the other."""
    migrate(database)
    ours = columns(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA litellm_made")
        conn.execute("SET search_path TO litellm_made")
        conn.execute((FIXTURES / "litellm_schema.sql").read_bytes())
        rows = conn.execute(
            "SELECT table_name, column_name, data_type, udt_name, is_nullable,"
            " datetime_precision FROM information_schema.columns"
            " WHERE table_schema = 'litellm_made'"
        ).fetchall()
    theirs = {(str(r[0]), str(r[1])): tuple(r[2:]) for r in rows}
    mismatched = {col: (ours[col], theirs.get(col)) for col in ours if theirs.get(col) != ours[col]}
    assert mismatched == {}


def test_litellm_database_is_migrated_in_place(database: str) -> None:
    litellm_database(database)
    execute(
        database,
        'INSERT INTO "LiteLLM_VerificationToken" (token, key_alias, models, spend)'
        " VALUES ('abc123', 'kept', ARRAY['gpt-4o'], 1.5)",
    )
    before = columns(database)
    migrate(database)
    after = columns(database)
    # LiteLLM's columns (those LLMux does not know included) are all still there, unchanged.
    assert {k: v for k, v in after.items() if k in before} == before
    assert execute(
        database, 'SELECT key_alias, models, spend FROM "LiteLLM_VerificationToken"'
    ) == [("kept", ["gpt-4o"], 1.5)]
    triggers = execute(
        database,
        "SELECT tgname FROM pg_trigger WHERE tgrelid = '\"LiteLLM_VerificationToken\"'::regclass"
        " AND NOT tgisinternal ORDER BY tgname",
    )
    assert triggers == [("llmux_auth_insert_delete",), ("llmux_auth_update",)]


def test_an_older_litellm_schema_gets_the_missing_columns(database: str) -> None:
    litellm_database(database)
    execute(
        database,
        'ALTER TABLE "LiteLLM_TeamTable" DROP COLUMN soft_budget;'
        ' ALTER TABLE "LiteLLM_DailyUserSpend" DROP COLUMN endpoint;'
        " INSERT INTO \"LiteLLM_TeamTable\" (team_id) VALUES ('t1');",
    )
    migrate(database)
    cols = columns(database)
    assert cols[("LiteLLM_TeamTable", "soft_budget")][0] == "double precision"
    assert cols[("LiteLLM_DailyUserSpend", "endpoint")][0] == "text"
    assert execute(database, 'SELECT team_id FROM "LiteLLM_TeamTable"') == [("t1",)]


def test_replicas_migrating_at_once_apply_each_migration_once(database: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        start.wait()
        try:
            results.append(migrate(database))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(len(r) for r in results) == [0, 0, 0, len(bundled_migrations())]


def test_a_failing_migration_leaves_nothing_behind(database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE llmux_probe (id INTEGER);")
    (tmp_path / "0002_bad.sql").write_text("ALTER TABLE no_such_table ADD COLUMN x INTEGER;")
    with pytest.raises(MigrationError, match=r"0002_bad\.sql failed, nothing was applied"):
        migrate(database, bundled_migrations(tmp_path))
    assert execute(
        database, "SELECT to_regclass('llmux_probe'), to_regclass('llmux_schema_migrations')"
    ) == [(None, None)]


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(MigrationError, match="cannot connect to the database"):
        migrate("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmux_extproc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | env,
    )


def test_llmux_db_migrate_command(database: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model_list: []\ngeneral_settings:\n  database_url: os.environ/MY_DB\n"
        "  master_key: sk-master\n"
    )
    first = cli("db", "migrate", "--config", str(config), env={"MY_DB": database})
    assert first.returncode == 0, first.stderr
    assert "0001_litellm_tables.sql" in first.stdout
    again = cli("db", "migrate", env={"DATABASE_URL": database})  # LiteLLM's variable
    assert (again.returncode, again.stdout.strip()) == (0, "database schema up to date")
    none = cli("db", "migrate", env={})
    assert none.returncode == 2 and "no database configured" in none.stderr
    down = cli("db", "migrate", env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})
    assert down.returncode == 1 and "cannot connect to the database" in down.stderr
