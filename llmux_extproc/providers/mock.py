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

from llmux_extproc.accounting import tokens
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.providers.base import Adapter, ClientRequest
from llmux_extproc.providers.openai import client_wants_usage
from llmux_extproc.providers.openai_chunks import ChunkWriter

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment


class MockAdapter(Adapter):
    name = "mock"

    def answer(self, req: ClientRequest, dep: Deployment) -> tuple[bytes, Usage, str]:
        """The whole answer: body, usage and content type (SSE for `stream: true`)."""
        if req.operation == "embeddings":
            vectors, vector_usage = self._embeddings(req, dep)
            return vectors, vector_usage, "application/json"
        messages = req.body.get("messages") or []
        content = dep.params.get("mock_response")
        if not isinstance(content, str):
            content = f"This is a mock response from LLMux to: {_last_user_text(messages)[:200]}"
        usage = Usage(
            prompt_tokens=tokens.count_messages(messages, dep.model),
            completion_tokens=tokens.count_text(content, dep.model),
        )
        completion_id = f"chatcmpl-mock-{hashlib.sha256(req.raw).hexdigest()[:24]}"
        if req.stream:
            return _stream(completion_id, dep.model, content, usage, client_wants_usage(req.body))
        completion = {
            "id": completion_id,
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
        return orjson.dumps(completion), usage, "application/json"

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


def _stream(
    completion_id: str, model: str, content: str, usage: Usage, with_usage: bool
) -> tuple[bytes, Usage, str]:
    chunks = ChunkWriter(completion_id, model, include_usage=with_usage)
    words = content.split(" ")
    parts = [chunks.role()]
    parts += [chunks.content(w if i == 0 else " " + w) for i, w in enumerate(words)]
    parts.append(chunks.finish("stop"))
    parts.append(chunks.done(usage.to_openai()))
    return b"".join(parts), usage, "text/event-stream"


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
