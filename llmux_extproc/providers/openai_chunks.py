"""The one writer of OpenAI `chat.completion.chunk` server-sent events.

Every stream translator (Anthropic, Gemini/Vertex, Bedrock, the mock) speaks through a
`ChunkWriter`, so the stream protocol OpenAI clients rely on holds by construction rather
than by each translator's care:

- each choice's first chunk carries `role: assistant`;
- each choice gets at most one `finish_reason` (a second one is dropped);
- the usage chunk (no choices) is the last one before `data: [DONE]`, and only when the
  client asked for it with `stream_options.include_usage`; chunks with choices then carry
  `"usage": null`, as OpenAI's do;
- an error event (`{"error": {...}}`, which OpenAI's SDKs raise on) is always followed by
  `data: [DONE]`, and no usage chunk is sent after an error;
- nothing at all is written after `data: [DONE]`.

Methods return the bytes to send (possibly empty), so translators stay free to batch them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from llmux_extproc.dataplane.sse import DONE, event
from llmux_extproc.errors import GatewayError

__all__ = ["DONE", "ChunkWriter"]


class ChunkWriter:
    """OpenAI chunks for one streamed completion; `id` and `model` may change until the
    first chunk is written (providers often name them in their first event)."""

    __slots__ = ("_closed", "_finished", "_started", "created", "id", "include_usage", "model")

    def __init__(
        self, id: str, model: str, created: int | None = None, *, include_usage: bool = False
    ) -> None:
        self.id = id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        self._started: set[int] = set()  # choices whose role chunk is out
        self._finished: set[int] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once `done` or `error` has written `data: [DONE]`."""
        return self._closed

    def started(self, index: int = 0) -> bool:
        return index in self._started

    def finished(self, index: int = 0) -> bool:
        return index in self._finished

    # -- choice chunks ---------------------------------------------------------------------

    def role(self, index: int = 0) -> bytes:
        """The role chunk (`{"role": "assistant", "content": ""}`), if not sent yet."""
        if index in self._started:
            return b""
        return self._choice(index, {"content": ""}, None)

    def content(self, text: str, index: int = 0) -> bytes:
        return self.delta({"content": text}, index) if text else b""

    def reasoning(self, text: str, index: int = 0) -> bytes:
        return self.delta({"reasoning_content": text}, index) if text else b""

    def tool_call_start(
        self, tool_index: int, call_id: Any, name: Any, index: int = 0, arguments: str = ""
    ) -> bytes:
        """A tool call's first delta: its OpenAI index, id, name (and arguments so far)."""
        call = {
            "index": tool_index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return self.delta({"tool_calls": [call]}, index)

    def tool_call_arguments(self, tool_index: int, fragment: str, index: int = 0) -> bytes:
        if not fragment:
            return b""
        call = {"index": tool_index, "function": {"arguments": fragment}}
        return self.delta({"tool_calls": [call]}, index)

    def delta(self, fields: Mapping[str, Any], index: int = 0) -> bytes:
        """Any other delta (thinking_blocks, several fields at once); the role goes first."""
        if not fields and index in self._started:
            return b""
        return self._choice(index, fields, None)

    def finish(self, reason: str, index: int = 0) -> bytes:
        """The choice's finish_reason; only the first one per choice is written."""
        if index in self._finished:
            return b""
        out = self._choice(index, {}, reason)
        if out:
            self._finished.add(index)
        return out

    # -- the end ---------------------------------------------------------------------------

    def done(self, usage: Mapping[str, Any] | None = None) -> bytes:
        """The usage chunk (when asked for and known), then `data: [DONE]`; once."""
        if self._closed:
            return b""
        self._closed = True
        if self.include_usage and usage is not None:
            return event({**self._envelope(), "choices": [], "usage": usage}) + DONE
        return DONE

    def error(self, err: GatewayError) -> bytes:
        """An OpenAI error event, then `data: [DONE]`; the stream is over."""
        if self._closed:
            return b""
        self._closed = True
        return b"data: " + err.body() + b"\n\n" + DONE

    # -- serialisation ---------------------------------------------------------------------

    def _choice(self, index: int, delta: Mapping[str, Any], reason: str | None) -> bytes:
        if self._closed:
            return b""
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        body = {
            **self._envelope(),
            "choices": [
                {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            ],
        }
        if self.include_usage:
            body["usage"] = None
        return event(body)

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
