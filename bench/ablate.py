"""`llmux run` with parts of the generated Envoy config taken out, for `bench.ab`: what
each part of Envoy's per-request work costs. Not for serving: a config without its
access log accounts nothing, one without the request-metadata filters routes nothing.

    LLMUX_ABLATE=upstream_log,access_log python -m bench.ablate run --config FILE

Names (comma-separated): the HTTP filters by short name (FILTERS), `upstream_log` (both
attempt loggers), `upstream_successes` (the successes logger only), `access_log` (every
downstream logger, the accounting one included), `mappers` (local-reply mappers),
`request_id` (the response's x-request-id), `overload` (the overload manager).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from llmux_extproc import cli
from llmux_extproc.control import envoy_config

FILTERS = {
    "header_mutation": "envoy.filters.http.header_mutation",
    "health_check": "envoy.filters.http.health_check",
    "fault": "envoy.filters.http.fault",
    "decompressor": "envoy.filters.http.decompressor",
    "alias": "llmux.alias",
    "prompt": "llmux.prompt",
    "sse": "envoy.filters.http.sse_to_metadata",
}
OTHER = {"upstream_log", "upstream_successes", "access_log", "mappers", "request_id", "overload"}

_bootstrap = envoy_config.bootstrap


def names() -> set[str]:
    chosen = {n for n in os.environ.get("LLMUX_ABLATE", "").split(",") if n}
    unknown = chosen - FILTERS.keys() - OTHER
    if unknown:
        raise SystemExit(f"bench.ablate: unknown names {sorted(unknown)}")
    return chosen


def ablated(config: Any, paths: Any, **kwargs: Any) -> dict[str, Any]:
    doc = _bootstrap(config, paths, **kwargs)
    chosen = names()
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm = hcm["typed_config"]
    drop = {FILTERS[n] for n in chosen if n in FILTERS}
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in drop]
    router = hcm["http_filters"][-1]["typed_config"]
    if "upstream_log" in chosen:
        router["upstream_log"] = []
    elif "upstream_successes" in chosen:
        router["upstream_log"] = router["upstream_log"][:1]
    if "access_log" in chosen:
        hcm.pop("access_log", None)
    if "mappers" in chosen:
        hcm["local_reply_config"].pop("mappers", None)
    if "request_id" in chosen:
        hcm.pop("always_set_request_id_in_response", None)
    if "overload" in chosen:
        doc.pop("overload_manager", None)
    return doc


def main() -> None:
    names()  # a typo fails here, not in the supervisor
    envoy_config.bootstrap = ablated  # type: ignore[assignment]
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
