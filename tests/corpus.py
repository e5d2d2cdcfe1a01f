"""OpenAI chat requests every provider is tested with, end to end and in unit tests.

Each case is the keyword arguments for `client.chat.completions.create` (minus `model`),
plus what the answer must show. Provider mocks answer by looking at the translated request:
a request that offers tools and whose last message is from the user gets a tool call back
(two, for `parallel`); anything else gets text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A 1x1 transparent PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class Case:
    name: str
    request: dict[str, Any]
    expect_tool_calls: int = 0
    expect_finish: str = "stop"
    # Providers that cannot honour the request answer 400 naming this parameter.
    unsupported_param: str | None = None
    tags: frozenset[str] = field(default_factory=frozenset)


CASES: list[Case] = [
    Case("plain", {"messages": [{"role": "user", "content": "Say hello"}]}),
    Case(
        "system",
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello"},
            ],
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 64,
            "stop": ["\n\n"],
        },
    ),
    Case(
        "developer",
        {
            "messages": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Say hello"},
            ],
            "max_completion_tokens": 50,
        },
    ),
    Case(
        "multi_turn",
        {
            "messages": [
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hello Ada."},
                {"role": "user", "content": "What is my name?"},
            ]
        },
    ),
    Case(
        "image",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/png;base64,{PNG_B64}"},
                        },
                    ],
                }
            ]
        },
        tags=frozenset({"image"}),
    ),
    Case(
        "tool_call",
        {
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "auto",
        },
        expect_tool_calls=1,
        expect_finish="tool_calls",
    ),
    Case(
        "parallel_tools",
        {
            "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "parallel_tool_calls": True,
        },
        expect_tool_calls=2,
        expect_finish="tool_calls",
        tags=frozenset({"parallel"}),
    ),
    Case(
        "tool_results",
        {
            "messages": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"city":"Paris"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
            ],
            "tools": [WEATHER_TOOL, TIME_TOOL],
        },
    ),
    Case(
        "json_object",
        {
            "messages": [{"role": "user", "content": "Give me a JSON object with key a."}],
            "response_format": {"type": "json_object"},
        },
        tags=frozenset({"json"}),
    ),
    Case(
        "json_schema",
        {
            "messages": [{"role": "user", "content": "Give me a person."}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "person",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"],
                        "additionalProperties": False,
                    },
                },
            },
        },
        tags=frozenset({"json"}),
    ),
    Case(
        "reasoning",
        {
            "messages": [{"role": "user", "content": "How many r in strawberry?"}],
            "reasoning_effort": "low",
            "max_completion_tokens": 4000,
        },
        tags=frozenset({"reasoning"}),
    ),
    Case(
        "sampling_extras",
        {
            "messages": [{"role": "user", "content": "Say hello"}],
            "seed": 7,
            "user": "user-42",
            "n": 1,
        },
    ),
    Case(
        "unsupported_param",
        {
            "messages": [{"role": "user", "content": "Say hello"}],
            "logit_bias": {"50256": -100},
        },
        unsupported_param="logit_bias",
    ),
]


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)
