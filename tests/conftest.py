"""Fixtures shared by test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import fresh_database


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (URL) for one test, dropped afterwards."""
    with fresh_database() as url:
        yield url
