"""Secrets and personal data out of every line LLMux writes.

Each LLMux process (supervisor, workers, one-shot commands) formats its log records with
`RedactingFormatter`: the finished line, tracebacks and provider messages included, is
masked by one regular expression pass before it is written. What it masks:

- API keys by shape: OpenAI and Anthropic (`sk-...`, `sk-proj-...`, `sk-ant-...`), Google
  (`AIza...`, OAuth access tokens `ya29....`), AWS access key ids (`AKIA...`, `ASIA...`)
  and a secret access key written after its name; `Bearer <token>`; values of
  `api_key=`, `key=`, `token=`, `secret=`, `password=`, `sig=` (URLs, form bodies).
- PII: email addresses, phone numbers (international `+` form, or groups joined by
  spaces, dots or dashes), card numbers (13-19 digits passing the Luhn check, so ids and
  timestamps stay).

Envoy's access log is written by Envoy, not through this: LLMux keeps secrets out of the
fields it configures instead (the path without its query, error types, not messages).
"""

from __future__ import annotations

import logging
import re

MASK = "[REDACTED]"

# Each pattern runs only when a literal it needs is in the line (a substring test costs
# tens of nanoseconds, a regex scan microseconds): one alternation of all of them cost
# 65-100 us per 110-character line, this 2-7 us (measured on the shared 2-core machine).
_BEARER = re.compile(r"(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_SK = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")
_GOOGLE = re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b|\bya29\.[0-9A-Za-z._-]{20,}")
_AWS_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_AWS_SECRET = re.compile(
    r"(?i:aws_secret_access_key|secret_?access_?key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}"
)
_PARAM = re.compile(
    r"(?i:\b(?:api[_-]?key|key|token|access_token|secret|password|sig)=)[^&\s\"',;]+"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Runs of digits and separators long enough to be a phone or card number; each is then
# judged on its own.
_NUMBERS = re.compile(r"(?<![\w.:/-])[+(]?\d[\d ().-]{8,}\d(?![\w:/-]|\.\d)")
# Separators required (or a leading +): dates, times, ports, pids and addresses never
# have three groups of 3-4 digits.
_PHONE = re.compile(
    r"(?<!\d)(?<!\d\.)(?:(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
    r"|\+\d{10,15})(?!\d|\.\d)"
)
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
# What is kept of a `name=value` or `Bearer value` match: a reader still sees which
# secret was there.
_KEEP_PREFIX = re.compile(r"(?i:^(?:bearer\s+|[^=:]*[=:]\s*[\"']?))")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _keep_name(match: re.Match[str]) -> str:
    prefix = _KEEP_PREFIX.match(match.group())
    return (prefix.group() if prefix else "") + MASK


def _number(match: re.Match[str]) -> str:
    text = match.group()
    digits = "".join(ch for ch in text if ch.isdigit())
    if 13 <= len(digits) <= 19 and _CARD.fullmatch(text) and _luhn(digits):
        return MASK
    # A phone number somewhere in the run (a run may join a number and what follows it).
    return _PHONE.sub(MASK, text) if len(digits) >= 9 else text


def redact(text: str) -> str:
    """`text` with every key, token and piece of personal data this module knows masked."""
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(_keep_name, text)
    if "sk-" in text:
        text = _SK.sub(MASK, text)
    if "AIza" in text or "ya29." in text:
        text = _GOOGLE.sub(MASK, text)
    if "AKIA" in text or "ASIA" in text:
        text = _AWS_ID.sub(MASK, text)
    if "=" in text:
        if "ecret" in text or "ECRET" in text:
            text = _AWS_SECRET.sub(_keep_name, text)
        text = _PARAM.sub(_keep_name, text)
    if "@" in text:
        text = _EMAIL.sub(MASK, text)
    return _NUMBERS.sub(_number, text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose output, the whole line with its traceback, is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install(handler: logging.Handler, fmt: str) -> None:
    handler.setFormatter(RedactingFormatter(fmt))
