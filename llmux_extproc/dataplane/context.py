"""The one request context: who is calling, which model group, which attempt.

Rebuilt for every attempt from what Envoy sends the upstream processor (the client's key
moved into metadata, the endpoint Envoy chose, the attempt number): an attempt may reach
another worker process than the one before, so nothing is kept between attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmux_extproc.control.config import Deployment
from llmux_extproc.policy.keys import Principal


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the master key (or no key, without one) is team `default`; a virtual
    key is its principal, as cached (team id, user, alias, allowed models, limits)."""

    team: str = "default"
    key_alias: str | None = None  # the key's alias or LiteLLM's `sk-...abcd` name, never the key
    user_id: str | None = None
    principal: Principal | None = None
    admin: bool = False  # the master key: may call the management API
    token: str | None = None  # the key's sha256 (LiteLLM's token): spend logs
    # A rate limit or budget applies (the key's, team's or user's): worked out once per
    # cached principal; asking the limiter cost 8 us even for a key with none.
    limited: bool = False

    @classmethod
    def of(cls, principal: Principal) -> Caller:
        return cls(
            principal.team_id or "default",
            principal.label,
            principal.user_id,
            principal,
            token=principal.token,
            limited=principal.limited,
        )


DEFAULT_CALLER = Caller()
MASTER_CALLER = Caller(admin=True)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a request, on the endpoint Envoy picked for it."""

    number: int  # 1 for the first try (Envoy's x-envoy-attempt-count)
    deployment: Deployment | None  # None: no group took the request (llmux_local)
    priority: int = 0  # 0: the requested group; n: its n-th fallback group

    @property
    def retries(self) -> int:
        return self.number - 1


@dataclass(frozen=True, slots=True)
class RequestContext:
    caller: Caller
    attempt: Attempt
    request_id: str = ""  # Envoy's x-request-id, the same for every attempt
