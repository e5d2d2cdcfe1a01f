"""The rest of LiteLLM's management API end to end (real Envoy, workers, PostgreSQL, the
`openai` SDK as the client of the keys made): /key/regenerate, /team/update, /team/delete,
/team/list, /user/new, /user/info, and deleted keys and teams kept in LiteLLM's audit
tables. Bad input is an OpenAI-shaped 4xx naming the field, and leaves nothing written."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from llmux_extproc.policy.keys import hash_key
from tests.harness import Gateway, running_gateway
from tests.pg import execute, fresh_database

pytestmark = pytest.mark.e2e
MASTER = "sk-master-mgmt"
MESSAGES = [{"role": "user", "content": "hello"}]
# Changes reach every worker by NOTIFY at once, by the periodic re-read within the TTL.
TTL_S = 2.0
BOUND_S = 15.0  # generous: CI is a loaded 2-core machine


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def gateway(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "model_list": [
            {
                "model_name": "gpt-a",
                "litellm_params": {"model": "mock/gpt-4o-mini"},
                "model_info": {"id": "dep-a"},
            },
            {
                "model_name": "gpt-b",
                "litellm_params": {"model": "mock/gpt-4o-mini"},
                "model_info": {"id": "dep-b"},
            },
        ],
        "general_settings": {
            "master_key": MASTER,
            "database_url": db,
            "user_api_key_cache_ttl": TTL_S,
        },
        "llmux": {"workers": 2},
    }
    with running_gateway(config, tmp_path_factory.mktemp("mgmt")) as gw:
        yield gw


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        gw.base_url + path,
        headers={"Authorization": f"Bearer {MASTER}"},
        timeout=15,
        **kwargs,
    )


def ok(reply: httpx.Response) -> Any:
    assert reply.status_code == 200, reply.text
    return reply.json()


def refused(reply: httpx.Response, status: int, param: str) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return str(error["message"])


def status_of(gw: Gateway, key: str, model: str = "gpt-a") -> int:
    try:
        openai.OpenAI(
            base_url=gw.openai_base, api_key=key, max_retries=0, timeout=15
        ).chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def settles(gw: Gateway, key: str, expected: int, model: str = "gpt-a") -> None:
    """Every worker answers `key` with `expected` (ten in a row), within BOUND_S."""
    started = time.monotonic()
    in_a_row = 0
    while in_a_row < 10:
        if status_of(gw, key, model) == expected:
            in_a_row += 1
        else:
            in_a_row = 0
            assert time.monotonic() - started < BOUND_S, f"{key[:8]}... not {expected} yet"


def test_regenerate_replaces_the_key_and_updates_fields(gateway: Gateway, db: str) -> None:
    made = ok(admin(gateway, "POST", "/key/generate", json={"key_alias": "rotate-me"}))
    old = made["key"]
    assert status_of(gateway, old) == 200
    new = ok(admin(gateway, "POST", "/key/regenerate", json={"key": old, "models": ["gpt-a"]}))
    assert new["key"].startswith("sk-") and new["key"] != old
    assert new["token_id"] == hash_key(new["key"])
    assert new["key_name"] == f"sk-...{new['key'][-4:]}"
    assert new["key_alias"] == "rotate-me" and new["models"] == ["gpt-a"]
    settles(gateway, old, 401)
    assert status_of(gateway, new["key"]) == 200
    assert status_of(gateway, new["key"], "gpt-b") in (401, 403)
    # LiteLLM's path form, with the key's hash and a chosen new key.
    chosen = "sk-chosen-" + "x" * 20
    again = ok(
        admin(
            gateway,
            "POST",
            f"/key/{new['token_id']}/regenerate",
            json={"new_key": chosen, "metadata": {"app": "ci"}},
        )
    )
    assert again["key"] == chosen and again["metadata"] == {"app": "ci"}
    assert execute(
        db,
        'SELECT key_alias FROM "LiteLLM_VerificationToken" WHERE token = %s',
        (hash_key(chosen),),
    ) == [("rotate-me",)]
    settles(gateway, chosen, 200)

    refused(admin(gateway, "POST", "/key/regenerate", json={"key": "sk-nope"}), 404, "key")
    refused(
        admin(gateway, "POST", "/key/regenerate", json={"key": chosen, "new_key": "plain"}),
        400,
        "new_key",
    )
    refused(
        admin(gateway, "POST", "/key/regenerate", json={"key": chosen, "max_budget": -1}),
        400,
        "max_budget",
    )
    refused(
        admin(gateway, "POST", "/key/regenerate", json={"key": chosen, "duration": "10 days"}),
        400,
        "duration",
    )
    refused(
        admin(gateway, "POST", "/key/regenerate", json={"key": chosen, "new_master_key": "sk-m"}),
        400,
        "new_master_key",
    )
    # Nothing half-written: the failed calls left the key as it was.
    settles(gateway, chosen, 200)


def test_team_update_list_and_bad_input(gateway: Gateway, db: str) -> None:
    team = ok(admin(gateway, "POST", "/team/new", json={"team_alias": "before"}))["team_id"]
    key = ok(admin(gateway, "POST", "/key/generate", json={"team_id": team}))["key"]
    assert status_of(gateway, key, "gpt-b") == 200
    updated = ok(
        admin(
            gateway,
            "POST",
            "/team/update",
            json={"team_id": team, "team_alias": "after", "models": ["gpt-a"], "max_budget": 5},
        )
    )
    assert updated["team_id"] == team
    assert updated["data"]["team_alias"] == "after" and updated["data"]["max_budget"] == 5
    settles(gateway, key, 403, "gpt-b")  # the team's models now leave gpt-b out
    assert status_of(gateway, key, "gpt-a") == 200

    for body, param in (
        ({"team_id": team, "max_budget": -3}, "max_budget"),
        ({"team_id": team, "tpm_limit": 1.5}, "tpm_limit"),
        ({"team_id": team, "budget_duration": "forever"}, "budget_duration"),
        ({"team_id": team, "models": "gpt-a"}, "models"),
        ({"team_alias": "no id"}, "team_id"),
    ):
        refused(admin(gateway, "POST", "/team/update", json=body), 400, param)
    refused(admin(gateway, "POST", "/team/update", json={"team_id": "nope"}), 404, "team_id")
    row = execute(
        db, 'SELECT team_alias, max_budget FROM "LiteLLM_TeamTable" WHERE team_id = %s', (team,)
    )
    assert row == [("after", 5.0)]

    listed = ok(admin(gateway, "GET", "/team/list"))
    mine = [t for t in listed if t["team_id"] == team]
    assert len(mine) == 1 and mine[0]["team_alias"] == "after"
    assert [k["token"] for k in mine[0]["keys"]] == [hash_key(key)]

    bad = admin(gateway, "POST", "/team/update", content=b"{not json")
    assert bad.status_code == 400 and set(bad.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert admin(gateway, "GET", "/team/update").status_code == 405


def test_team_delete_keeps_audit_rows_and_is_all_or_nothing(gateway: Gateway, db: str) -> None:
    team = ok(admin(gateway, "POST", "/team/new", json={"team_alias": "doomed"}))["team_id"]
    other = ok(admin(gateway, "POST", "/team/new", json={"team_alias": "survivor"}))["team_id"]
    key = ok(admin(gateway, "POST", "/key/generate", json={"team_id": team}))["key"]
    assert status_of(gateway, key) == 200
    message = refused(
        admin(gateway, "POST", "/team/delete", json={"team_ids": [team, "missing-team"]}),
        404,
        "team_ids",
    )
    assert "missing-team" in message
    assert execute(db, 'SELECT count(*) FROM "LiteLLM_TeamTable" WHERE team_id = %s', (team,)) == [
        (1,)
    ]
    assert status_of(gateway, key) == 200

    gone = ok(admin(gateway, "POST", "/team/delete", json={"team_ids": [team]}))
    assert gone["deleted_teams"] == [team] and gone["deleted_keys"] == [hash_key(key)]
    settles(gateway, key, 401)
    assert execute(
        db, 'SELECT team_alias FROM "LiteLLM_DeletedTeamTable" WHERE team_id = %s', (team,)
    ) == [("doomed",)]
    assert execute(
        db,
        'SELECT team_id, deleted_by FROM "LiteLLM_DeletedVerificationToken" WHERE token = %s',
        (hash_key(key),),
    ) == [(team, "default_user_id")]
    assert execute(db, 'SELECT count(*) FROM "LiteLLM_TeamTable" WHERE team_id = %s', (other,)) == [
        (1,)
    ]
    refused(admin(gateway, "GET", "/team/info", params={"team_id": team}), 404, "team_id")
    refused(admin(gateway, "POST", "/team/delete", json={}), 400, "team_ids")


def test_key_delete_copies_the_key_to_the_audit_table(gateway: Gateway, db: str) -> None:
    made = ok(admin(gateway, "POST", "/key/generate", json={"key_alias": "audited", "spend": 1.5}))
    ok(admin(gateway, "POST", "/key/delete", json={"keys": [made["key"]]}))
    assert execute(
        db,
        'SELECT key_alias, spend FROM "LiteLLM_DeletedVerificationToken" WHERE token = %s',
        (made["token_id"],),
    ) == [("audited", 1.5)]


def test_user_new_and_info(gateway: Gateway, db: str) -> None:
    team = ok(admin(gateway, "POST", "/team/new", json={"team_alias": "users"}))["team_id"]
    made = ok(
        admin(
            gateway,
            "POST",
            "/user/new",
            json={
                "user_id": "bob",
                "user_email": "bob@example.com",
                "user_role": "internal_user",
                "teams": [team],
                "max_budget": 10,
                "key_alias": "bob-key",
            },
        )
    )
    assert made["user_id"] == "bob" and made["user_email"] == "bob@example.com"
    assert made["teams"] == [team] and made["max_budget"] == 10
    key = made["key"]
    assert made["token_id"] == hash_key(key) and made["key_alias"] == "bob-key"
    assert status_of(gateway, key) == 200
    info = ok(admin(gateway, "GET", "/user/info", params={"user_id": "bob"}))
    assert info["user_id"] == "bob" and info["user_info"]["user_email"] == "bob@example.com"
    assert [k["token"] for k in info["keys"]] == [hash_key(key)]
    assert [t["team_id"] for t in info["teams"]] == [team]
    members = execute(db, 'SELECT members FROM "LiteLLM_TeamTable" WHERE team_id = %s', (team,))
    assert members == [(["bob"],)]

    without = ok(admin(gateway, "POST", "/user/new", json={"auto_create_key": False}))
    assert "key" not in without and without["user_id"]
    assert (
        ok(admin(gateway, "GET", "/user/info", params={"user_id": without["user_id"]}))["keys"]
        == []
    )

    users_before = execute(db, 'SELECT count(*) FROM "LiteLLM_UserTable"')
    keys_before = execute(db, 'SELECT count(*) FROM "LiteLLM_VerificationToken"')
    for body, status, param in (
        ({"user_id": "bob"}, 400, "user_id"),
        ({"user_id": "carl", "user_role": "emperor"}, 400, "user_role"),
        ({"user_id": "carl", "max_budget": -1}, 400, "max_budget"),
        ({"user_id": "carl", "budget_duration": "1y"}, 400, "budget_duration"),
        ({"user_id": "carl", "duration": "soon"}, 400, "duration"),
        # The team check comes after the user row was inserted: the transaction undoes it.
        ({"user_id": "carl", "teams": ["no-such-team"]}, 400, "teams"),
    ):
        refused(admin(gateway, "POST", "/user/new", json=body), status, param)
    assert execute(db, 'SELECT count(*) FROM "LiteLLM_UserTable"') == users_before
    assert execute(db, 'SELECT count(*) FROM "LiteLLM_VerificationToken"') == keys_before
    refused(admin(gateway, "GET", "/user/info", params={"user_id": "carl"}), 404, "user_id")
    refused(admin(gateway, "GET", "/user/info"), 400, "user_id")
    # A virtual key may not manage.
    assert (
        httpx.get(
            gateway.base_url + "/user/info?user_id=bob",
            headers={"Authorization": f"Bearer {key}"},
            timeout=15,
        ).status_code
        == 403
    )


def answered_by(gw: Gateway, key: str, model: str, stream: bool = False) -> str:
    """The deployment that answered (x-litellm-model-id), through the openai SDK."""
    c = openai.OpenAI(base_url=gw.openai_base, api_key=key, max_retries=0, timeout=15)
    if stream:
        with c.chat.completions.with_streaming_response.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        ) as reply:
            assert any(b"[DONE]" in line.encode() for line in reply.iter_lines())
            return str(reply.headers["x-litellm-model-id"])
    raw = c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content
    return str(raw.headers["x-litellm-model-id"])


def test_key_aliases_send_a_model_name_to_the_group_it_stands_for(gateway: Gateway) -> None:
    key = ok(admin(gateway, "POST", "/key/generate", json={"aliases": {"my-model": "gpt-b"}}))[
        "key"
    ]
    assert answered_by(gateway, key, "my-model") == "dep-b"
    assert answered_by(gateway, key, "my-model", stream=True) == "dep-b"
    assert answered_by(gateway, key, "gpt-a") == "dep-a"  # other names as before
    # Another key, or the master key, has no such alias: the model is unknown to them.
    plain = ok(admin(gateway, "POST", "/key/generate", json={}))["key"]
    for other in (plain, MASTER):
        try:
            answered_by(gateway, other, "my-model")
            pytest.fail("an alias of another key was honoured")
        except openai.NotFoundError as exc:
            assert exc.code == "model_not_found"
    # The key's own model list still applies, to the group the alias names.
    narrow = ok(
        admin(
            gateway,
            "POST",
            "/key/generate",
            json={"models": ["gpt-a"], "aliases": {"my-model": "gpt-b"}},
        )
    )["key"]
    assert status_of(gateway, narrow, "my-model") == 403
    # An update reaches every worker.
    ok(admin(gateway, "POST", "/key/update", json={"key": key, "aliases": {"my-model": "gpt-a"}}))
    started = time.monotonic()
    while answered_by(gateway, key, "my-model") != "dep-a" or any(
        answered_by(gateway, key, "my-model") != "dep-a" for _ in range(6)
    ):
        assert time.monotonic() - started < BOUND_S
    refused(
        admin(gateway, "POST", "/key/generate", json={"aliases": {"my-model": 3}}),
        400,
        "aliases.my-model",
    )
