"""Virtual keys: who a key belongs to (its principal), what it may call, and the per-worker
cache that answers both without I/O on the request path.

Keys are stored as LiteLLM stores them: the sha256 hex digest of the raw `sk-...` key in
`LiteLLM_VerificationToken.token` (LiteLLM's `hash_token`), so keys LiteLLM issued work here.
The cache maps that hash to an immutable `Principal`; a hit costs the hash and a dict
lookup. Filling and invalidating it is the key store's job (`db/keystore.py`); the rules
here are plain functions of the principal and a clock, tested without a database.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Final

from llmux_extproc.errors import GatewayError

# LiteLLM's special entries of a `models` list.
ALL_PROXY_MODELS = "all-proxy-models"
ALL_TEAM_MODELS = "all-team-models"


def hash_key(key: str) -> str:
    """LiteLLM's `hash_token`: the sha256 hex digest of the raw key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_name(key: str) -> str:
    """LiteLLM's abbreviated key (`key_name`): safe to show and log."""
    return f"sk-...{key[-4:]}"


@dataclass(frozen=True, slots=True)
class ModelScope:
    """The models a key, team or user may call, with LiteLLM's rules: an empty list (or
    `all-proxy-models`, or `*`) allows every model; entries are model names, access groups
    (`model_info.access_groups`) or `*` patterns (`openai/*`)."""

    everything: bool = True
    names: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, models: Iterable[str] | None, team: ModelScope | None = None) -> ModelScope:
        entries = [m for m in models or () if isinstance(m, str) and m]
        if not entries or ALL_PROXY_MODELS in entries or "*" in entries:
            return cls()
        if ALL_TEAM_MODELS in entries:
            # A key that may call "its team's models" has the team's scope (the team's own
            # check applies as well).
            return team if team is not None else cls()
        patterns = tuple(m for m in entries if "*" in m)
        return cls(False, frozenset(m for m in entries if "*" not in m), patterns)

    def allows(self, model: str, groups: frozenset[str] = frozenset()) -> bool:
        if self.everything or model in self.names:
            return True
        if groups and not groups.isdisjoint(self.names):
            return True
        return any(fnmatchcase(model, p) for p in self.patterns)

    def listed(self) -> list[str]:
        return sorted(self.names) + list(self.patterns)


ALL_MODELS: Final = ModelScope()


