"""Virtual-key rules without a database: hashing as LiteLLM hashes, model scopes with
LiteLLM's semantics, refusals, and the cache's bookkeeping (a fake clock)."""

from __future__ import annotations

import hashlib

from llmux_extproc.policy.keys import (
    MISSING,
    KeyCache,
    ModelScope,
    Principal,
    hash_key,
    key_name,
    principal_refusal,
)


def test_hash_is_litellm_s() -> None:
    # LiteLLM's hash_token: sha256 hex of the raw key, what LiteLLM_VerificationToken.token holds.
    key = "sk-QWrxEynunsNpV1zT48HIrw"
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(hash_key(key)) == 64
    assert key_name(key) == "sk-...HIrw"


def test_empty_or_special_model_lists_allow_everything() -> None:
    for models in (None, [], ["all-proxy-models"], ["*"], ["gpt-4o", "all-proxy-models"]):
        assert ModelScope.parse(models).allows("anything"), models


def test_listed_models_patterns_and_access_groups() -> None:
    scope = ModelScope.parse(["gpt-4o", "openai/*", "beta-group"])
    assert scope.allows("gpt-4o")
    assert scope.allows("openai/gpt-4.1")
    assert not scope.allows("claude")
    assert scope.allows("claude", frozenset({"beta-group"}))  # model_info.access_groups
    assert not scope.allows("claude", frozenset({"other-group"}))


def test_all_team_models_takes_the_team_s_scope() -> None:
    team = ModelScope.parse(["llama"])
    key = ModelScope.parse(["all-team-models"], team)
    assert key.allows("llama") and not key.allows("gpt-4o")


def test_key_and_team_scopes_both_apply() -> None:
    p = Principal(
        token="t",
        team_id="team-a",
        models=ModelScope.parse(["gpt-4o", "llama"]),
        team_models=ModelScope.parse(["llama"]),
    )
    assert p.model_refusal("llama", frozenset()) is None
    key_denied = p.model_refusal("claude", frozenset())
    assert key_denied is not None and key_denied.status == 403
    assert key_denied.type == "key_model_access_denied" and key_denied.param == "model"
    team_denied = p.model_refusal("gpt-4o", frozenset())
    assert team_denied is not None and team_denied.type == "team_model_access_denied"
    assert "team-a" in team_denied.message


def test_refusals_for_unknown_expired_and_blocked_keys() -> None:
    unknown = principal_refusal(None)
    assert unknown is not None and (unknown.status, unknown.code) == (401, "invalid_api_key")
    assert Principal(token="t", expires=1000.0).refusal(999.0) is None
    expired = Principal(token="t", expires=1000.0).refusal(1000.0)
    assert expired is not None and (expired.status, expired.code) == (401, "expired_key")
    blocked = Principal(token="t", blocked=True).refusal(0)
    assert blocked is not None and (blocked.status, blocked.code) == (401, "key_blocked")
    team = Principal(token="t", team_id="x", team_blocked=True).refusal(0)
    assert team is not None and (team.status, team.code) == (401, "team_blocked")


def test_label_never_shows_the_key() -> None:
    assert Principal(token="f" * 64, key_alias="ci").label == "ci"
    assert Principal(token="f" * 64, key_name="sk-...abcd").label == "sk-...abcd"
    assert Principal(token="f" * 64).label == "f" * 12


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_remembers_unknown_hashes_for_a_while() -> None:
    clock = Clock()
    cache = KeyCache(unknown_ttl_s=10, clock=clock)
    assert cache.get("h") is MISSING
    cache.put("h", None)
    assert cache.get("h") is None
    clock.now = 10.0
    assert cache.get("h") is MISSING  # asked again after the bound


def test_cache_drops_by_key_team_and_refresh() -> None:
    cache = KeyCache(unknown_ttl_s=10, clock=Clock())
    a = Principal(token="a", team_id="t1")
    b = Principal(token="b", team_id="t2")
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a
    assert cache.drop_where(lambda p: p.team_id == "t1") == 1
    assert cache.get("a") is MISSING and cache.get("b") is b
    cache.put("a", a)
    newer = Principal(token="a", team_id="t1", blocked=True)
    # A re-read: a is updated, b's row is gone (deleted key), c was not cached: not added.
    cache.refreshed(["a", "b"], {"a": newer, "c": Principal(token="c")})
    assert cache.get("a") is newer
    assert cache.get("b") is MISSING
    assert cache.get("c") is MISSING
    cache.put("x", None)
    cache.drop("x")  # a key created since (INSERT notification)
    assert cache.get("x") is MISSING


def test_unknown_hashes_are_bounded() -> None:
    cache = KeyCache(unknown_ttl_s=10, clock=Clock(), max_unknown=3)
    for i in range(3):
        cache.put(f"bad{i}", None)
    cache.put("bad3", None)
    assert cache.get("bad0") is MISSING and cache.get("bad3") is None
