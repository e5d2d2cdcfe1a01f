"""LiteLLM's key and team management API, answered by the processor from PostgreSQL.

Paths, request fields and response shapes are LiteLLM's (`/key/generate`, `/key/info`,
`/key/update`, `/key/delete`, `/key/block`, `/key/unblock`, `/key/list`, `/team/new`,
`/team/info`); rows are written as LiteLLM's Prisma writes them (hashed token, LiteLLM's
`sk-...abcd` key name, UTC timestamps, ids set by the writer), so a LiteLLM proxy reading
the same database sees ordinary rows. Every write is one transaction: a request that fails
half-way leaves nothing behind. Bad input is a 400 naming the field; an unknown key or team
a 404. Fields LiteLLM has and LLMux neither stores nor honours are accepted, named in the
`x-llmux-ignored-fields` response header and logged, never silently taken as honoured.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from llmux_extproc.db import spend_api
from llmux_extproc.db.keystore import KeyStore, tokens_of
from llmux_extproc.errors import GatewayError, bad_request
from llmux_extproc.policy.keys import hash_key, key_name

log = logging.getLogger("llmux.management")

# Who LiteLLM records as the creator of what the master key makes (LITELLM_PROXY_ADMIN_NAME).
ADMIN_NAME = "default_user_id"
KEY_TABLE = sql.Identifier("LiteLLM_VerificationToken")
TEAM_TABLE = sql.Identifier("LiteLLM_TeamTable")
BUDGET_TABLE = sql.Identifier("LiteLLM_BudgetTable")
USER_TABLE = sql.Identifier("LiteLLM_UserTable")
PATHS = frozenset(
    {
        "/key/generate",
        "/key/info",
        "/key/update",
        "/key/delete",
        "/key/block",
        "/key/unblock",
        "/key/list",
        "/team/new",
        "/team/info",
        "/key/regenerate",
        "/team/update",
        "/team/delete",
        "/team/list",
        "/user/new",
        "/user/info",
        "/spend/logs",
        "/global/spend/report",
    }
)
_DURATION = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}


@dataclass(slots=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def duration_seconds(value: str, where: str) -> int:
    """LiteLLM's durations: `30s`, `30m`, `30h`, `30d`, `2w`, `1mo` (30 days)."""
    found = _DURATION.match(value.strip()) if isinstance(value, str) else None
    if found is None:
        raise bad_request(
            f"{where}: invalid duration {value!r}; expected a number and a unit "
            "(s, m, h, d, w, mo), e.g. '30d'.",
            where,
        )
    return int(found.group(1)) * _DURATION_UNITS[found.group(2)]


