"""LLMux's schema migrations: plain versioned SQL files, applied in order.

`migrations/NNNN_name.sql` files are applied in version order, all pending ones in one
transaction under a transaction-level advisory lock: replicas (or a `llmux db migrate` run
beside `llmux run`) that start together wait for each other, and the second finds nothing
left to do. What was applied is recorded in `llmux_schema_migrations`, LLMux's own table,
with each file's sha256, so an edited migration is reported instead of silently skipped.
The files themselves are written to run on a database LiteLLM's Prisma already created.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

log = logging.getLogger("llmux.db")

MIGRATIONS_TABLE = "llmux_schema_migrations"
# Any fixed 64-bit number: only LLMux's migrations take this lock.
ADVISORY_LOCK_ID = 0x6C6C6D7578_0001  # "llmux", 1
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """A migration could not be applied; nothing of the run was kept."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations shipped in `llmux_extproc/db/migrations` (or `directory`), in order."""
    if directory is None:
        root = resources.files("llmux_extproc.db").joinpath("migrations")
        files = [(f.name, f.read_text()) for f in root.iterdir() if f.name.endswith(".sql")]
    else:
        files = [(f.name, f.read_text()) for f in directory.glob("*.sql")]
    out = []
    for name, text in files:
        found = _NAME.match(name)
        if found is None:
            raise MigrationError(f"migration file {name!r}: expected NNNN_lowercase_name.sql")
        out.append(Migration(int(found.group(1)), name, text))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {sorted(versions)}")
    return out


def migrate(
    dsn: str, migrations: list[Migration] | None = None, *, connect_timeout: float = 10
) -> list[str]:
    """Apply the pending migrations; the names of those applied (empty: up to date)."""
    todo = bundled_migrations() if migrations is None else migrations
    try:
        conn = psycopg.connect(dsn, connect_timeout=max(1, round(connect_timeout)))
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to the database: {_reason(exc)}") from exc
    applied: list[str] = []
    with conn:
        try:
            with conn.transaction():
                # The IF NOT EXISTS statements say "already exists, skipping" for every
                # table LiteLLM made: expected, not worth a line each.
                conn.execute("SET LOCAL client_min_messages = warning")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                    " version INTEGER PRIMARY KEY,"
                    " name TEXT NOT NULL,"
                    " checksum TEXT NOT NULL,"
                    " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                done = {
                    row[0]: (row[1], row[2])
                    for row in conn.execute(
                        f"SELECT version, name, checksum FROM {MIGRATIONS_TABLE}"
                    )
                }
                for m in todo:
                    if m.version in done:
                        name, checksum = done[m.version]
                        if checksum != m.checksum:
                            log.warning(
                                "migration %s was applied as %s and has changed since; "
                                "migrations are never re-applied: write a new one",
                                m.name,
                                name,
                            )
                        continue
                    try:
                        conn.execute(m.sql.encode())  # several statements, no parameters
                    except psycopg.Error as exc:
                        raise MigrationError(
                            f"migration {m.name} failed, nothing was applied: {_reason(exc)}"
                        ) from exc
                    conn.execute(
                        f"INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum)"
                        " VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                    applied.append(m.name)
        except psycopg.Error as exc:
            raise MigrationError(f"migrations failed, nothing was applied: {_reason(exc)}") from exc
    for name in applied:
        log.info("database migration applied: %s", name)
    return applied


def _reason(exc: psycopg.Error) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