@dataclass(frozen=True, slots=True)
class Limits:
    """What LiteLLM's rows say one key, team or user may use; `policy/limits.py` and
    `policy/budgets.py` enforce them."""

    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    max_budget: float | None = None
    soft_budget: float | None = None
    budget_duration: str | None = None
    spend: float = 0.0
    budget_reset_at: float | None = None  # epoch seconds: the end of the budget's window
    model_rpm_limit: Mapping[str, int] = field(default_factory=dict)
    model_tpm_limit: Mapping[str, int] = field(default_factory=dict)

    @property
    def enforced(self) -> bool:
        """Whether anything here needs the limiter (policy/limits.py)."""
        return (
            self.rpm_limit is not None
            or self.tpm_limit is not None
            or self.max_parallel_requests is not None
            or self.max_budget is not None
            or self.soft_budget is not None
            or bool(self.model_rpm_limit)
            or bool(self.model_tpm_limit)
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a virtual key is: everything admission needs, read once from PostgreSQL."""

    token: str  # the hashed key
    key_name: str | None = None
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    team_alias: str | None = None
    budget_id: str | None = None
    models: ModelScope = ALL_MODELS
    team_models: ModelScope = ALL_MODELS
    blocked: bool = False
    team_blocked: bool = False
    expires: float | None = None  # epoch seconds
    limits: Limits = field(default_factory=Limits)
    team_limits: Limits | None = None
    user_limits: Limits | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # LiteLLM's key `aliases`: a model name the client sends -> the model group it means.
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def limited(self) -> bool:
        """Whether the key, its team or its user has a rate limit or budget."""
        return any(
            lim is not None and lim.enforced
            for lim in (self.limits, self.team_limits, self.user_limits)
        )

    @property
    def label(self) -> str:
        """What metrics and logs may name the key by: its alias, else LiteLLM's key name."""
        return self.key_alias or self.key_name or self.token[:12]

    def refusal(self, now: float) -> GatewayError | None:
        """Why this key may not be used at `now` (epoch seconds), if it may not."""
        if self.expires is not None and now >= self.expires:
            at = datetime.fromtimestamp(self.expires, UTC).isoformat()
            return GatewayError(
                401, f"Authentication Error - Expired Key. Key expired at {at}.", code="expired_key"
            )
        if self.blocked:
            return GatewayError(
                401, "Authentication Error - this key is blocked.", code="key_blocked"
            )
        if self.team_blocked:
            return GatewayError(
                401,
                f"Authentication Error - team {self.team_id!r} is blocked.",
                code="team_blocked",
            )
        return None

    def model_refusal(self, model: str, groups: frozenset[str]) -> GatewayError | None:
        """Why this key may not call `model` (a model group; `groups` its access groups)."""
        if not self.models.allows(model, groups):
            return GatewayError(
                403,
                f"This key may not call model {model!r}; it may call: "
                f"{', '.join(self.models.listed())}.",
                type="key_model_access_denied",
                param="model",
            )
        if not self.team_models.allows(model, groups):
            return GatewayError(
                403,
                f"Team {self.team_id!r} may not call model {model!r}; it may call: "
                f"{', '.join(self.team_models.listed())}.",
                type="team_model_access_denied",
                param="model",
            )
        return None


class Missing:
    __slots__ = ()


MISSING: Final = Missing()


class KeyCache:
    """Hashed key → principal, plus hashes recently found in no row (so a client retrying a
    wrong key does not cost a query each time). Plain dicts: one per worker process, used
    from its event loop only."""

    def __init__(
        self,
        unknown_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_unknown: int = 10_000,
    ) -> None:
        self._known: dict[str, Principal] = {}
        self._unknown: dict[str, float] = {}  # hash -> until (clock)
        self._unknown_ttl = unknown_ttl_s
        self._clock = clock
        self._max_unknown = max_unknown

    def __len__(self) -> int:
        return len(self._known)

    def get(self, token: str) -> Principal | Missing | None:
        """The principal, None for a hash known to be no key, MISSING to ask the database."""
        found = self._known.get(token)
        if found is not None:
            return found
        until = self._unknown.get(token)
        if until is not None:
            if self._clock() < until:
                return None
            del self._unknown[token]
        return MISSING

    def put(self, token: str, principal: Principal | None) -> None:
        if principal is not None:
            self._known[token] = principal
            self._unknown.pop(token, None)
            return
        self._known.pop(token, None)
        if len(self._unknown) >= self._max_unknown:
            # Random wrong keys must not grow memory without bound; forgetting them only
            # costs a query for the next one.
            self._unknown.clear()
        self._unknown[token] = self._clock() + self._unknown_ttl

    def drop(self, token: str) -> None:
        self._known.pop(token, None)
        self._unknown.pop(token, None)

    def drop_where(self, matches: Callable[[Principal], bool]) -> int:
        gone = [t for t, p in self._known.items() if matches(p)]
        for token in gone:
            del self._known[token]
        return len(gone)

    def clear(self) -> None:
        self._known.clear()
        self._unknown.clear()

    def tokens(self) -> list[str]:
        return list(self._known)

    def refreshed(self, checked: Iterable[str], found: Mapping[str, Principal]) -> None:
        """The database's answer for `checked` hashes: rows found replace the cached
        principals, hashes without a row (deleted keys) are dropped."""
        for token in checked:
            principal = found.get(token)
            if principal is None:
                self._known.pop(token, None)
            elif token in self._known:
                self._known[token] = principal


def principal_refusal(principal: Principal | None) -> GatewayError | None:
    """The 401 for a key that resolved to no principal or to one that may not be used now."""
    if principal is None:
        return GatewayError(401, "Invalid API key.", code="invalid_api_key")
    return principal.refusal(time.time())