def _now() -> datetime:
    # `timestamp(3) without time zone` holding UTC, as Prisma writes it.
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def _out(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return value


def row_json(row: Mapping[str, Any], *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: _out(v) for k, v in row.items() if k not in drop}


# -- request fields ---------------------------------------------------------------------


class Fields:
    """A request body's fields, checked one by one; errors name the field."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        # As LiteLLM (exclude_none): a null field is an absent one, in updates too.
        self.body = {k: v for k, v in body.items() if v is not None}
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.body

    def _get(self, name: str) -> Any:
        self.used.add(name)
        return self.body.get(name)

    def string(self, name: str) -> str | None:
        value = self._get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise bad_request(f"{name}: must be a non-empty string, got {value!r}.", name)
        return value

    def boolean(self, name: str) -> bool | None:
        value = self._get(name)
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"{name}: must be true or false, got {value!r}.", name)
        return value

    def count(self, name: str) -> int | None:
        value = self._get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise bad_request(f"{name}: must be a non-negative integer, got {value!r}.", name)
        return value

    def amount(self, name: str) -> float | None:
        value = self._get(name)
        if value is None:
            return None
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise bad_request(f"{name}: must be a non-negative number, got {value!r}.", name)
        return float(value)

    def strings(self, name: str) -> list[str] | None:
        value = self._get(name)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)
        ):
            raise bad_request(f"{name}: must be a list of non-empty strings, got {value!r}.", name)
        return value

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self._get(name)
        if value is not None and not isinstance(value, dict):
            raise bad_request(f"{name}: must be an object, got {value!r}.", name)
        return value

    def counts(self, name: str) -> dict[str, int] | None:
        value = self.mapping(name)
        for model, limit in (value or {}).items():
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise bad_request(
                    f"{name}.{model}: must be a non-negative integer, got {limit!r}.",
                    f"{name}.{model}",
                )
        return value

    def duration(self, name: str, *, never: bool = False) -> int | None:
        """Seconds; -1 for LiteLLM's "-1" (never expires) where `never` allows it."""
        value = self._get(name)
        if value is None:
            return None
        if never and value in ("-1", -1):
            return -1
        if not isinstance(value, str):
            raise bad_request(f"{name}: must be a duration string such as '30d'.", name)
        return duration_seconds(value, name)

    def ignored(self) -> list[str]:
        return sorted(set(self.body) - self.used)


# Stored as LiteLLM stores them (LiteLLM reads them back), not enforced by LLMux yet. Rate
# limits and budgets (rpm_limit, tpm_limit, max_parallel_requests, model_rpm_limit,
# model_tpm_limit, max_budget, soft_budget, budget_duration, budget_id) are enforced
# (policy/limits.py).
NOT_ENFORCED = frozenset(
    {
        "model_max_budget",
        "allowed_routes",
        "allowed_cache_controls",
        "permissions",
        "guardrails",
    }
)


def _ignored(fields: Fields, path: str, answer: Answer) -> Answer:
    """Name what the request asked for that LLMux does not do (yet), in headers and logs."""
    ignored = fields.ignored()
    if ignored:
        log.warning("%s: fields LLMux does not support were ignored: %s", path, ignored)
        answer.headers["x-llmux-ignored-fields"] = ",".join(ignored)
    stored = sorted(NOT_ENFORCED & fields.used & fields.body.keys())
    if stored:
        log.warning("%s: stored, not enforced by LLMux yet: %s", path, stored)
        answer.headers["x-llmux-not-enforced-fields"] = ",".join(stored)
    return answer


# -- the dispatcher ---------------------------------------------------------------------


class MethodNotAllowed(GatewayError):
    """A 405 that names, for the `Allow` header, the methods the path takes."""

    def __init__(self, allowed: list[str], message: str) -> None:
        super().__init__(405, message)
        self.allow = ", ".join(allowed)


async def _row_and_keys(
    cur: Any, table: sql.Composable, column: str, value: str, what: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A team's or user's row by id (404 naming it when there is none) and its keys."""
    await cur.execute(
        sql.SQL("SELECT * FROM {} WHERE {} = %s").format(table, sql.Identifier(column)), (value,)
    )
    row = await cur.fetchone()
    if row is None:
        raise _not_found(f"{what} {value!r}", column)
    await cur.execute(
        sql.SQL("SELECT * FROM {} WHERE {} = %s ORDER BY created_at").format(
            KEY_TABLE, sql.Identifier(column)
        ),
        (value,),
    )
    return row, [row_json(r) for r in await cur.fetchall()]


async def _insert(cur: Any, table: sql.Composable, values: dict[str, Any]) -> None:
    """INSERT ... RETURNING * of one row whose columns are the keys of `values`."""
    columns = list(values)
    await cur.execute(
        sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING *").format(
            table,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        ),
        [values[c] for c in columns],
    )


async def handle(store: KeyStore, method: str, path: str, body: bytes) -> Answer:
    """Answer one management request (the caller checked the master key)."""
    route, _, query = path.partition("?")
    handlers: dict[tuple[str, str], Callable[[KeyStore, Any], Any]] = {
        ("POST", "/key/generate"): generate_key,
        ("GET", "/key/info"): key_info,
        ("POST", "/key/update"): update_key,
        ("POST", "/key/delete"): delete_keys,
        ("POST", "/key/block"): block_key,
        ("POST", "/key/unblock"): unblock_key,
        ("GET", "/key/list"): list_keys,
        ("POST", "/team/new"): new_team,
        ("GET", "/team/info"): team_info,
        ("POST", "/key/regenerate"): regenerate_key_body,
        ("POST", "/team/update"): update_team,
        ("POST", "/team/delete"): delete_teams,
        ("GET", "/team/list"): list_teams,
        ("POST", "/user/new"): new_user,
        ("GET", "/user/info"): user_info,
        ("GET", "/spend/logs"): _spend_logs,
        ("GET", "/global/spend/report"): _spend_report,
    }
    path_key = regenerate_target(route)
    if path_key is not None:  # LiteLLM's /key/{key}/regenerate
        route = "/key/regenerate"
    handler = handlers.get((method, route))
    if handler is None:
        allowed = [m for m, p in handlers if p == route]
        if not allowed:
            raise GatewayError(404, f"Unknown management path {route}.")
        raise MethodNotAllowed(allowed, f"{route} takes {' or '.join(allowed)}, not {method}.")
    arg: Any
    if method == "GET":
        arg = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    elif path_key is not None and not body:
        arg = {}  # LiteLLM's path form needs no body
    else:
        arg = _json_body(body)
    try:
        if path_key is not None and handler is regenerate_key_body:
            result: Answer = await regenerate_key(store, arg, path_key)
        else:
            result = await handler(store, arg)
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise GatewayError(
            503,
            f"The key database is unavailable ({str(exc).strip().splitlines()[0]}); "
            "nothing was changed. Retry later.",
            code="database_unavailable",
        ) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise GatewayError(
            503, "The key tables are missing: run `llmux db migrate`.", code="database_schema"
        ) from exc
    return result


def _json_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("Request body is empty; expected a JSON object.")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise bad_request("Request body must be a JSON object.")
    return parsed


def _conn(store: KeyStore) -> Any:
    return store.pool.connection()


# -- keys -------------------------------------------------------------------------------

# Columns /key/generate and /key/update write straight from a field of the same name.
_KEY_SCALARS = {
    "key_alias": Fields.string,
    "user_id": Fields.string,
    "team_id": Fields.string,
    "budget_id": Fields.string,
    "organization_id": Fields.string,
    "max_budget": Fields.amount,
    "spend": Fields.amount,
    "tpm_limit": Fields.count,
    "rpm_limit": Fields.count,
    "max_parallel_requests": Fields.count,
    "blocked": Fields.boolean,
    "models": Fields.strings,
    "allowed_cache_controls": Fields.strings,
    "allowed_routes": Fields.strings,
}
_KEY_JSON = ("aliases", "config", "permissions", "model_max_budget")


def _key_values(f: Fields, existing_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Column values for the key fields present in the request (None: set to NULL)."""
    values: dict[str, Any] = {}
    for name, read in _KEY_SCALARS.items():
        if f.has(name):
            values[name] = read(f, name)
    for name in _KEY_JSON:
        if f.has(name):
            values[name] = Jsonb(f.mapping(name) or {})
    for alias, target in (f.mapping("aliases") or {}).items() if f.has("aliases") else ():
        if not isinstance(target, str) or not target:
            raise bad_request(
                f"aliases.{alias}: must name a model group (a non-empty string), got {target!r}.",
                f"aliases.{alias}",
            )
    # LiteLLM keeps these inside the key's metadata.
    extra: dict[str, Any] = {}
    for name in ("model_rpm_limit", "model_tpm_limit"):
        if f.has(name):
            extra[name] = f.counts(name)
    for name in ("tags", "guardrails"):
        if f.has(name):
            extra[name] = f.strings(name)
    if f.has("metadata") or extra:
        metadata = f.mapping("metadata") if f.has("metadata") else None
        merged = dict(metadata if metadata is not None else existing_metadata or {})
        merged.update({k: v for k, v in extra.items() if v is not None})
        values["metadata"] = Jsonb(merged)
    if f.has("duration"):
        seconds = f.duration("duration", never=True)
        values["expires"] = (
            None if seconds in (None, -1) else _now() + timedelta(seconds=seconds or 0)
        )
    if f.has("budget_duration"):
        seconds = f.duration("budget_duration")
        values["budget_duration"] = f.body.get("budget_duration") if seconds else None
        values["budget_reset_at"] = _now() + timedelta(seconds=seconds) if seconds else None
    return values


async def _alias_taken(cur: Any, alias: str, token: str | None) -> None:
    # Serializes two requests creating the same alias at once (no unique index in
    # LiteLLM's schema to lean on).
    await cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 11))", (alias,))
    await cur.execute(
        sql.SQL("SELECT token FROM {} WHERE key_alias = %s AND token IS DISTINCT FROM %s").format(
            KEY_TABLE
        ),
        (alias, token),
    )
    if await cur.fetchone() is not None:
        raise bad_request(
            f"key_alias: {alias!r} is already used by another key; key aliases are unique.",
            "key_alias",
        )


