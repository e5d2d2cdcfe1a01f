"""The `x-llmux-marks` header format, shared by the processor (extproc.py, which sends it)
and gateway.py (which pre-encodes the caller's part once per key)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote

_NUMBER = (int, float)


@lru_cache(maxsize=4096)
def _quoted(value: str) -> str:
    # The strings are model, deployment and provider names, a small set: quote() was a
    # third of this function's cost on every answer.
    return quote(value, safe="")


class Encoded(str):
    """Marks already encoded: `encode_marks` passes them on as they are."""

    __slots__ = ()


def encode_marks(fields: Mapping[str, Any]) -> str:
    """The marks header response.lua turns into `llmux` dynamic metadata: `key=<t><value>`
    pairs joined by `;`, t = b(ool), n(umber) or s(tring, percent-encoded)."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, bool):
            parts.append(f"{key}=b{int(value)}")
        elif isinstance(value, _NUMBER):
            parts.append(f"{key}=n{value!r}")
        elif isinstance(value, Encoded):
            if value:
                parts.append(value)
        elif isinstance(value, str):
            parts.append(f"{key}=s{_quoted(value)}")
    return ";".join(parts)
