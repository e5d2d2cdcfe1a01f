"""LiteLLM's spend reports, read from `LiteLLM_SpendLogs`: `/spend/logs` and
`/global/spend/report`, with LiteLLM's query parameters and response shapes.

Dates are `YYYY-MM-DD` in UTC, and `end_date` is inclusive (the whole day): LiteLLM compares
`startTime` with midnight of `end_date`, so its reports for `start_date=end_date=today` are
empty, which nobody asking for today's spend means.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from llmux_extproc.db.keystore import KeyStore, tokens_of
from llmux_extproc.errors import bad_request

LOGS = sql.Identifier("LiteLLM_SpendLogs")
# /spend/logs without dates lists the newest rows only: LiteLLM returns the whole table,
# which on a busy proxy is an answer no client can hold.
MAX_ROWS = 10_000
GROUPS = ("team", "customer", "api_key", "model")


def _date(query: dict[str, str], name: str) -> datetime | None:
    value = query.get(name)
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise bad_request(f"{name}: expected a date as YYYY-MM-DD, got {value!r}.", name) from None


def _range(query: dict[str, str], required: bool) -> tuple[datetime, datetime] | None:
    start, end = _date(query, "start_date"), _date(query, "end_date")
    if start is None and end is None and not required:
        return None
    if start is None or end is None:
        missing = "start_date" if start is None else "end_date"
        raise bad_request(f"{missing}: start_date and end_date go together.", missing)
    if end < start:
        raise bad_request("end_date: is before start_date.", "end_date")
    return start, end + timedelta(days=1)


def _out(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat() if isinstance(v, datetime) else v
        for k, v in row.items()
    }


async def spend_logs(store: KeyStore, query: dict[str, str]) -> Any:
    where: list[sql.Composable] = []
    params: list[Any] = []
    # As LiteLLM: one filter, the first of api_key, request_id, user_id given.
    if query.get("api_key"):
        where.append(sql.SQL("api_key = %s"))
        params.append(tokens_of([query["api_key"]])[0])
    elif query.get("request_id"):
        where.append(sql.SQL("request_id = %s"))
        params.append(query["request_id"])
    elif query.get("user_id"):
        where.append(sql.SQL('"user" = %s'))
        params.append(query["user_id"])
    span = _range(query, required=False)
    if span is not None:
        where.append(sql.SQL('"startTime" >= %s AND "startTime" < %s'))
        params += list(span)
    summarize = query.get("summarize", "true").lower() != "false"
    condition = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
    async with store.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        if span is not None and summarize:
            await cur.execute(
                sql.SQL(
                    'SELECT date_trunc(\'day\', "startTime") AS day, api_key, "user", model,'
                    " sum(spend) AS spend FROM {}"
                ).format(LOGS)
                + condition
                + sql.SQL(' GROUP BY 1, api_key, "user", model ORDER BY 1'),
                params,
            )
            return _by_day(await cur.fetchall(), span)
        await cur.execute(
            sql.SQL("SELECT * FROM {}").format(LOGS)
            + condition
            + sql.SQL(' ORDER BY "startTime" DESC LIMIT %s'),
            [*params, MAX_ROWS],
        )
        return [_out(r) for r in await cur.fetchall()]


def _by_day(rows: list[dict[str, Any]], span: tuple[datetime, datetime]) -> list[dict[str, Any]]:
    """LiteLLM's summarized /spend/logs: per day, the spend in all, per key (the key hash
    as the field name), per user and per model; days without spend up to end_date too."""
    days: dict[str, dict[str, Any]] = {}
    for r in rows:
        day = r["day"].date().isoformat()
        entry = days.setdefault(day, {"startTime": day, "spend": 0.0, "users": {}, "models": {}})
        spend = float(r["spend"] or 0.0)
        entry["spend"] += spend
        entry[r["api_key"]] = entry.get(r["api_key"], 0.0) + spend
        entry["users"][r["user"]] = entry["users"].get(r["user"], 0.0) + spend
        entry["models"][r["model"]] = entry["models"].get(r["model"], 0.0) + spend
    out = [days[d] for d in sorted(days)]
    if out:
        day = datetime.fromisoformat(out[-1]["startTime"]) + timedelta(days=1)
        while day < span[1]:
            out.append({"startTime": day.date().isoformat(), "spend": 0, "users": {}, "models": {}})
            day += timedelta(days=1)
    return out


async def global_spend_report(store: KeyStore, query: dict[str, str]) -> Any:
    """LiteLLM's /global/spend/report: spend per day and team (group_by=team, the default)
    or customer, or per key (group_by=api_key, or api_key / internal_user_id given), each
    with its models; group_by=model is LLMux's, per model with its keys."""
    span = _range(query, required=True)
    assert span is not None
    group_by = query.get("group_by") or "team"
    if group_by not in GROUPS:
        raise bad_request(
            f"group_by: must be one of {', '.join(GROUPS)}, got {group_by!r}.", "group_by"
        )
    where: list[sql.Composable] = [sql.SQL('sl."startTime" >= %s AND sl."startTime" < %s')]
    params: list[Any] = list(span)
    for name, column in (
        ("api_key", "api_key"),
        ("internal_user_id", "user"),
        ("team_id", "team_id"),
        ("customer_id", "end_user"),
    ):
        if query.get(name):
            where.append(sql.SQL("sl.{} = %s").format(sql.Identifier(column)))
            params.append(tokens_of([query[name]])[0] if name == "api_key" else query[name])
    if query.get("api_key") or query.get("internal_user_id"):
        group_by = "api_key"  # as LiteLLM
    async with store.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL(
                "SELECT date_trunc('day', sl.\"startTime\") AS day,"
                " COALESCE(tt.team_alias, 'Unassigned Team') AS team_name, sl.end_user,"
                " sl.model, sl.api_key, sum(sl.spend) AS spend,"
                " sum(sl.total_tokens) AS total_tokens, sum(sl.prompt_tokens) AS input_tokens,"
                " sum(sl.completion_tokens) AS output_tokens, count(*) AS requests"
                " FROM {} sl LEFT JOIN {} tt ON sl.team_id = tt.team_id WHERE "
            ).format(LOGS, sql.Identifier("LiteLLM_TeamTable"))
            + sql.SQL(" AND ").join(where)
            + sql.SQL(" GROUP BY 1, 2, sl.end_user, sl.model, sl.api_key ORDER BY 1"),
            params,
        )
        rows = await cur.fetchall()
    if group_by == "api_key":
        return _totals(rows, "api_key", "model", "model_details")
    if group_by == "model":
        return _totals(rows, "model", "api_key", "key_details")
    member, field = ("teams", "team_name") if group_by == "team" else ("customers", "end_user")
    label = "team_name" if group_by == "team" else "customer"
    days: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        day = r["day"].isoformat()
        groups = days.setdefault(day, {})
        group = groups.setdefault(r[field], {label: r[field], "total_spend": 0.0, "metadata": []})
        group["total_spend"] += float(r["spend"] or 0.0)
        group["metadata"].append(
            {
                "model": r["model"],
                "api_key": r["api_key"],
                "spend": float(r["spend"] or 0.0),
                "total_tokens": int(r["total_tokens"] or 0),
            }
        )
    return [{"group_by_day": day, member: list(days[day].values())} for day in sorted(days)]


def _totals(rows: list[dict[str, Any]], by: str, detail: str, details: str) -> list[Any]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(
            r[by],
            {
                by: r[by],
                "total_cost": 0.0,
                "total_input_tokens": 0,
                "total_output_tokens": 0,
                details: {},
            },
        )
        cost, tokens_in, tokens_out = (
            float(r["spend"] or 0.0),
            int(r["input_tokens"] or 0),
            int(r["output_tokens"] or 0),
        )
        entry["total_cost"] += cost
        entry["total_input_tokens"] += tokens_in
        entry["total_output_tokens"] += tokens_out
        d = entry[details].setdefault(
            r[detail],
            {
                detail: r[detail],
                "total_cost": 0.0,
                "total_input_tokens": 0,
                "total_output_tokens": 0,
            },
        )
        d["total_cost"] += cost
        d["total_input_tokens"] += tokens_in
        d["total_output_tokens"] += tokens_out
    result = sorted(out.values(), key=lambda e: -e["total_cost"])
    for entry in result:
        entry[details] = list(entry[details].values())
    return result
