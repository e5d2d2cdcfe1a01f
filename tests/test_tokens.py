"""Offline token counting: exact counts, same encodings as tiktoken, no network, lazy load."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.model

from llmux_extproc.accounting import tokens

ROOT = Path(__file__).resolve().parent.parent

# Computed once with tiktoken.get_encoding() fed the same BPE files through its own cache.
KNOWN_COUNTS = [
    ("o200k_base", "hello world", 2),
    ("cl100k_base", "hello world", 2),
    ("o200k_base", "Hello, world! How are you today?", 9),
    ("cl100k_base", "Hello, world! How are you today?", 9),
    ("o200k_base", "日本語のテキスト", 6),
    ("cl100k_base", "日本語のテキスト", 8),
    ("o200k_base", "def f(x):\n    return x**2\n", 10),
    ("cl100k_base", "  multiple   spaces\n\n\nnewlines", 7),
    # Special-token text is counted as plain text, not rejected and not as one special token.
    ("o200k_base", "<|endoftext|> is special", 9),
    ("cl100k_base", "<|endoftext|> is special", 9),
]

# OpenAI cookbook "How to count tokens with tiktoken": 129 for gpt-4 (cl100k_base), 124 for
# gpt-4o (o200k_base); the cookbook reports the API agreeing.
COOKBOOK_MESSAGES: list[dict[str, object]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more time to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(("name", "text", "expected"), KNOWN_COUNTS)
def test_known_counts(name: str, text: str, expected: int) -> None:
    assert len(tokens.get_encoding(name).encode_ordinary(text)) == expected


def test_count_text_uses_model_encoding() -> None:
    # This string tokenizes differently in the two encodings, so it detects a wrong mapping.
    assert tokens.count_text("日本語のテキスト", "gpt-4o") == 6
    assert tokens.count_text("日本語のテキスト", "gpt-4") == 8
    assert tokens.count_text("日本語のテキスト", "claude-sonnet-4-5") == 8


def test_lone_surrogate_does_not_raise() -> None:
    assert tokens.count_text("\ud800 lone", "gpt-4o") == 2


@pytest.mark.parametrize(
    "model",
    [
        *("gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "gpt-5", "o1", "o3-mini", "o4-mini"),
        *("chatgpt-4o-latest", "gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "text-embedding-3-small"),
    ],
)
def test_model_mapping_agrees_with_tiktoken(model: str) -> None:
    assert tokens.encoding_name_for_model(model) == tiktoken.model.encoding_name_for_model(model)


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("openai/gpt-4o", "o200k_base"),
        ("azure/gpt-5-mini", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("claude-sonnet-4-5", "cl100k_base"),
        ("gemini/gemini-2.5-pro", "cl100k_base"),
        ("some-unknown-model", "cl100k_base"),
    ],
)
def test_model_mapping_beyond_tiktoken(model: str, name: str) -> None:
    assert tokens.encoding_for_model(model).name == name


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_same_encoding_as_tiktoken(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = resources.files("llmux_extproc") / "data" / "tokenizers" / f"{name}.tiktoken"
    # "" disables tiktoken's /tmp cache, so this reads our file with tiktoken's own parser.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    # Run tiktoken's own constructor with the download replaced by the ranks we just read.
    # (Imported by name: tiktoken_ext is a namespace package without type information.)
    openai_public = importlib.import_module("tiktoken_ext.openai_public")
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks)
    reference = getattr(openai_public, name)()
    enc = tokens.get_encoding(name)
    assert enc._pat_str == reference["pat_str"]
    assert enc._special_tokens == reference["special_tokens"]
    assert enc._mergeable_ranks == reference["mergeable_ranks"]


def test_loading_makes_no_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(tokens, "_encodings", {})  # force a fresh load of both
    tokens.warm_up()
    assert set(tokens._encodings) == {"o200k_base", "cl100k_base"}
    assert tokens.count_text("hello world", "gpt-4o") == 2


def test_nothing_loaded_at_import() -> None:
    code = "import llmux_extproc.accounting.tokens as t; assert t._encodings == {}, t._encodings"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_concurrent_first_use_loads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    start = threading.Barrier(8)
    real_read = tokens._read_bpe

    def counting_read(name: str, spec: tokens._Spec) -> dict[bytes, int]:
        nonlocal calls
        calls += 1
        return real_read(name, spec)

    def first_use(_: int) -> tiktoken.Encoding:
        start.wait()
        return tokens.get_encoding("cl100k_base")

    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setattr(tokens, "_read_bpe", counting_read)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(first_use, range(8)))
    assert calls == 1
    assert all(r is results[0] for r in results)


def test_corrupt_file_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tokens._SPECS["cl100k_base"]
    monkeypatch.setitem(tokens._SPECS, "cl100k_base", tokens._Spec("0" * 64, spec.pat_str, {}))
    with pytest.raises(RuntimeError, match="corrupt"):
        tokens._read_bpe("cl100k_base", tokens._SPECS["cl100k_base"])


def test_cookbook_example() -> None:
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4o") == 124


def test_empty_messages_is_reply_priming() -> None:
    assert tokens.count_messages([], "gpt-4o") == 3


def test_content_parts_count_like_plain_text() -> None:
    plain: list[dict[str, object]] = [{"role": "user", "content": "hello world, how are you"}]
    parts: list[dict[str, object]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello world,"},
                {"type": "text", "text": " how are you"},
            ],
        }
    ]
    assert tokens.count_messages(parts, "gpt-4o") == tokens.count_messages(plain, "gpt-4o")


def test_images_use_fixed_estimate() -> None:
    def with_image(detail: str | None) -> list[dict[str, object]]:
        image: dict[str, object] = {"url": "https://example.invalid/cat.png"}
        if detail:
            image["detail"] = detail
        content: list[object] = [{"type": "text", "text": "what is this?"}]
        content.append({"type": "image_url", "image_url": image})
        return [{"role": "user", "content": content}]

    text_only: list[dict[str, object]] = [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}]}
    ]
    base = tokens.count_messages(text_only, "gpt-4o")
    assert tokens.count_messages(with_image("low"), "gpt-4o") == base + tokens.IMAGE_TOKENS_LOW
    assert tokens.count_messages(with_image(None), "gpt-4o") == base + tokens.IMAGE_TOKENS_HIGH
    assert tokens.count_messages(with_image("high"), "gpt-4o") == base + 765


def test_tool_calls_count_name_and_arguments() -> None:
    messages: list[dict[str, object]] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                "garbage",
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    count = tokens.get_encoding("o200k_base").encode_ordinary
    expected = 3 + 2 * 3  # priming + per-message overhead
    expected += len(count("assistant")) + len(count("get_weather"))
    expected += len(count('{"city": "Paris"}'))
    expected += len(count("tool")) + len(count("call_1")) + len(count("sunny"))
    assert tokens.count_messages(messages, "gpt-4o") == expected


def test_malformed_messages_do_not_raise() -> None:
    messages: list[dict[str, object]] = [
        {"role": "user", "content": [None, 3, {"type": "input_audio"}, "bare string"]},
        {"role": "assistant", "tool_calls": [{"function": {"name": 1, "arguments": {}}}]},
        {"role": "assistant", "function_call": ["not", "a", "dict"]},
    ]
    enc = tokens.get_encoding("o200k_base")
    expected = 3 + 3 * 3 + len(enc.encode_ordinary("bare string"))
    expected += len(enc.encode_ordinary("user")) + 2 * len(enc.encode_ordinary("assistant"))
    assert tokens.count_messages(messages, "gpt-4o") == expected
