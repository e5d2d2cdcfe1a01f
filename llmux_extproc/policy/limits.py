"""Rate limits (RPM, TPM, max parallel) and budget reservations: admission and settlement.

One request is admitted once (its first attempt) by one atomic step that checks every
bucket of the request, takes from all of them or from none, and records a *reservation*
(the TPM estimate, the in-flight place, the estimated cost) under the request id; its
answer settles the reservation once (real tokens and cost replace the estimate). A
reservation whose settlement never comes (worker killed, Envoy's own failure nobody
reports) expires after its ttl: its place and its reserved cost are given back, its
estimated tokens stay charged.

The rules live here once, as plain Python over a `State` (dicts in tests, with a fake
clock; SQLite under an flock for the workers of one replica), and once more as a Lua
script for Redis (`redis_limits.py`), which runs atomically there so N replicas admit
exactly what one would. docs/architecture.md, "Keys, limits and budgets", has the design.

Buckets are token buckets (the seed): capacity = the per-minute limit, refilled at
limit/60 per second. A request needs one request token; TPM needs a positive balance
(LiteLLM refuses once usage reached the limit) and takes the estimate, so a prompt
larger than the limit can still run on a full bucket and drives it negative: the next
requests wait for the refill. Budgets admit while spend + reserved in flight is below
`max_budget` (LiteLLM refuses at spend >= max_budget): concurrent requests overspend by
at most what is in flight at the last admission.
"""

from __future__ import annotations

import fcntl
import heapq
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

