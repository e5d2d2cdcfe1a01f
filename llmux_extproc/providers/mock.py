"""The built-in mock provider: answers inside LLMux, offline, deterministically.

It exists so `make run` serves real completions with no keys and no network. Token counts
are real tiktoken counts of the prompt and of the answer, so accounting and metrics show
honest figures. `litellm_params.mock_response` fixes the answer, as in LiteLLM.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import orjson

from llmux_extproc import tokens
from llmux_extproc.providers.base import Adapter, ClientRequest
from llmux_extproc.usage import Usage

if TYPE_CHECKING:
    from llmux_extproc.config import Deployment


class MockAdapter(Adapter):
    name = "mock"

    def answer(self, req: ClientRequest, dep: Deployment) -> tuple[bytes, Usage]:
        if req.operation == "embeddings":
            return self._embeddings(req, dep)
        messages = req.body.get("messages") or []
        content = dep.params.get("mock_response")
        if not isinstance(content, str):
            content = f"This is a mock response from LLMux to: {_last_user_text(messages)[:200]}"
        usage = Usage(
            prompt_tokens=tokens.count_messages(messages, dep.model),
            completion_tokens=tokens.count_text(content, dep.model),
        )
        digest = hashlib.sha256(req.raw).hexdigest()[:24]
        body = {
            "id": f"chatcmpl-mock-{digest}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": dep.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage.to_openai(),
            "system_fingerprint": "llmux-mock",
        }
        return orjson.dumps(body), usage

    def _embeddings(self, req: ClientRequest, dep: Deployment) -> tuple[bytes, Usage]:
        raw_input = req.body.get("input")
        inputs = raw_input if isinstance(raw_input, list) else [raw_input]
        dims = req.body.get("dimensions")
        size = dims if isinstance(dims, int) and 0 < dims <= 4096 else 8
        data = []
        prompt_tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            prompt_tokens += tokens.count_text(text, dep.model)
            seed = hashlib.sha256(text.encode()).digest()
            vector = [(seed[j % len(seed)] - 128) / 128 for j in range(size)]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        usage = Usage(prompt_tokens=prompt_tokens)
        body = {
            "object": "list",
            "data": data,
            "model": dep.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return orjson.dumps(body), usage


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    part.get("text", "")
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                )
    return ""


ADAPTER = MockAdapter()
