"""The one request context: who is calling, which model group, which attempt.

Rebuilt for every attempt from what Envoy sends the upstream processor (the client's key
moved into metadata, the endpoint Envoy chose, the attempt number): an attempt may reach
another worker process than the one before, so nothing is kept between attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmux_extproc.control.config import Deployment


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling. Until virtual keys bring more, every caller is team `default`."""

    team: str = "default"
    key_alias: str | None = None


DEFAULT_CALLER = Caller()


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