async def _new_budget(cur: Any, soft_budget: float, now: datetime) -> str:
    budget_id = str(uuid.uuid4())
    await cur.execute(
        sql.SQL(
            "INSERT INTO {} (budget_id, soft_budget, created_at, created_by, updated_at,"
            " updated_by) VALUES (%s, %s, %s, %s, %s, %s)"
        ).format(BUDGET_TABLE),
        (budget_id, soft_budget, now, ADMIN_NAME, now, ADMIN_NAME),
    )
    return budget_id


def _foreign(exc: psycopg.errors.ForeignKeyViolation) -> GatewayError:
    return bad_request("budget_id: no such budget in LiteLLM_BudgetTable.", "budget_id")


def _new_raw_key(f: Fields, name: str = "key") -> str:
    raw = f.string(name)
    if raw is not None and not raw.startswith("sk-"):
        raise bad_request(f"{name}: a virtual key must start with 'sk-'.", name)
    return raw or "sk-" + secrets.token_urlsafe(16)  # LiteLLM's length


def _prepare_key(f: Fields, raw: str) -> tuple[dict[str, Any], float | None]:
    """The new key row's values from the request fields (checked), and its soft budget."""
    soft_budget = f.amount("soft_budget")
    values = _key_values(f, None)
    now = _now()
    values.update(
        token=hash_key(raw),
        key_name=key_name(raw),
        created_at=now,
        updated_at=now,
        created_by=ADMIN_NAME,
        updated_by=ADMIN_NAME,
    )
    values.setdefault("models", [])
    values.setdefault("metadata", Jsonb({}))
    return values, soft_budget


