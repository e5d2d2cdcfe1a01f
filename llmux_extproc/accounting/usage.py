"""Token usage of one request, in the token kinds providers bill separately."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    # prompt_tokens includes cached_tokens and cache_write_tokens, as OpenAI reports it;
    # completion_tokens includes reasoning_tokens.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, object]:
        usage: dict[str, object] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens or self.cache_write_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage

    @classmethod
    def from_openai(cls, usage: dict[str, object] | None) -> Usage:
        if not isinstance(usage, dict):
            return cls()
        prompt_details = usage.get("prompt_tokens_details")
        completion_details = usage.get("completion_tokens_details")
        return cls(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            cached_tokens=_int(prompt_details.get("cached_tokens"))
            if isinstance(prompt_details, dict)
            else 0,
            reasoning_tokens=_int(completion_details.get("reasoning_tokens"))
            if isinstance(completion_details, dict)
            else 0,
        )


def _int(value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        # Counts that crossed protobuf (Envoy metadata) come back as doubles.
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
