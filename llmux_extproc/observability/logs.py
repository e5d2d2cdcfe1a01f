"""LLMux's own log lines: one JSON object per line, with the request's trace and span ids
where one is known, and a level per component (`llmux.log_level`).

Envoy writes its own lines in the same shape (`envoy_log_format`), so stderr holds one
format; the access log (stdout or its file) is Envoy's JSON access log, which carries the
same trace ids.

The ids come from a context variable the ext_proc layer sets per attempt (each gRPC stream
is one asyncio task, so a log line written while handling it, awaits included, gets that
attempt's ids and no other's). Nothing is formatted for a record whose level is off.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

from llmux_extproc.observability.redact import redact

# The trace id and span id (lowercase hex) of the attempt being handled, if it has any.
TRACE_IDS: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "llmux_trace_ids", default=None
)

# llmux.log_level components: each is the logger `llmux.<component>` (and its children);
# `default` is `llmux` itself, `envoy` Envoy's --log-level.
COMPONENTS = (
    "default",
    "supervisor",
    "control",
    "worker",
    "extproc",
    "accesslog",
    "keys",
    "management",
    "db",
    "tracing",
    "envoy",
)
LEVELS = ("debug", "info", "warning", "error", "critical")
ENVOY_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def logger_name(component: str) -> str:
    return "llmux" if component == "default" else f"llmux.{component}"


def parse_log_levels(value: Any) -> tuple[tuple[str, str], ...]:
    """`info`, or `{default: info, extproc: debug, envoy: warning, ...}`."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = {"default": value}
    if not isinstance(value, Mapping):
        raise ValueError("llmux.log_level: a level (info) or a mapping of component: level")
    out = []
    for component, level in value.items():
        if component not in COMPONENTS:
            raise ValueError(
                f"llmux.log_level.{component}: unknown component; known: {list(COMPONENTS)}"
            )
        level = str(level).lower()
        if level == "warn":
            level = "warning"
        allowed = ENVOY_LEVELS if component == "envoy" else LEVELS
        if level not in allowed:
            raise ValueError(f"llmux.log_level.{component}: must be one of {list(allowed)}")
        out.append((str(component), level))
    # "default" first, so that applying the pairs in order lets a component override it.
    out.sort(key=lambda pair: pair[0] != "default")
    return tuple(out)


def envoy_log_level(levels: tuple[tuple[str, str], ...], fallback: str = "warning") -> str:
    return dict(levels).get("envoy", fallback)


def apply_levels(levels: tuple[tuple[str, str], ...]) -> None:
    """Set each component's level; components not named inherit `default` (info)."""
    named = dict(levels)
    for component in COMPONENTS:
        if component == "envoy":
            continue
        logger = logging.getLogger(logger_name(component))
        if component in named:
            logger.setLevel(named[component].upper())
        elif component == "default":
            logger.setLevel(logging.INFO)
        else:
            logger.setLevel(logging.NOTSET)  # inherit default's


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message", "trace_id"?, "span_id"?, "exception"?}"""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(record.msecs):03d}Z",
            "level": _NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "pid": record.process,
            # Redacted as the text lines were (keys, tokens, personal data: redact.py).
            "message": redact(record.getMessage()),
        }
        ids = TRACE_IDS.get()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line).decode()


def setup_logging() -> None:
    """JSON lines on stderr, for every logger of the process (grpc's and psycopg's too)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def envoy_log_format() -> str:
    """Envoy's --log-format giving lines in JSON_FORMATTER's shape (`%j`: the message,
    JSON-escaped; `%n`: Envoy's component, e.g. `upstream`)."""
    return '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","pid":%P,"message":"%j"}'


def trace_ids_from_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C traceparent header, None if it is not one."""
    if value is None or len(value) < 55 or value[2] != "-" or value[35] != "-":
        return None
    trace_id, span_id = value[3:35], value[36:52]
    if trace_id == "0" * 32:
        return None
    return trace_id, span_id