async def _insert_key(
    cur: Any, raw: str, values: dict[str, Any], soft_budget: float | None
) -> dict[str, Any]:
    """Insert a key row inside the caller's transaction; LiteLLM's /key/generate answer."""
    if values.get("key_alias"):
        await _alias_taken(cur, values["key_alias"], None)
    if soft_budget is not None and values.get("budget_id") is None:
        values["budget_id"] = await _new_budget(cur, soft_budget, values["created_at"])
    try:
        await _insert(cur, KEY_TABLE, values)
    except psycopg.errors.UniqueViolation as exc:
        raise bad_request("key: this key already exists.", "key") from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        raise _foreign(exc) from exc
    row = await cur.fetchone()
    assert row is not None
    out = row_json(row)
    out.update(key=raw, token_id=values["token"], soft_budget=soft_budget)
    metadata = out.get("metadata") or {}
    for name in ("model_rpm_limit", "model_tpm_limit"):
        out[name] = metadata.get(name)
    return out


async def generate_key(store: KeyStore, body: dict[str, Any]) -> Answer:
    f = Fields(body)
    raw = _new_raw_key(f)
    values, soft_budget = _prepare_key(f, raw)
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        out = await _insert_key(cur, raw, values, soft_budget)
    return _ignored(f, "/key/generate", Answer(200, out))


async def _key_row(cur: Any, token: str, *, lock: bool = False) -> dict[str, Any] | None:
    query = sql.SQL("SELECT * FROM {} WHERE token = %s").format(KEY_TABLE)
    if lock:
        query += sql.SQL(" FOR UPDATE")
    await cur.execute(query, (token,))
    row: dict[str, Any] | None = await cur.fetchone()
    return row


def _not_found(what: str, param: str) -> GatewayError:
    return GatewayError(404, f"{param}: {what} not found.", param=param)


async def key_info(store: KeyStore, query: dict[str, str]) -> Answer:
    key = query.get("key")
    if not key:
        raise bad_request("key: the key (or its hash) is required, as ?key=.", "key")
    token = tokens_of([key])[0]
    async with _conn(store) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = await _key_row(cur, token)
        if row is None:
            raise _not_found("Key", "key")
        budget = None
        if row.get("budget_id"):
            await cur.execute(
                sql.SQL("SELECT * FROM {} WHERE budget_id = %s").format(BUDGET_TABLE),
                (row["budget_id"],),
            )
            found = await cur.fetchone()
            budget = row_json(found) if found else None
    info = row_json(row, drop=("token",))
    info["litellm_budget_table"] = budget
    return Answer(200, {"key": key, "info": info})


async def update_key(store: KeyStore, body: dict[str, Any]) -> Answer:
    f = Fields(body)
    key = f.string("key")
    if key is None:
        raise bad_request("key: the key (or its hash) to update is required.", "key")
    token = tokens_of([key])[0]
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        existing = await _key_row(cur, token, lock=True)
        if existing is None:
            raise _not_found("Key", "key")
        values = _key_values(f, existing.get("metadata") or {})
        if values.get("key_alias"):
            await _alias_taken(cur, values["key_alias"], token)
        values.update(updated_at=_now(), updated_by=ADMIN_NAME)
        try:
            await cur.execute(
                sql.SQL("UPDATE {} SET {} WHERE token = %s RETURNING *").format(
                    KEY_TABLE,
                    sql.SQL(", ").join(
                        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder())
                        for c in values
                    ),
                ),
                [*values.values(), token],
            )
        except psycopg.errors.ForeignKeyViolation as exc:
            raise _foreign(exc) from exc
        row = await cur.fetchone()
    assert row is not None
    store.notified("k:" + token)  # this worker at once, whatever its listener's state
    return _ignored(f, "/key/update", Answer(200, {"key": key, **row_json(row, drop=("token",))}))


async def _set_blocked(store: KeyStore, body: dict[str, Any], blocked: bool) -> Answer:
    f = Fields(body)
    key = f.string("key")
    if key is None:
        raise bad_request("key: the key (or its hash) is required.", "key")
    token = tokens_of([key])[0]
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL(
                "UPDATE {} SET blocked = %s, updated_at = %s, updated_by = %s"
                " WHERE token = %s RETURNING *"
            ).format(KEY_TABLE),
            (blocked, _now(), ADMIN_NAME, token),
        )
        row = await cur.fetchone()
    if row is None:
        raise _not_found("Key", "key")
    store.notified("k:" + token)
    return Answer(200, row_json(row))


async def block_key(store: KeyStore, body: dict[str, Any]) -> Answer:
    return await _set_blocked(store, body, True)


async def unblock_key(store: KeyStore, body: dict[str, Any]) -> Answer:
    return await _set_blocked(store, body, False)


async def delete_keys(store: KeyStore, body: dict[str, Any]) -> Answer:
    f = Fields(body)
    keys = f.strings("keys")
    aliases = f.strings("key_aliases")
    if not keys and not aliases:
        raise bad_request("keys: give `keys` (keys or hashes) or `key_aliases` to delete.", "keys")
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        if keys:
            wanted = tokens_of(keys)
            deleted = await _archive_keys(cur, "token", wanted)
            gone = {r["token"] for r in deleted}
            missing = [k for k, t in zip(keys, wanted, strict=True) if t not in gone]
            param, asked = "keys", keys
        else:
            assert aliases is not None
            deleted = await _archive_keys(cur, "key_alias", aliases)
            gone = {r["token"] for r in deleted}
            found_aliases = {r["key_alias"] for r in deleted}
            missing = [a for a in aliases if a not in found_aliases]
            param, asked = "key_aliases", aliases
        if missing:
            # Raising inside the transaction rolls the deletions back: all or nothing.
            raise GatewayError(
                404,
                f"{param}: not found, nothing was deleted: {', '.join(missing)}",
                param=param,
            )
    for token in gone:
        store.notified("k:" + token)
    return _ignored(f, "/key/delete", Answer(200, {"deleted_keys": asked}))


