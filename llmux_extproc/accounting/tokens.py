"""Offline token counting with tiktoken, from BPE files shipped in llmux_extproc/data.

tiktoken's registry downloads BPE files on first use, which fails without internet, so we
build the same Encoding objects as tiktoken_ext/openai_public.py from our own copies
(see scripts/refresh_data.py). Nothing is loaded at import: each encoding costs a few
hundred ms and tens of MB, so it is loaded once on first use, or by warm_up() in a
background thread at startup.

Counts for non-OpenAI models use cl100k_base and are estimates.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass
from importlib import resources

import tiktoken

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# Chat formatting overhead, from OpenAI's cookbook recipe for counting chat prompt tokens.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# We never fetch or decode images, so we cannot know their size: a low-detail image costs a
# flat 85 tokens; for high/auto detail we assume a 1024x1024 image (4 tiles * 170 + 85).
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 765


@dataclass(frozen=True, slots=True)
class _Spec:
    sha256: str  # tiktoken's expected_hash: catches a truncated or wrong file in the package
    pat_str: str
    special_tokens: dict[str, int]


# pat_str and special tokens copied from tiktoken_ext/openai_public.py (tiktoken 0.14).
_SPECS: dict[str, _Spec] = {
    "o200k_base": _Spec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
    "cl100k_base": _Spec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        special_tokens={
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        },
    ),
}

# After stripping any "provider/" prefix. gpt-oss uses o200k_harmony, which only adds special
# tokens to o200k_base, so ordinary text counts the same.
_O200K_PREFIXES = (
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "gpt-oss",
    "chatgpt-4o",
    "codex-",
    "o1",
    "o3",
    "o4",
    "ft:gpt-4o",
    "ft:gpt-4.1",
)

_encodings: dict[str, tiktoken.Encoding] = {}
# One lock per encoding, so a request needing o200k_base does not wait for warm_up() to finish
# loading cl100k_base.
_locks = {name: threading.Lock() for name in _SPECS}


def _read_bpe(name: str, spec: _Spec) -> dict[bytes, int]:
    data = (
        resources.files("llmux_extproc") / "data" / "tokenizers" / f"{name}.tiktoken"
    ).read_bytes()
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise RuntimeError(f"shipped {name}.tiktoken is corrupt; run scripts/refresh_data.py")
    # Same parse as tiktoken.load.load_tiktoken_bpe, which we avoid because, even for a local
    # path, it copies the file into a cache under /tmp and then reads that copy instead.
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding ("o200k_base" or "cl100k_base"), loaded on first use."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    spec = _SPECS[name]  # KeyError for encodings we do not ship
    with _locks[name]:
        enc = _encodings.get(name)
        if enc is None:
            enc = tiktoken.Encoding(
                name,
                pat_str=spec.pat_str,
                mergeable_ranks=_read_bpe(name, spec),
                special_tokens=spec.special_tokens,
            )
            _encodings[name] = enc
    return enc


def warm_up() -> None:
    """Load every shipped encoding; meant for a background thread at startup."""
    for name in _SPECS:
        get_encoding(name)


def encoding_name_for_model(model: str) -> str:
    base = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if base.startswith(_O200K_PREFIXES) else "cl100k_base"


def encoding_for_model(model: str) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for_model(model))


def _count(enc: tiktoken.Encoding, text: str) -> int:
    # encode_ordinary == encode(text, disallowed_special=()): "<|endoftext|>" in user text is
    # counted as plain text instead of raising.
    return len(enc.encode_ordinary(text))


def count_text(text: str, model: str) -> int:
    return _count(encoding_for_model(model), text)


def _count_part(enc: tiktoken.Encoding, part: object) -> int:
    if isinstance(part, str):
        return _count(enc, part)
    if not isinstance(part, dict):
        return 0
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, dict) else None
        return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH
    # text and refusal parts; audio and file parts are not counted (no way to estimate them).
    text = part.get("text", part.get("refusal"))
    return _count(enc, text) if isinstance(text, str) else 0


def _count_function(enc: tiktoken.Encoding, function: object) -> int:
    if not isinstance(function, dict):
        return 0
    parts = (function.get("name"), function.get("arguments"))
    return sum(_count(enc, p) for p in parts if isinstance(p, str))


def count_messages(messages: list[dict[str, object]], model: str) -> int:
    """Prompt tokens of a chat request, per OpenAI's cookbook recipe.

    Exact for OpenAI text-only chats; tool calls, images and non-OpenAI models are estimates.
    """
    enc = encoding_for_model(model)
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            # Like the cookbook, every string field counts (role, content, name, tool_call_id).
            if isinstance(value, str):
                total += _count(enc, value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                total += sum(_count_part(enc, part) for part in value)
            elif key == "tool_calls" and isinstance(value, list):
                total += sum(
                    _count_function(enc, call.get("function"))
                    for call in value
                    if isinstance(call, dict)
                )
            elif key == "function_call":  # deprecated single-call form
                total += _count_function(enc, value)
    return total
