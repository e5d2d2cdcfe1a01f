"""Redis for tests: the machine's server (127.0.0.1:6379, or LLMUX_TEST_REDIS), a key
prefix of its own per test, deleted afterwards. A missing server fails the test."""

from __future__ import annotations

import os
import secrets

import pytest
import redis

URL = os.environ.get("LLMUX_TEST_REDIS", "redis://127.0.0.1:6379/0")
START_HINT = (
    "start it with `service redis-server start` (or `redis-server --daemonize yes`) on "
    "127.0.0.1:6379, or point LLMUX_TEST_REDIS at one"
)


def client() -> redis.Redis:
    conn = redis.Redis.from_url(URL, socket_timeout=3)
    try:
        conn.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {URL} ({exc}); {START_HINT}")
    return conn


def new_prefix() -> str:
    return f"llmux_test_{secrets.token_hex(6)}:"


def drop_prefix(prefix: str) -> int:
    conn = client()
    keys = list(conn.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        conn.delete(*keys)
    conn.close()
    return len(keys)