# The key columns LiteLLM_DeletedVerificationToken shares with the key table (0001, 0005).
_ARCHIVED_KEY_COLUMNS = (
    "token", "key_name", "key_alias", "soft_budget_cooldown", "spend", "expires", "models",
    "aliases", "config", "user_id", "team_id", "permissions", "max_parallel_requests",
    "metadata", "blocked", "tpm_limit", "rpm_limit", "max_budget", "budget_duration",
    "budget_reset_at", "allowed_cache_controls", "allowed_routes", "model_spend",
    "model_max_budget", "budget_id", "organization_id", "created_at", "created_by",
    "updated_at", "updated_by",
)  # fmt: skip
_ARCHIVED_TEAM_COLUMNS = (
    "team_id", "team_alias", "organization_id", "admins", "members", "members_with_roles",
    "metadata", "max_budget", "soft_budget", "spend", "models", "max_parallel_requests",
    "tpm_limit", "rpm_limit", "budget_duration", "budget_reset_at", "blocked", "model_spend",
    "model_max_budget", "created_at", "updated_at",
)  # fmt: skip


async def _archive(
    cur: Any, table: str, archive: str, columns: tuple[str, ...], where: str, values: list[str]
) -> list[dict[str, Any]]:
    """Delete the rows whose `where` column is in `values`, copying them to LiteLLM's audit
    table first (as LiteLLM's /key/delete and /team/delete do); the deleted rows."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    await cur.execute(
        sql.SQL(
            "WITH gone AS (DELETE FROM {table} WHERE {where} = ANY(%s) RETURNING *)"
            " INSERT INTO {archive} (id, {names}, deleted_at, deleted_by)"
            " SELECT gen_random_uuid()::text, {names}, %s, %s FROM gone RETURNING {names}"
        ).format(
            table=sql.Identifier(table),
            where=sql.Identifier(where),
            archive=sql.Identifier(archive),
            names=names,
        ),
        (values, _now(), ADMIN_NAME),
    )
    rows: list[dict[str, Any]] = await cur.fetchall()
    return rows


async def _archive_keys(cur: Any, where: str, values: list[str]) -> list[dict[str, Any]]:
    return await _archive(
        cur,
        "LiteLLM_VerificationToken",
        "LiteLLM_DeletedVerificationToken",
        _ARCHIVED_KEY_COLUMNS,
        where,
        values,
    )


def _query_int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = query.get(name)
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise bad_request(f"{name}: must be an integer from {low} to {high}, got {value!r}.", name)
    return int(value)


async def list_keys(store: KeyStore, query: dict[str, str]) -> Answer:
    page = _query_int(query, "page", 1, 1, 1_000_000)
    size = _query_int(query, "size", 10, 1, 100)
    full = query.get("return_full_object", "false").lower() == "true"
    where: list[sql.Composable] = []
    params: list[Any] = []
    for name in ("user_id", "team_id", "key_alias", "organization_id"):
        if query.get(name):
            where.append(sql.SQL("{} = %s").format(sql.Identifier(name)))
            params.append(query[name])
    condition = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
    async with _conn(store) as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT count(*) AS n FROM {}").format(KEY_TABLE) + condition, params
        )
        counted = await cur.fetchone()
        total = int(counted["n"]) if counted else 0
        await cur.execute(
            sql.SQL("SELECT * FROM {}").format(KEY_TABLE)
            + condition
            + sql.SQL(" ORDER BY created_at DESC NULLS LAST, token LIMIT %s OFFSET %s"),
            [*params, size, (page - 1) * size],
        )
        rows = await cur.fetchall()
    keys = [row_json(r) for r in rows] if full else [r["token"] for r in rows]
    return Answer(
        200,
        {
            "keys": keys,
            "total_count": total,
            "current_page": page,
            "total_pages": math.ceil(total / size) if total else 0,
        },
    )


# -- teams ------------------------------------------------------------------------------


async def new_team(store: KeyStore, body: dict[str, Any]) -> Answer:
    f = Fields(body)
    team_id = f.string("team_id") or str(uuid.uuid4())
    now = _now()
    values: dict[str, Any] = {
        "team_id": team_id,
        "team_alias": f.string("team_alias"),
        "models": f.strings("models") or [],
        "max_budget": f.amount("max_budget"),
        "soft_budget": f.amount("soft_budget"),
        "tpm_limit": f.count("tpm_limit"),
        "rpm_limit": f.count("rpm_limit"),
        "max_parallel_requests": f.count("max_parallel_requests"),
        "blocked": bool(f.boolean("blocked")),
        "organization_id": f.string("organization_id"),
        "admins": [],
        "members": [],
        "created_at": now,
        "updated_at": now,
    }
    metadata = dict(f.mapping("metadata") or {})
    for name in ("model_rpm_limit", "model_tpm_limit"):
        limits = f.counts(name)
        if limits is not None:
            metadata[name] = limits
    values["metadata"] = Jsonb(metadata)
    members = f._get("members_with_roles")
    if members is not None:
        if not isinstance(members, list) or not all(
            isinstance(m, dict) and isinstance(m.get("user_id") or m.get("user_email"), str)
            for m in members
        ):
            raise bad_request(
                "members_with_roles: must be a list of {user_id, role} objects.",
                "members_with_roles",
            )
        values["members_with_roles"] = Jsonb(members)
        values["members"] = [m["user_id"] for m in members if m.get("user_id")]
        values["admins"] = [
            m["user_id"] for m in members if m.get("role") == "admin" and m.get("user_id")
        ]
    if f.has("budget_duration"):
        seconds = f.duration("budget_duration")
        values["budget_duration"] = body["budget_duration"]
        values["budget_reset_at"] = now + timedelta(seconds=seconds or 0)
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        try:
            await _insert(cur, TEAM_TABLE, values)
        except psycopg.errors.UniqueViolation as exc:
            raise bad_request(
                f"team_id: team {team_id!r} already exists; use a different team_id.", "team_id"
            ) from exc
        row = await cur.fetchone()
    assert row is not None
    return _ignored(f, "/team/new", Answer(200, row_json(row)))


async def team_info(store: KeyStore, query: dict[str, str]) -> Answer:
    team_id = query.get("team_id")
    if not team_id:
        raise bad_request("team_id: required, as ?team_id=.", "team_id")
    async with _conn(store) as conn, conn.cursor(row_factory=dict_row) as cur:
        team, keys = await _row_and_keys(cur, TEAM_TABLE, "team_id", team_id, "Team")
    return Answer(
        200,
        {"team_id": team_id, "team_info": row_json(team), "keys": keys, "team_memberships": []},
    )


# -- more of LiteLLM's API: key rotation, teams, users ---------------------------------


def regenerate_target(route: str) -> str | None:
    """The key of LiteLLM's `/key/{key}/regenerate` path form."""
    if route.startswith("/key/") and route.endswith("/regenerate"):
        key = route[len("/key/") : -len("/regenerate")]
        return key or None
    return None


