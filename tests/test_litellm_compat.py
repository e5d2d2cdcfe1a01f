"""A database LiteLLM created, with keys and a team made the way LiteLLM's proxy makes
them, serves LLMux as it is: its keys authenticate, its model lists apply, and what LLMux
writes there is an ordinary LiteLLM row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest

from llmux_extproc.db import migrate
from llmux_extproc.policy.keys import hash_key
from tests.harness import Gateway, running_gateway
from tests.pg import execute, fresh_database

MIGRATIONS = Path(migrate.__file__).parent / "migrations"

pytestmark = pytest.mark.e2e
FIXTURES = Path(__file__).parent / "fixtures"
MASTER = "sk-1234"
LITELLM_KEY = "sk-QWrxEynunsNpV1zT48HIrw"  # LiteLLM's shape: sk- + token_urlsafe(16)
TEAM_KEY = "sk-Team-Ab12Cd34Ef56Gh78Ij90Kl"


def insert_like_litellm(url: str) -> None:
    """The rows LiteLLM's /team/new and /key/generate write (generate_key_helper_fn's
    key_data: JSON fields serialized, hashed token, abbreviated key name, UTC times)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    execute(
        url,
        'INSERT INTO "LiteLLM_TeamTable" (team_id, team_alias, admins, members,'
        " members_with_roles, metadata, models, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s)",
        ("team-litellm", "from-litellm", [], [], "[]", "{}", ["gpt-a"], now, now),
    )
    for raw, models, team in (
        (LITELLM_KEY, ["gpt-a", "gpt-b"], None),
        (TEAM_KEY, ["all-team-models"], "team-litellm"),
    ):
        execute(
            url,
            'INSERT INTO "LiteLLM_VerificationToken" (token, key_name, key_alias, expires,'
            " models, aliases, config, spend, max_budget, user_id, team_id, metadata,"
            " tpm_limit, rpm_limit, allowed_cache_controls, permissions, model_max_budget,"
            " created_by, updated_by, allowed_routes, router_settings, access_group_ids,"
            " created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, 0.0, 10.0, %s, %s, %s::jsonb,"
            " 1000, 10, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s::jsonb, %s, %s, %s)",
            (
                hash_key(raw),
                f"sk-...{raw[-4:]}",
                None,
                now + timedelta(days=30),
                models,
                "{}",
                "{}",
                "default_user_id",
                team,
                json.dumps({"model_rpm_limit": {"gpt-a": 5}}),
                [],
                "{}",
                "{}",
                "default_user_id",
                "default_user_id",
                [],
                "{}",
                [],
                now,
                now,
            ),
        )


@pytest.fixture(scope="module")
def litellm_db() -> Iterator[str]:
    with fresh_database("llmux_test_litellm") as url:
        execute(url, (FIXTURES / "litellm_schema.sql").read_text())
        insert_like_litellm(url)
        yield url


@pytest.fixture(scope="module")
def gateway(litellm_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "model_list": [
            {"model_name": "gpt-a", "litellm_params": {"model": "mock/gpt-4o-mini"}},
            {"model_name": "gpt-b", "litellm_params": {"model": "mock/gpt-4o-mini"}},
        ],
        "general_settings": {"master_key": MASTER},
    }
    # LiteLLM's way of naming the database: DATABASE_URL.
    with running_gateway(
        config, tmp_path_factory.mktemp("litellm"), env={"DATABASE_URL": litellm_db}
    ) as gw:
        yield gw


def test_a_litellm_key_authenticates(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=LITELLM_KEY, max_retries=0)
    for model in ("gpt-a", "gpt-b"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content


def test_a_litellm_team_key_gets_the_team_s_models(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=TEAM_KEY, max_retries=0)
    assert client.chat.completions.create(
        model="gpt-a", messages=[{"role": "user", "content": "hi"}]
    )
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-b", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client.models.list()] == ["gpt-a"]


def test_litellm_rows_are_kept_and_read_back(gateway: Gateway, litellm_db: str) -> None:
    info = httpx.get(
        gateway.base_url + "/key/info",
        params={"key": LITELLM_KEY},
        headers={"Authorization": f"Bearer {MASTER}"},
        timeout=15,
    ).json()["info"]
    assert info["key_name"] == "sk-...HIrw" and info["models"] == ["gpt-a", "gpt-b"]
    assert info["metadata"] == {"model_rpm_limit": {"gpt-a": 5}}
    assert info["router_settings"] == {}  # a LiteLLM column LLMux does not know, still there
    shipped = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    assert f"database schema up to date ({', '.join(shipped)} applied)" in gateway.log()


def test_a_key_llmux_makes_is_an_ordinary_litellm_row(gateway: Gateway, litellm_db: str) -> None:
    made = httpx.post(
        gateway.base_url + "/key/generate",
        json={"models": ["gpt-a"], "team_id": "team-litellm", "duration": "1d"},
        headers={"Authorization": f"Bearer {MASTER}"},
        timeout=15,
    ).json()
    rows = execute(
        litellm_db,
        "SELECT key_name, team_id, models, created_by, expires > now() AT TIME ZONE 'utc',"
        " spend, aliases, rotation_count, blocked"
        ' FROM "LiteLLM_VerificationToken" WHERE token = %s',
        (hash_key(made["key"]),),
    )
    # LiteLLM's defaults filled LiteLLM's own columns (rotation_count); times are UTC.
    assert rows == [
        (
            f"sk-...{made['key'][-4:]}",
            "team-litellm",
            ["gpt-a"],
            "default_user_id",
            True,
            0.0,
            {},
            0,
            None,
        )
    ]