Kind = Literal["requests", "tokens", "parallel"]
# A worker killed mid-request must not hold a place for ever; an answer longer than
# this (route timeout + margin, set from the config) frees its place early at worst.
DEFAULT_TTL_S = 660.0


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket of a request: `key` names it in the store, `name` and `param` in errors
    (`param` is LiteLLM's field: rpm_limit, tpm_limit, max_parallel_requests, ...)."""

    key: str
    kind: Kind
    limit: int
    name: str
    param: str


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget window of a key, team or user. `spend` is the spend PostgreSQL had for
    this window when the principal was read (the key cache)."""

    key: str
    max_budget: float | None
    soft_budget: float | None
    spend: float
    name: str
    param: str = "max_budget"


@dataclass(frozen=True, slots=True)
class Ask:
    id: str
    limits: tuple[Limit, ...] = ()
    budgets: tuple[Budget, ...] = ()
    tokens: int = 0  # the TPM estimate
    cost: float = 0.0  # the budget estimate, USD
    ttl_s: float = DEFAULT_TTL_S

    @property
    def empty(self) -> bool:
        return not self.limits and not self.budgets


@dataclass(frozen=True, slots=True)
class Headroom:
    """What a bucket has left after this request: for the x-ratelimit-* headers."""

    limit: Limit
    remaining: float
    reset_s: float  # until the bucket is full again


@dataclass(slots=True)
class Decision:
    admitted: bool
    refused: Limit | Budget | None = None
    retry_after_s: float = 0.0
    headroom: list[Headroom] = field(default_factory=list)
    spent: float = 0.0  # of the refused budget: spend + reserved


@dataclass(frozen=True, slots=True)
class Settled:
    """Each budget's spend (persisted + settled since) after a settlement; empty when the
    reservation was already settled or had expired."""

    found: bool
    spend: dict[str, float] = field(default_factory=dict)
    soft: dict[str, float] = field(default_factory=dict)  # soft_budget per budget key


class State(Protocol):
    def bucket(self, key: str) -> tuple[float, float] | None: ...
    def set_bucket(self, key: str, tokens: float, stamp: float) -> None: ...
    def count(self, key: str) -> int: ...
    def add_count(self, key: str, delta: int) -> None: ...
    def budget(self, key: str) -> tuple[float, float, float] | None: ...
    def set_budget(self, key: str, base: float, delta: float, reserved: float) -> None: ...
    def put_reservation(self, rid: str, expires: float, record: dict[str, object]) -> None: ...
    def take_reservation(self, rid: str) -> dict[str, object] | None: ...
    def take_expired(self, now: float) -> list[dict[str, object]]: ...


def refill(limit: int, tokens: float, stamp: float, now: float) -> float:
    return min(float(limit), tokens + max(0.0, now - stamp) * limit / 60.0)


def _release(
    state: State, record: dict[str, object], tokens: int | None, cost: float | None, now: float
) -> dict[str, float]:
    """Give back what a reservation holds; with `tokens`/`cost` (a settlement) the estimate
    is replaced by the real figures, without (expiry) the estimate of tokens stays taken."""
    for key in _strs(record.get("p")):
        state.add_count(key, -1)
    if tokens is not None:
        estimate = float(record.get("t") or 0)  # type: ignore[arg-type]
        for entry in _pairs(record.get("k")):
            key, cap = entry
            found = state.bucket(key)
            if found is not None:
                level = refill(cap, *found, now)
                state.set_bucket(key, min(float(cap), level + estimate - tokens), now)
    spend: dict[str, float] = {}
    reserved_cost = float(record.get("c") or 0.0)  # type: ignore[arg-type]
    for key in [k for k, _ in _pairs(record.get("b"), float)]:
        found_b = state.budget(key)
        if found_b is None:
            continue
        base, delta, reserved = found_b
        reserved = max(0.0, reserved - reserved_cost)
        if cost is not None:
            delta += cost
        state.set_budget(key, base, delta, reserved)
        spend[key] = base + delta
    return spend


def _strs(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _pairs(value: object, of: Callable[[Any], Any] = int) -> list[tuple[str, Any]]:
    if not isinstance(value, list):
        return []
    return [(str(v[0]), of(v[1])) for v in value if isinstance(v, list) and len(v) == 2]


def admit(state: State, ask: Ask, now: float) -> Decision:
    """Check every bucket and budget of `ask`; take from all of them or none."""
    for expired in state.take_expired(now):
        _release(state, expired, None, None, now)
    levels: list[tuple[Limit, float]] = []
    for lim in ask.limits:
        if lim.kind == "parallel":
            used = state.count(lim.key)
            if used >= lim.limit:
                return refused_by(lim, 0.0)
            levels.append((lim, float(lim.limit - used)))
            continue
        found = state.bucket(lim.key)
        level = float(lim.limit) if found is None else refill(lim.limit, *found, now)
        if level < 1.0:
            return refused_by(lim, level)
        levels.append((lim, level))
    budgets: list[tuple[Budget, float, float, float]] = []
    for bud in ask.budgets:  # a soft_budget alone is tracked, never refused
        base, delta, reserved = state.budget(bud.key) or (bud.spend, 0.0, 0.0)
        if bud.spend > base:  # PostgreSQL caught up with (some of) what was settled here
            delta = max(0.0, delta - (bud.spend - base))
            base = bud.spend
        total = base + delta + reserved
        if bud.max_budget is not None and total >= bud.max_budget:
            return Decision(False, bud, 0.0, spent=total)
        budgets.append((bud, base, delta, reserved))
    headroom: list[Headroom] = []
    for lim, level in levels:
        if lim.kind == "parallel":
            state.add_count(lim.key, 1)
            headroom.append(Headroom(lim, level - 1, 0.0))
            continue
        level -= 1.0 if lim.kind == "requests" else ask.tokens
        state.set_bucket(lim.key, level, now)
        headroom.append(Headroom(lim, level, (lim.limit - level) * 60.0 / max(lim.limit, 1)))
    for bud, base, delta, reserved in budgets:
        state.set_budget(bud.key, base, delta, reserved + ask.cost)
    record: dict[str, object] = {
        "t": ask.tokens,
        "c": ask.cost,
        "k": [[lim.key, lim.limit] for lim in ask.limits if lim.kind == "tokens"],
        "p": [lim.key for lim in ask.limits if lim.kind == "parallel"],
        # soft_budget travels with the reservation: the settling worker (the access log's)
        # may not have the principal.
        "b": [
            [bud.key, -1.0 if bud.soft_budget is None else bud.soft_budget] for bud, *_ in budgets
        ],
    }
    state.put_reservation(ask.id, now + ask.ttl_s, record)
    return Decision(True, headroom=headroom)


def refused_by(lim: Limit, level: float) -> Decision:
    """A refusal by `lim` at `level`: retry once one token is back (a parallel place: in
    a second, the answers' length being unknown); the headers show the empty bucket."""
    per_token = 60.0 / max(lim.limit, 1)
    if lim.kind == "parallel":
        return Decision(False, lim, 1.0, [Headroom(lim, 0.0, 0.0)])
    head = Headroom(lim, level, (lim.limit - level) * per_token)
    return Decision(False, lim, (1.0 - level) * per_token, [head])


def peek(state: State, limits: tuple[Limit, ...], now: float) -> list[Headroom]:
    """What the buckets have left, taking nothing: the headers of a retry's answer (the
    first attempt admitted the request)."""
    head: list[Headroom] = []
    for lim in limits:
        if lim.kind == "parallel":
            continue
        found = state.bucket(lim.key)
        level = float(lim.limit) if found is None else refill(lim.limit, *found, now)
        head.append(Headroom(lim, level, (lim.limit - level) * 60.0 / max(lim.limit, 1)))
    return head


def settle(state: State, rid: str, tokens: int, cost: float, now: float) -> Settled:
    """Replace the reservation of request `rid` by its real tokens and cost, once."""
    record = state.take_reservation(rid)
    if record is None:
        return Settled(False)
    soft = {k: v for k, v in _pairs(record.get("b"), float) if v >= 0}
    return Settled(True, _release(state, record, tokens, cost, now), soft)


class MemoryState:
    """The state as dicts: one process (tests, and `llmux extproc` run alone)."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}
        self.counts: dict[str, int] = {}
        self.budgets: dict[str, tuple[float, float, float]] = {}
        self.reservations: dict[str, tuple[float, dict[str, object]]] = {}
        # (expiry, id), oldest first: every admission looks for expired reservations, and
        # scanning them all made admission O(requests in flight).
        self._expiries: list[tuple[float, str]] = []

    def bucket(self, key: str) -> tuple[float, float] | None:
        return self.buckets.get(key)

    def set_bucket(self, key: str, tokens: float, stamp: float) -> None:
        self.buckets[key] = (tokens, stamp)

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)

    def add_count(self, key: str, delta: int) -> None:
        self.counts[key] = max(0, self.counts.get(key, 0) + delta)

    def budget(self, key: str) -> tuple[float, float, float] | None:
        return self.budgets.get(key)

    def set_budget(self, key: str, base: float, delta: float, reserved: float) -> None:
        self.budgets[key] = (base, delta, reserved)

    def put_reservation(self, rid: str, expires: float, record: dict[str, object]) -> None:
        self.reservations[rid] = (expires, record)
        heapq.heappush(self._expiries, (expires, rid))
        if len(self._expiries) > 2 * len(self.reservations) + 64:
            # Settled reservations leave their entries behind: drop them now and then, so
            # the heap stays within twice what is in flight.
            self._expiries = [(exp, r) for r, (exp, _) in self.reservations.items()]
            heapq.heapify(self._expiries)

    def take_reservation(self, rid: str) -> dict[str, object] | None:
        found = self.reservations.pop(rid, None)
        return None if found is None else found[1]

    def take_expired(self, now: float) -> list[dict[str, object]]:
        gone: list[dict[str, object]] = []
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expires, rid = heapq.heappop(expiries)
            found = self.reservations.get(rid)
            if found is not None and found[0] == expires:  # not settled, not re-reserved
                del self.reservations[rid]
                gone.append(found[1])
        return gone


_SCHEMA = """
CREATE TABLE IF NOT EXISTS bucket (key TEXT PRIMARY KEY, tokens REAL, stamp REAL);
CREATE TABLE IF NOT EXISTS counter (key TEXT PRIMARY KEY, n INTEGER);
CREATE TABLE IF NOT EXISTS budget (key TEXT PRIMARY KEY, base REAL, delta REAL, reserved REAL);
CREATE TABLE IF NOT EXISTS reservation (id TEXT PRIMARY KEY, expires REAL, record BLOB);
CREATE INDEX IF NOT EXISTS reservation_expires ON reservation (expires);
"""


class SharedState:
    """The state of one replica's workers: a SQLite file in the runtime directory, each
    admission or settlement one transaction under an exclusive `flock` (as the bulkhead:
    the flock wakes a waiting worker at once, SQLite's busy handler would sleep). No
    fsync: the state is worth nothing after a restart of the replica."""

    def __init__(self, path: Path) -> None:
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        with self._locked():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.executescript(_SCHEMA)

    def _locked(self) -> _Lock:
        return _Lock(self._lock_fd)

    def run(self, step: Callable[[State], object]) -> object:
        with self._locked():
            self._db.execute("BEGIN")
            try:
                result = step(self)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def bucket(self, key: str) -> tuple[float, float] | None:
        row = self._db.execute("SELECT tokens, stamp FROM bucket WHERE key=?", (key,)).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    def set_bucket(self, key: str, tokens: float, stamp: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO bucket VALUES (?,?,?)", (key, tokens, stamp))

    def count(self, key: str) -> int:
        row = self._db.execute("SELECT n FROM counter WHERE key=?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def add_count(self, key: str, delta: int) -> None:
        self._db.execute(
            "INSERT INTO counter VALUES (?, max(0, ?)) "
            "ON CONFLICT(key) DO UPDATE SET n = max(0, n + ?)",
            (key, delta, delta),
        )

    def budget(self, key: str) -> tuple[float, float, float] | None:
        row = self._db.execute(
            "SELECT base, delta, reserved FROM budget WHERE key=?", (key,)
        ).fetchone()
        return None if row is None else (float(row[0]), float(row[1]), float(row[2]))

    def set_budget(self, key: str, base: float, delta: float, reserved: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO budget VALUES (?,?,?,?)", (key, base, delta, reserved)
        )

    def put_reservation(self, rid: str, expires: float, record: dict[str, object]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO reservation VALUES (?,?,?)",
            (rid, expires, orjson.dumps(record)),
        )

    def take_reservation(self, rid: str) -> dict[str, object] | None:
        row = self._db.execute(
            "DELETE FROM reservation WHERE id=? RETURNING record", (rid,)
        ).fetchone()
        return None if row is None else _record(row[0])

    def take_expired(self, now: float) -> list[dict[str, object]]:
        rows = self._db.execute(
            "DELETE FROM reservation WHERE expires <= ? RETURNING record", (now,)
        ).fetchall()
        return [_record(r[0]) for r in rows]


def _record(raw: bytes) -> dict[str, object]:
    value = orjson.loads(raw)
    return value if isinstance(value, dict) else {}


class _Lock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class Limiter(Protocol):
    async def admit(self, ask: Ask) -> Decision: ...
    async def settle(self, rid: str, tokens: int, cost: float) -> Settled: ...
    async def peek(self, limits: tuple[Limit, ...]) -> list[Headroom]: ...


class LocalLimiter:
    """Admission against one replica's state: dicts, or the workers' shared file."""

    def __init__(
        self, state: MemoryState | SharedState, clock: Callable[[], float] = time.time
    ) -> None:
        self.state = state
        self.clock = clock

    def admit_now(self, ask: Ask) -> Decision:
        state = self.state
        if isinstance(state, SharedState):
            result = state.run(lambda s: admit(s, ask, self.clock()))
            assert isinstance(result, Decision)
            return result
        return admit(state, ask, self.clock())

    def settle_now(self, rid: str, tokens: int, cost: float) -> Settled:
        state = self.state
        if isinstance(state, SharedState):
            result = state.run(lambda s: settle(s, rid, tokens, cost, self.clock()))
            assert isinstance(result, Settled)
            return result
        return settle(state, rid, tokens, cost, self.clock())

    def peek_now(self, limits: tuple[Limit, ...]) -> list[Headroom]:
        state = self.state
        if isinstance(state, SharedState):
            result = state.run(lambda s: peek(s, limits, self.clock()))
            assert isinstance(result, list)
            return result
        return peek(state, limits, self.clock())

    async def peek(self, limits: tuple[Limit, ...]) -> list[Headroom]:
        return self.peek_now(limits)

    async def admit(self, ask: Ask) -> Decision:
        return self.admit_now(ask)

    async def settle(self, rid: str, tokens: int, cost: float) -> Settled:
        return self.settle_now(rid, tokens, cost)


# -- the x-ratelimit-* headers ----------------------------------------------------------


def ratelimit_headers(headroom: Iterable[Headroom]) -> dict[str, str]:
    """LiteLLM's (and OpenAI's) rate-limit headers from the tightest bucket of each kind:
    limit, remaining (floored; TPM can be negative after a large prompt, shown as 0) and
    reset, the seconds until the bucket is full again (LiteLLM documents an int)."""
    tightest: dict[str, Headroom] = {}
    for h in headroom:
        kind = "requests" if h.limit.kind in ("requests", "parallel") else "tokens"
        if h.limit.kind == "parallel":
            continue  # a concurrency cap is no per-minute quota
        best = tightest.get(kind)
        if best is None or h.remaining < best.remaining:
            tightest[kind] = h
    headers: dict[str, str] = {}
    for kind, h in tightest.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(h.limit.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(h.remaining)))
        headers[f"x-ratelimit-reset-{kind}"] = str(max(0, math.ceil(h.reset_s)))
    return headers