def owns(route: str) -> bool:
    """Whether `route` (a path without its query) is a management path."""
    return route in PATHS or regenerate_target(route) is not None


async def regenerate_key(store: KeyStore, body: dict[str, Any], path_key: str | None) -> Answer:
    """LiteLLM's /key/regenerate: the same row under a new key (its hash is the row's id),
    with the fields given updated; the old key stops working at once."""
    f = Fields(body)
    key = f.string("key") or path_key
    if key is None:
        raise bad_request("key: the key (or its hash) to regenerate is required.", "key")
    if f.has("new_master_key"):
        f.used.add("new_master_key")
        raise bad_request(
            "new_master_key: the master key is general_settings.master_key in LLMux's "
            "config; change it there.",
            "new_master_key",
        )
    raw = _new_raw_key(f, "new_key")
    old = tokens_of([key])[0]
    new = hash_key(raw)
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        existing = await _key_row(cur, old, lock=True)
        if existing is None:
            raise _not_found("Key", "key")
        values = _key_values(f, existing.get("metadata") or {})
        if values.get("key_alias"):
            await _alias_taken(cur, values["key_alias"], old)
        values.update(token=new, key_name=key_name(raw), updated_at=_now(), updated_by=ADMIN_NAME)
        try:
            await cur.execute(
                sql.SQL("UPDATE {} SET {} WHERE token = %s RETURNING *").format(
                    KEY_TABLE,
                    sql.SQL(", ").join(
                        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder())
                        for c in values
                    ),
                ),
                [*values.values(), old],
            )
        except psycopg.errors.UniqueViolation as exc:
            raise bad_request("new_key: this key already exists.", "new_key") from exc
        except psycopg.errors.ForeignKeyViolation as exc:
            raise _foreign(exc) from exc
        row = await cur.fetchone()
    assert row is not None
    store.notified("k:" + old)
    out = row_json(row, drop=("token",))
    out.update(key=raw, token_id=new)
    return _ignored(f, "/key/regenerate", Answer(200, out))


async def regenerate_key_body(store: KeyStore, body: dict[str, Any]) -> Answer:
    return await regenerate_key(store, body, None)


_TEAM_SCALARS = {
    "team_alias": Fields.string,
    "organization_id": Fields.string,
    "max_budget": Fields.amount,
    "soft_budget": Fields.amount,
    "tpm_limit": Fields.count,
    "rpm_limit": Fields.count,
    "max_parallel_requests": Fields.count,
    "blocked": Fields.boolean,
    "models": Fields.strings,
}


