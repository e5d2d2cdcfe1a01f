"""PostgreSQL for tests: a fresh database per test module, and a TCP proxy that a test can
cut to see what LLMux does when the database goes away (the machine's server is shared,
so it is never stopped)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import Iterator

import psycopg
import pytest

from tests.harness import free_port

# The server the machine runs; override with LLMUX_TEST_PG (a URL without database name).
SERVER = os.environ.get("LLMUX_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
START_HINT = (
    "start it with `service postgresql start` (Debian: `pg_ctlcluster 15 main start`), "
    "user postgres with trust auth on 127.0.0.1:5432, or point LLMUX_TEST_PG at one"
)


def admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {SERVER} ({exc}); {START_HINT}")


@contextlib.contextmanager
def fresh_database(prefix: str = "llmux_test") -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{SERVER}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def execute(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement.encode() if not params else statement, params or None)
        return cur.fetchall() if cur.description else []


class TcpProxy:
    """127.0.0.1:<port> → the PostgreSQL server, in a thread; `cut()` closes the listener
    and every connection through it (a database gone), `restore()` listens again."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.port = free_port()
        self.target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def url(self, database: str) -> str:
        name = database.rsplit("/", 1)[1]
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)  # type: ignore[arg-type]

    def restore(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

        self._run(start())

    def cut(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            self._writers.clear()

        self._run(stop())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
