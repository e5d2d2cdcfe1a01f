"""The redaction layer (issue 10, item 5): keys, tokens and personal data masked in every
line LLMux writes, and nothing else touched."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from llmux_extproc.observability.redact import MASK, RedactingFormatter, redact

SECRETS = {
    "openai key": "sk-proj-Abc123def456GHI789jkl012MNO345",
    "legacy openai key": "sk-abcdefghijklmnopqrstuvwxyz012345",
    "anthropic key": "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789_-AB",
    "google api key": "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    "google oauth token": "ya29.a0AfH6SMBxabcdefghijklmnopqrstuvwxyz0123",
    "aws access key id": "AKIAIOSFODNN7EXAMPLE",
    "aws session key id": "ASIAIOSFODNN7EXAMPLE",
    "email": "jane.doe+llm@example.co.uk",
    "visa": "4111 1111 1111 1111",
    "visa, no spaces": "4111111111111111",
    "mastercard, dashes": "5500-0000-0000-0004",
    "phone, international": "+1 415 555 0100",
    "phone, e164": "+14155550100",
    "phone, area code": "(415) 555-0100",
    "phone, dashes": "415-555-0100",
    "phone, uk": "+44 20 7946 0958",
}


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_each_kind_is_masked_wherever_it_stands(kind: str) -> None:
    secret = SECRETS[kind]
    for line in (secret, f"x {secret} y", f"failed: '{secret}'.", f'{{"v":"{secret}"}}'):
        out = redact(line)
        assert secret not in out and MASK in out, (kind, line, out)


def test_names_stay_values_go() -> None:
    assert redact("Authorization: Bearer abc.def-ghi_jkl") == f"Authorization: Bearer {MASK}"
    assert redact("GET /v1/x?key=abc123&alt=sse") == f"GET /v1/x?key={MASK}&alt=sse"
    assert redact("api_key=hunter22 password=pw1") == f"api_key={MASK} password={MASK}"
    assert redact("aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'") == (
        f"aws_secret_access_key = '{MASK}'"
    )


@pytest.mark.parametrize(
    "line",
    [
        "2026-12-03 12:02:34,123 INFO llmux[1234]: ext_proc worker 0 (pid 123) died; restarting",
        "listening on 127.0.0.1:4000 and [::1]:9901, 10.100.200.300, port 49003",
        "request e8863c50-117b-4974-8e0b-194209beb922 deployment 3f5dec08c4cf took 0.125s",
        "created 1733227354000 (ms), 1234567890123 is no card (Luhn), version 1.109.1",
        "config reloaded: 12 deployments; drained in 3.2s; 2026-12-03T12:02:34.107Z",
        "model gpt-4o-2024-08-06 tokens 1200 cost 9.75e-05 key_alias sk-...abcd",
    ],
)
def test_ordinary_lines_are_untouched(line: str) -> None:
    assert redact(line) == line


def test_formatter_redacts_the_whole_record_traceback_included() -> None:
    formatter = RedactingFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError(f"provider said: bad key {SECRETS['openai key']}")
    except ValueError:
        record = logging.LogRecord(
            "llmux", logging.ERROR, __file__, 1, "for %s", (SECRETS["email"],), sys.exc_info()
        )
    out = formatter.format(record)
    assert "ValueError" in out and "Traceback" in out
    assert SECRETS["openai key"] not in out and SECRETS["email"] not in out
    assert out.count(MASK) >= 2


def test_every_llmux_process_logs_through_it() -> None:
    """The CLI's logging setup (supervisor, workers and commands all start through it)."""
    code = (
        "import logging; from llmux_extproc import cli; cli._setup_logging(); "
        f"logging.getLogger('llmux.worker').warning('upstream said %s', {SECRETS['anthropic key']!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "upstream said" in result.stderr
    assert SECRETS["anthropic key"] not in result.stderr and MASK in result.stderr


def test_check_config_errors_are_redacted(tmp_path: Path) -> None:
    """A config error quotes the value it refuses: a key pasted in the wrong place."""
    secret = SECRETS["openai key"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"llmux: {{listen: '{secret}'}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "llmux_extproc", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "llmux.listen" in result.stderr and MASK in result.stderr
    assert secret not in result.stderr + result.stdout