async def update_team(store: KeyStore, body: dict[str, Any]) -> Answer:
    f = Fields(body)
    team_id = f.string("team_id")
    if team_id is None:
        raise bad_request("team_id: the team to update is required.", "team_id")
    values: dict[str, Any] = {}
    for name, read in _TEAM_SCALARS.items():
        if f.has(name):
            values[name] = read(f, name)
    now = _now()
    if f.has("budget_duration"):
        seconds = f.duration("budget_duration")
        values["budget_duration"] = body["budget_duration"]
        values["budget_reset_at"] = now + timedelta(seconds=seconds or 0)
    limits = {n: f.counts(n) for n in ("model_rpm_limit", "model_tpm_limit") if f.has(n)}
    metadata = f.mapping("metadata") if f.has("metadata") else None
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT metadata FROM {} WHERE team_id = %s FOR UPDATE").format(TEAM_TABLE),
            (team_id,),
        )
        existing = await cur.fetchone()
        if existing is None:
            raise _not_found(f"Team {team_id!r}", "team_id")
        if metadata is not None or limits:
            merged = dict(metadata if metadata is not None else existing["metadata"] or {})
            merged.update({k: v for k, v in limits.items() if v is not None})
            values["metadata"] = Jsonb(merged)
        values["updated_at"] = now
        await cur.execute(
            sql.SQL("UPDATE {} SET {} WHERE team_id = %s RETURNING *").format(
                TEAM_TABLE,
                sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in values
                ),
            ),
            [*values.values(), team_id],
        )
        row = await cur.fetchone()
    assert row is not None
    store.notified("t:" + team_id)
    return _ignored(f, "/team/update", Answer(200, {"team_id": team_id, "data": row_json(row)}))


async def delete_teams(store: KeyStore, body: dict[str, Any]) -> Answer:
    """LiteLLM's /team/delete: the teams and their keys, copied to LiteLLM's audit tables
    first; every team must exist, or nothing is deleted."""
    f = Fields(body)
    team_ids = f.strings("team_ids")
    if not team_ids:
        raise bad_request("team_ids: give the list of team ids to delete.", "team_ids")
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        keys = await _archive_keys(cur, "team_id", team_ids)
        teams = await _archive(
            cur,
            "LiteLLM_TeamTable",
            "LiteLLM_DeletedTeamTable",
            _ARCHIVED_TEAM_COLUMNS,
            "team_id",
            team_ids,
        )
        missing = sorted(set(team_ids) - {t["team_id"] for t in teams})
        if missing:
            raise GatewayError(
                404,
                f"team_ids: not found, nothing was deleted: {', '.join(missing)}",
                param="team_ids",
            )
        # As LiteLLM: the users' team lists no longer name them.
        await cur.execute(
            sql.SQL(
                "UPDATE {} SET teams = ARRAY(SELECT unnest(teams) EXCEPT SELECT unnest(%s::text[]))"
                " WHERE teams && %s::text[]"
            ).format(USER_TABLE),
            (team_ids, team_ids),
        )
    for team_id in team_ids:
        store.notified("t:" + team_id)
    for key in keys:
        store.notified("k:" + key["token"])
    return _ignored(
        f,
        "/team/delete",
        Answer(200, {"deleted_teams": team_ids, "deleted_keys": [k["token"] for k in keys]}),
    )


