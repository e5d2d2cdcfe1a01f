"""Spend logs end to end: real Envoy and workers (`llmux run`), real PostgreSQL behind a TCP
proxy the tests cut, the official `openai` SDK, an OpenAI-format mock upstream (answers Envoy
passes on alone, accounted from its access log) and the built-in mock provider (answers the
processor makes).

Checked: a row per answer in LiteLLM_SpendLogs with the key's hash, team, user and the cost
the client was told; the key's, team's and user's spend columns and the daily tables; the
metrics' team and key labels; rows read back through LiteLLM's /spend/logs and
/global/spend/report shapes; a database outage (rows kept, then written; over the bound
dropped and counted); SIGTERM right after requests (nothing lost).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from llmux_extproc.policy.keys import hash_key
from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    metric,
    openai_chat_completion,
    running_gateway,
    start_gateway,
)
from tests.pg import TcpProxy, execute, fresh_database

pytestmark = pytest.mark.e2e
MASTER = "sk-master-spend"
MESSAGES = [{"role": "user", "content": "hello"}]
# Generous: rows are written once a second per worker; CI is a loaded 2-core machine.
WRITTEN_WITHIN_S = 20.0
PRICES = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}


async def upstream_handler(request: web.Request, body: bytes) -> web.StreamResponse:
    import orjson

    sent = orjson.loads(body)
    assert request.path == "/v1/chat/completions", request.path
    assert request.headers.get("authorization") == "Bearer sk-upstream"
    assert sent["messages"] == MESSAGES
    if sent.get("user") == "refuse-me":
        error = {"message": "refused", "type": "invalid_request_error", "param": None, "code": None}
        return json_response({"error": error}, status=400)
    if sent.get("stream"):
        assert sent.get("stream_options", {}).get("include_usage") is True
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "id": "chatcmpl-s",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
        await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    return json_response(openai_chat_completion("gpt-4o-mini", "hello back", 11, 7))


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream(upstream_handler).start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy()
    yield p
    p.close()


def config_for(db_url: str, upstream: MockUpstream, **llmux: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "gpt-mock",
                "litellm_params": {"model": "mock/gpt-4o-mini", **PRICES},
            },
            {
                "model_name": "gpt-up",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": upstream.base_url + "/v1",
                    "api_key": "sk-upstream",
                    **PRICES,
                },
            },
        ],
        "general_settings": {"master_key": MASTER, "database_url": db_url},
        "llmux": {"workers": 2, **llmux},
    }


@pytest.fixture(scope="module")
def gateway(
    db: str, proxy: TcpProxy, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with running_gateway(
        config_for(proxy.url(db), upstream), tmp_path_factory.mktemp("spend")
    ) as gw:
        yield gw


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, gw.base_url + path, headers={"Authorization": f"Bearer {MASTER}"}, timeout=15,
        **kwargs,
    )  # fmt: skip


def new_key(gw: Gateway, **fields: Any) -> str:
    reply = admin(gw, "POST", "/key/generate", json=fields)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["key"])


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.openai_base, api_key=key, max_retries=0, timeout=15)


def chat(gw: Gateway, key: str, model: str, stream: bool = False) -> tuple[str, str | None]:
    """(x-request-id, x-litellm-response-cost) of one completion."""
    c = client(gw, key)
    if stream:
        with c.chat.completions.with_streaming_response.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        ) as reply:
            list(reply.iter_lines())
            return reply.headers["x-request-id"], None
    raw = c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content
    return raw.headers["x-request-id"], raw.headers.get("x-litellm-response-cost")


def rows_of(db: str, token: str) -> list[dict[str, Any]]:
    columns = (
        "request_id", "api_key", "spend", "prompt_tokens", "completion_tokens",
        "total_tokens", "user", "team_id", "model", "model_group", "model_id",
        "custom_llm_provider", "status", "call_type", "startTime", "endTime",
    )  # fmt: skip
    found = execute(
        db,
        "SELECT " + ", ".join(f'"{c}"' for c in columns)
        + ' FROM "LiteLLM_SpendLogs" WHERE api_key = %s ORDER BY "startTime"',
        (token,),
    )  # fmt: skip
    return [dict(zip(columns, r, strict=True)) for r in found]


def wait_rows(
    db: str, token: str, n: int, within_s: float = WRITTEN_WITHIN_S
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within_s
    while True:
        rows = rows_of(db, token)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_every_answer_is_logged_with_its_key_team_user_and_cost(gateway: Gateway, db: str) -> None:
    team = admin(gateway, "POST", "/team/new", json={"team_alias": "search"}).json()["team_id"]
    user = admin(gateway, "POST", "/user/new", json={"user_id": "ana", "auto_create_key": False})
    assert user.status_code == 200, user.text
    key = new_key(gateway, team_id=team, user_id="ana", key_alias="search-ci")
    token = hash_key(key)
    before = gateway.metrics()
    made = [
        chat(gateway, key, "gpt-mock"),  # answered by the processor
        chat(gateway, key, "gpt-up"),  # passed on by Envoy, accounted from its access log
        chat(gateway, key, "gpt-up", stream=True),  # a stream Envoy passes on
    ]
    rows = wait_rows(db, token, 3)
    assert len(rows) == 3, rows
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == {rid for rid, _ in made}
    for (rid, cost), group in zip(made, ("gpt-mock", "gpt-up", "gpt-up"), strict=True):
        row = by_id[rid]
        assert row["team_id"] == team and row["user"] == "ana", row
        assert row["model_group"] == group and row["status"] == "success"
        assert row["call_type"] == "acompletion" and row["model"] == "gpt-4o-mini"
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] > 0
        expected = row["prompt_tokens"] * 0.001 + row["completion_tokens"] * 0.002
        assert row["spend"] == pytest.approx(expected)
        if cost is not None:  # what the client was told is what was logged
            assert float(cost) == pytest.approx(row["spend"])
        assert row["startTime"] <= row["endTime"]
    up = by_id[made[1][0]]
    assert (up["prompt_tokens"], up["completion_tokens"]) == (11, 7)
    streamed = by_id[made[2][0]]
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (9, 4)
    assert by_id[made[1][0]]["custom_llm_provider"] == "openai"
    total = sum(r["spend"] for r in rows)
    # The spend columns, as LiteLLM keeps them (same transaction as the rows).
    assert execute(db, 'SELECT spend FROM "LiteLLM_VerificationToken" WHERE token = %s', (token,))[
        0
    ][0] == pytest.approx(total)
    assert execute(db, 'SELECT spend FROM "LiteLLM_TeamTable" WHERE team_id = %s', (team,))[0][
        0
    ] == pytest.approx(total)
    assert execute(db, 'SELECT spend FROM "LiteLLM_UserTable" WHERE user_id = %s', ("ana",))[0][
        0
    ] == pytest.approx(total)
    # ... and read back by the management API.
    info = admin(gateway, "GET", "/key/info", params={"key": key}).json()["info"]
    assert info["spend"] == pytest.approx(total)
    team_info = admin(gateway, "GET", "/team/info", params={"team_id": team}).json()
    assert team_info["team_info"]["spend"] == pytest.approx(total)
    user_info = admin(gateway, "GET", "/user/info", params={"user_id": "ana"}).json()
    assert user_info["user_info"]["spend"] == pytest.approx(total)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    daily = execute(
        db,
        'SELECT sum(api_requests), sum(successful_requests), sum(spend), min(date) FROM "LiteLLM_DailyTeamSpend"'
        " WHERE team_id = %s",
        (team,),
    )[0]
    assert daily[0] == 3 and daily[1] == 3 and daily[2] == pytest.approx(total)
    assert daily[3] == today
    user_daily = execute(
        db,
        'SELECT sum(api_requests) FROM "LiteLLM_DailyUserSpend" WHERE user_id = %s AND api_key = %s',
        ("ana", token),
    )[0][0]
    assert user_daily == 3
    # Metrics carry the real team, for answers Envoy passed on too (accounted from its
    # access log, where the caller comes from the answer's marks).
    after = gateway.metrics_changed(before, "llm_spend_total", team=team, model="gpt-up")
    for model in ("gpt-mock", "gpt-up"):
        assert metric(after, "llm_token_usage_total", team=team, model=model) > metric(
            before, "llm_token_usage_total", team=team, model=model
        )
    assert metric(after, "llm_spend_total", team=team) - metric(
        before, "llm_spend_total", team=team
    ) == pytest.approx(total)
    assert key not in after


def test_a_failed_answer_is_logged_as_a_failure(gateway: Gateway, db: str) -> None:
    key = new_key(gateway, key_alias="fails")
    token = hash_key(key)
    reply = httpx.post(
        gateway.openai_base + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-up", "messages": MESSAGES, "user": "refuse-me"},
        timeout=15,
    )
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    (row,) = wait_rows(db, token, 1)
    assert row["status"] == "failure" and row["spend"] == 0
    assert row["request_id"] == reply.headers["x-request-id"]


def test_spend_is_read_back_in_litellm_shapes(gateway: Gateway, db: str) -> None:
    team = admin(gateway, "POST", "/team/new", json={"team_alias": "reports"}).json()["team_id"]
    key = new_key(gateway, team_id=team, key_alias="reports-key")
    token = hash_key(key)
    ids = [chat(gateway, key, "gpt-mock")[0], chat(gateway, key, "gpt-up")[0]]
    rows = wait_rows(db, token, 2)
    assert len(rows) == 2
    total = sum(r["spend"] for r in rows)
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    by_key = admin(gateway, "GET", "/spend/logs", params={"api_key": key})
    assert by_key.status_code == 200, by_key.text
    logged = by_key.json()
    assert {r["request_id"] for r in logged} == set(ids)
    first = logged[0]
    for column in ("api_key", "spend", "startTime", "endTime", "model", "model_group", "user",
                   "team_id", "metadata", "total_tokens", "prompt_tokens", "completion_tokens",
                   "call_type", "request_duration_ms", "custom_llm_provider", "status"):  # fmt: skip
        assert column in first, column
    assert first["api_key"] == token and first["team_id"] == team
    assert first["metadata"]["user_api_key_alias"] == "reports-key"
    one = admin(gateway, "GET", "/spend/logs", params={"request_id": ids[0]}).json()
    assert [r["request_id"] for r in one] == [ids[0]]

    summary = admin(
        gateway,
        "GET",
        "/spend/logs",
        params={"api_key": token, "start_date": today, "end_date": today},
    ).json()
    assert [d["startTime"] for d in summary] == [today]
    assert summary[0]["spend"] == pytest.approx(total)
    assert summary[0][token] == pytest.approx(total)
    assert set(summary[0]["models"]) == {"gpt-4o-mini"}
    unsummarized = admin(
        gateway, "GET", "/spend/logs",
        params={"api_key": token, "start_date": today, "end_date": today, "summarize": "false"},
    ).json()  # fmt: skip
    assert {r["request_id"] for r in unsummarized} == set(ids)

    report = admin(
        gateway, "GET", "/global/spend/report", params={"start_date": today, "end_date": today}
    )
    assert report.status_code == 200, report.text
    (day,) = report.json()
    assert day["group_by_day"].startswith(today)
    teams = {t["team_name"]: t for t in day["teams"]}
    assert teams["reports"]["total_spend"] == pytest.approx(total)
    assert {(m["api_key"], m["model"]) for m in teams["reports"]["metadata"]} == {
        (token, "gpt-4o-mini")
    }
    per_key = admin(
        gateway, "GET", "/global/spend/report",
        params={"start_date": today, "end_date": today, "api_key": key},
    ).json()  # fmt: skip
    assert [(k["api_key"], round(k["total_cost"], 9)) for k in per_key] == [
        (token, round(total, 9))
    ]
    assert per_key[0]["model_details"][0]["model"] == "gpt-4o-mini"
    assert per_key[0]["total_input_tokens"] == sum(r["prompt_tokens"] for r in rows)
    per_model = admin(
        gateway, "GET", "/global/spend/report",
        params={"start_date": today, "end_date": today, "group_by": "model", "team_id": team},
    ).json()  # fmt: skip
    assert [(m["model"], round(m["total_cost"], 9)) for m in per_model] == [
        ("gpt-4o-mini", round(total, 9))
    ]

    for params, field in (
        ({"start_date": "2026-13-01", "end_date": today}, "start_date"),
        ({"start_date": today}, "end_date"),
        ({"start_date": today, "end_date": "2000-01-01"}, "end_date"),
        ({"start_date": today, "end_date": today, "group_by": "planet"}, "group_by"),
    ):
        bad = admin(gateway, "GET", "/global/spend/report", params=params)
        assert bad.status_code == 400, (params, bad.text)
        assert bad.json()["error"]["param"] == field
    assert admin(gateway, "GET", "/global/spend/report").json()["error"]["param"] == "start_date"
    bad_logs = admin(
        gateway, "GET", "/spend/logs", params={"start_date": "yesterday", "end_date": today}
    )
    assert bad_logs.status_code == 400 and bad_logs.json()["error"]["param"] == "start_date"
    # Behind the master key only.
    refused = httpx.get(
        gateway.base_url + "/spend/logs", headers={"Authorization": f"Bearer {key}"}, timeout=15
    )
    assert refused.status_code == 403 and set(refused.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_rows_wait_out_a_database_outage(gateway: Gateway, db: str, proxy: TcpProxy) -> None:
    key = new_key(gateway, key_alias="outage")
    token = hash_key(key)
    chat(gateway, key, "gpt-mock")  # cached by the worker that answered
    wait_rows(db, token, 1)
    proxy.cut()
    try:
        answered = 0
        for _ in range(6):
            try:
                chat(gateway, key, "gpt-mock")
                answered += 1
            except openai.APIStatusError as exc:  # the other worker has no cached key: 503
                assert exc.status_code == 503
        assert answered >= 1
        time.sleep(2.5)  # a few failed batches
        assert len(rows_of(db, token)) == 1
    finally:
        proxy.restore()
    rows = wait_rows(db, token, 1 + answered)
    assert len(rows) == 1 + answered
    assert "spend logs not written" in gateway.log()


def test_sigterm_right_after_requests_loses_no_row(gateway: Gateway, db: str) -> None:
    """The last test of the two-worker gateway: it stops it."""
    key = new_key(gateway, key_alias="sigterm")
    token = hash_key(key)
    ids = [chat(gateway, key, "gpt-mock" if i % 2 else "gpt-up")[0] for i in range(10)]
    assert gateway.stop() == 0
    assert {r["request_id"] for r in rows_of(db, token)} == set(ids)


# -- a one-worker gateway with a tiny queue: drops, then SIGTERM -----------------------


@pytest.fixture(scope="module")
def small(
    db: str, proxy: TcpProxy, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = config_for(proxy.url(db), upstream, workers=1, spend_log_queue=3)
    gw = start_gateway(config, tmp_path_factory.mktemp("spend-small"))
    yield gw
    gw.stop()


def test_a_full_queue_drops_and_counts(small: Gateway, db: str, proxy: TcpProxy) -> None:
    key = new_key(small, key_alias="drops")
    token = hash_key(key)
    chat(small, key, "gpt-mock")
    wait_rows(db, token, 1)
    before = metric(small.metrics(), "llmux_spend_log_dropped_total")
    proxy.cut()
    try:
        for _ in range(8):
            chat(small, key, "gpt-mock")
        after = small.metrics_when(
            lambda text: metric(text, "llmux_spend_log_dropped_total") - before >= 5, timeout=15
        )
    finally:
        proxy.restore()
    rows = wait_rows(db, token, 4)
    dropped = metric(after, "llmux_spend_log_dropped_total") - before
    # The queue holds 3 rows: those are written once the database is back, 5 are counted.
    assert (len(rows) - 1, dropped) == (3, 5)
    time.sleep(1.5)
    assert len(rows_of(db, token)) == 4