async def list_teams(store: KeyStore, query: dict[str, str]) -> Answer:
    """LiteLLM's /team/list: every team (or those of `user_id` / `organization_id`), each
    with its keys."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    if query.get("user_id"):
        where.append(
            sql.SQL(
                "(%s = ANY(members) OR team_id IN (SELECT unnest(teams) FROM {}"
                " WHERE user_id = %s))"
            ).format(USER_TABLE)
        )
        params += [query["user_id"], query["user_id"]]
    if query.get("organization_id"):
        where.append(sql.SQL("organization_id = %s"))
        params.append(query["organization_id"])
    condition = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
    async with _conn(store) as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT * FROM {}").format(TEAM_TABLE)
            + condition
            + sql.SQL(" ORDER BY created_at, team_id"),
            params,
        )
        teams = [row_json(r) for r in await cur.fetchall()]
        await cur.execute(
            sql.SQL("SELECT * FROM {} WHERE team_id = ANY(%s) ORDER BY created_at").format(
                KEY_TABLE
            ),
            ([t["team_id"] for t in teams],),
        )
        keys: dict[str, list[dict[str, Any]]] = {}
        for key in await cur.fetchall():
            keys.setdefault(key["team_id"], []).append(row_json(key))
    for team in teams:
        team["keys"] = keys.get(team["team_id"], [])
    return Answer(200, teams)


# LiteLLM's user roles (LitellmUserRoles).
USER_ROLES = frozenset(
    {
        "proxy_admin",
        "proxy_admin_viewer",
        "org_admin",
        "internal_user",
        "internal_user_viewer",
        "team",
        "customer",
    }
)
_USER_SCALARS = {
    "user_alias": Fields.string,
    "user_email": Fields.string,
    "organization_id": Fields.string,
    "max_budget": Fields.amount,
    "tpm_limit": Fields.count,
    "rpm_limit": Fields.count,
    "max_parallel_requests": Fields.count,
    "models": Fields.strings,
}
# Fields of /user/new that configure the key it makes (auto_create_key), not the user.
_USER_KEY_FIELDS = ("key_alias", "duration", "aliases", "config", "permissions")


async def new_user(store: KeyStore, body: dict[str, Any]) -> Answer:
    """LiteLLM's /user/new: a user row, added to its `teams`, and (unless auto_create_key
    is false) a key for it; one transaction."""
    f = Fields(body)
    user_id = f.string("user_id") or str(uuid.uuid4())
    role = f.string("user_role") or "internal_user"
    if role not in USER_ROLES:
        raise bad_request(
            f"user_role: must be one of {sorted(USER_ROLES)}, got {role!r}.", "user_role"
        )
    teams = f.strings("teams") or []
    team_id = f.string("team_id")
    if team_id and team_id not in teams:
        teams.append(team_id)
    now = _now()
    values: dict[str, Any] = {
        "user_id": user_id,
        "user_role": role,
        "teams": teams,
        "created_at": now,
        "updated_at": now,
    }
    for name, read in _USER_SCALARS.items():
        if f.has(name):
            values[name] = read(f, name)
    values.setdefault("models", [])
    values["metadata"] = Jsonb(f.mapping("metadata") or {})
    if f.has("budget_duration"):
        seconds = f.duration("budget_duration")
        values["budget_duration"] = body["budget_duration"]
        values["budget_reset_at"] = now + timedelta(seconds=seconds or 0)
    auto_key = f.boolean("auto_create_key")
    key_fields = Fields(
        {
            **{k: body[k] for k in _USER_KEY_FIELDS if body.get(k) is not None},
            "user_id": user_id,
            "models": values["models"],
            **({"team_id": team_id} if team_id else {}),
        }
    )
    raw = "sk-" + secrets.token_urlsafe(16)
    key_values, _ = _prepare_key(key_fields, raw) if auto_key is not False else ({}, None)
    f.used.update(k for k in _USER_KEY_FIELDS if k in f.body)
    f.used.add("send_invite_email")  # LLMux sends no e-mail; harmless to accept
    async with _conn(store) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        try:
            await _insert(cur, USER_TABLE, values)
        except psycopg.errors.UniqueViolation as exc:
            raise bad_request(
                f"user_id: user {user_id!r} already exists; use a different user_id.", "user_id"
            ) from exc
        user = await cur.fetchone()
        assert user is not None
        if teams:
            member = Jsonb([{"user_id": user_id, "role": "user"}])
            await cur.execute(
                sql.SQL(
                    "UPDATE {} SET members = array_append(members, %s), members_with_roles ="
                    " CASE WHEN jsonb_typeof(members_with_roles) = 'array'"
                    " THEN members_with_roles || %s ELSE %s END, updated_at = %s"
                    " WHERE team_id = ANY(%s) RETURNING team_id"
                ).format(TEAM_TABLE),
                (user_id, member, member, now, teams),
            )
            found = {r["team_id"] for r in await cur.fetchall()}
            missing = [t for t in teams if t not in found]
            if missing:
                raise bad_request(f"teams: no such team: {', '.join(missing)}.", "teams")
        out = row_json(user)
        if auto_key is not False:
            key = await _insert_key(cur, raw, key_values, None)
            out.update(
                key=raw,
                token=key["token_id"],
                token_id=key["token_id"],
                key_name=key["key_name"],
                key_alias=key["key_alias"],
                expires=key["expires"],
                team_id=team_id,
            )
    return _ignored(f, "/user/new", Answer(200, out))


async def user_info(store: KeyStore, query: dict[str, str]) -> Answer:
    user_id = query.get("user_id")
    if not user_id:
        raise bad_request("user_id: required, as ?user_id=.", "user_id")
    async with _conn(store) as conn, conn.cursor(row_factory=dict_row) as cur:
        user, keys = await _row_and_keys(cur, USER_TABLE, "user_id", user_id, "User")
        await cur.execute(
            sql.SQL(
                "SELECT * FROM {} WHERE team_id = ANY(%s) OR %s = ANY(members) ORDER BY team_id"
            ).format(TEAM_TABLE),
            (user["teams"] or [], user_id),
        )
        teams = [row_json(r) for r in await cur.fetchall()]
    return Answer(
        200, {"user_id": user_id, "user_info": row_json(user), "keys": keys, "teams": teams}
    )


async def _spend_logs(store: KeyStore, query: dict[str, str]) -> Answer:
    return Answer(200, await spend_api.spend_logs(store, query))


async def _spend_report(store: KeyStore, query: dict[str, str]) -> Answer:
    return Answer(200, await spend_api.global_spend_report(store, query))
