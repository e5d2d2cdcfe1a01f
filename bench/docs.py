"""docs/benchmarks.md and the per-run Markdown: figures, machine, method; the hand-written
analysis block of the existing file is carried over. `python -m bench.docs RESULTS.json`
re-renders the file from saved results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.report import (
    Results,
    availability_table,
    cold_start_table,
    cpu_table,
    failover_summary,
    failover_table,
    failover_targets,
    hold_table,
    keys_table,
    keys_targets,
    latency_table,
    md_table,
    memory_table,
    noise_line,
    open_loop_health_table,
    throughput_table,
)
from bench.targets import ROOT
from bench.verdicts import targets_table

METHOD = """
* **Mock provider**: a separate Envoy process answering with `direct_response`: a static
  OpenAI `chat.completion` (with usage), a static Anthropic Messages answer, and static SSE
  bodies (OpenAI chunks; Anthropic events) of 20 content events each, one listener (port)
  per kind of answer, so each gateway deployment's `api_base` picks its answer and gets an
  upstream cluster of its own. A buffer filter reads each request body before the answer,
  so upstream connections stay keep-alive. Held streams go to `bench/hold_server.py`, which
  sends the headers and the first SSE chunk, then only an SSE comment every 20 s (a slow
  but live stream, inside LLMux's 60 s stream idle timeout).
* **Targets**: *bare Envoy*: a plain Envoy listener whose only filter is the router, its
  upstream clusters set up like LLMux's provider clusters (HTTP/1.1, same circuit
  breakers): the floor. *LLMux*: `llmux run` with `workers: 1` and `workers: 2`,
  `access_log: off`, a master key (clients send it), deployments `openai/gpt-4o-mini` and
  `anthropic/claude-3-5-haiku-20241022` with `api_base` = the mock. Each target is started
  fresh for every repetition and measured once its processes are idle (start-up work
  done); repetitions interleave the targets. Envoy runs with its default concurrency (one
  worker thread per core) everywhere.
* **Scenarios**: each request kind a target answers correctly (checked with one request
  first; a kind that fails the check is reported as not available, with the reason):
  closed-loop maximum throughput at 32 and 128 connections (wrk, one thread, a Lua POST
  script, after a 1 s warm-up run; the Python generator when wrk is absent); open-loop
  latency at 200, 500 and 1,000 req/s with Poisson arrivals from `bench/loadgen.py`
  (1 s warm-up, then the measured window). `workers: 2` gets the throughput runs only
  (`--full-suite-workers` changes that).
* **Failover**: LLMux (`workers` as the first LLMux target) serving one model group of two
  `openai/gpt-4o-mini` deployments on the mock: one on a listener that answers every call
  with HTTP 500 and an OpenAI error body, the other answering normally;
  `router_settings: {num_retries: 1}`. Two variants, each started fresh: *cooldowns and
  breaker off* (`disable_cooldowns: true`, and `llmux.circuit_breaker.failure_rate: 1.0`
  so LLMux's own breaker, which `disable_cooldowns` leaves on, never opens): the load
  balancer keeps picking the failing deployment, the worst case; *cooldowns on*: the
  defaults (LiteLLM's cooldown rule, 5 s cooldowns, and the breaker). Floor: bare Envoy
  routing to the same two endpoints with Envoy's own retry (`retry_on: 5xx`, one retry,
  `previous_hosts`, the same back-off as LLMux's group routes). Closed-loop throughput at
  the same connection counts, open-loop latency at 200 req/s (`--failover-rates`); the
  healthy reference is the same LLMux's OpenAI group in the same repetition. The client
  error rate is from the generator; the attempts that reached the failing deployment are
  the failing listener's request count (the mock's admin stats) around each measurement,
  per request answered (warm-up included, like CPU). `--no-failover` skips it.
* **Virtual keys and limits**: LLMux (`workers` as the first LLMux target) with
  `general_settings.database_url` on the machine's PostgreSQL (a fresh `llmux_bench`
  database, migrated at start) and the client holding a key from `/key/generate` with
  `rpm_limit`, `tpm_limit`, `max_parallel_requests` and `max_budget`, none of them reached:
  every request is authenticated from the worker's key cache, admitted (each bucket and
  the budget reserved) and settled, and its spend row queued for the batch writer. Two
  variants: the limits' state local to the replica (with `workers: 1`, the worker's own
  dicts), and in Redis (`router_settings.redis_url`, the machine's Redis: one round trip per
  admission). Non-streamed and streamed OpenAI requests, closed loop at the same
  connection counts, open loop at 200 req/s (`keys_rates`); the reference is the same
  LLMux's master-key figures in the same repetition. `--no-keys` skips them.
* **No coordinated omission**: the open-loop generator draws every send time from the
  Poisson process independently of the answers and measures each latency from the
  *scheduled* time, so a stalled target or a late generator adds to the latency instead of
  thinning the load; a request that finds no idle keep-alive connection opens a new one (up
  to 4,096; its connect time counts). The generator's own send lag (actual minus scheduled
  send; the event loop's timers have 1 ms resolution) is reported; it is the same for every
  target, so *added* latency cancels it. Answers arriving after the window (an overloaded
  target draining) count in the latency, not in the answered rate.
* **CPU**: utime+stime deltas from `/proc/<pid>/stat` of every process of the target
  around each measurement, divided by the requests answered in it (warm-up included, as it
  is inside the window). Per SSE event: the mock sends each stream body in one write, so
  Envoy hands it to the ext_proc in about one body message; the per-event figure is the
  marginal cost, (streamed - non-streamed CPU per request of the same provider, same load)
  / 20 events.
* **Memory**: `VmHWM` from `/proc/<pid>/status` of every process after the scenarios
  (before the held-streams test, whose RSS is sampled separately, mid-hold).
* **Cold start**: from spawning `llmux run` (or Envoy) until the first 200 on a chat
  completion through the mock, polled every 5 ms.
* **Held streams**: N streaming requests opened (256 at a time), each counted once its
  first body byte arrives, all held open, RSS sampled mid-hold, then closed. N is capped by
  the file-descriptor limit (Envoy holds two descriptors per proxied stream).
* **Shared machine**: load generator, mock and target share the same cores; the figures
  are for that setup, not for a gateway with the machine to itself. CPU used meanwhile by
  processes outside the benchmark is measured (`/proc/stat` minus the known processes) and
  reported with the generator health table.
"""

ANALYSIS_START = "<!-- analysis:start -->"
ANALYSIS_END = "<!-- analysis:end -->"


def figures(data: dict[str, Any]) -> str:
    res = Results(data)
    has_llmux = any(t.startswith("llmux") for t in res.gateways())
    parts = [
        "### Against the targets\n\n" + targets_table(res) if has_llmux else "",
        "### What each target serves\n\n" + availability_table(res),
        "### Closed-loop maximum throughput (req/s)\n\n" + throughput_table(res),
        "### Latency at fixed offered rates (open loop, Poisson arrivals)\n\n"
        "Latency from each request's scheduled send time to its last response byte; "
        "*added* is the gateway's figure minus bare Envoy's at the same rate in the same "
        "repetition.\n\n" + latency_table(res),
        "### Streaming: time to first body byte (open loop)\n\n" + latency_table(res, "ttfb_ms"),
        "### Failover: one of two deployments answers 500\n\n"
        "LLMux with `num_retries: 1` in front of a group whose first deployment always "
        "fails, without and with cooldowns, next to its healthy group and to bare Envoy "
        "retrying the same way. " + failover_summary(res) + "\n\n" + failover_table(res)
        if failover_targets(res)
        else "",
        "### Virtual keys and limits\n\n"
        "LLMux with a key database and a client key with rpm, tpm, max-parallel and budget "
        "limits (none reached), limits local or in Redis, next to the same LLMux with the "
        "master key in the same repetition.\n\n" + keys_table(res)
        if keys_targets(res)
        else "",
        "### CPU per request (utime+stime deltas from /proc)\n\n" + cpu_table(res),
        "### Peak RSS per process\n\n" + memory_table(res),
        "### Cold start\n\n" + cold_start_table(res),
        "### Held open streams\n\n" + hold_table(res),
        "### Open-loop generator health and machine noise\n\n"
        "Answered rate below the offered rate, errors, or a large send lag mean the figures "
        "of that row describe an overloaded target or generator. "
        + noise_line(res)
        + "\n\n"
        + open_loop_health_table(res),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def environment_table(env: dict[str, Any]) -> str:
    rows = [[k, str(v)] for k, v in env.items() if k != "python_executable"]
    return md_table(["", ""], rows)


def settings_line(settings: dict[str, Any]) -> str:
    keys = (
        "repetitions",
        "duration",
        "rate_duration",
        "warmup",
        "connections",
        "rates",
        "failover",
        "failover_rates",
        "keys",
        "streams",
        "hold_s",
        "workers",
        "full_suite_workers",
        "wrk",
        "wrk_threads",
        "access_log",
    )
    return ", ".join(f"`{k}={settings.get(k)}`" for k in keys)


def results_markdown(data: dict[str, Any]) -> str:
    return (
        f"# LLMux benchmark results ({data['started']})\n\n"
        f"Settings: {settings_line(data['settings'])}\n\n"
        "## Machine and versions\n\n" + environment_table(data["environment"]) + "\n\n"
        "## Figures\n\nEach cell: median (min to max) over the repetitions.\n\n" + figures(data)
    )


def _keep_analysis(existing: str) -> str:
    start, end = existing.find(ANALYSIS_START), existing.find(ANALYSIS_END)
    if start < 0 or end < start:
        return f"{ANALYSIS_START}\n_No analysis written yet._\n{ANALYSIS_END}"
    return existing[start : end + len(ANALYSIS_END)]


def compare_section(data: dict[str, Any]) -> str:
    """A separate `--compare-litellm` run, shown after the main figures."""
    return (
        f"## Comparison with LiteLLM (separate run, {data['started']})\n\n"
        f"Settings: {settings_line(data['settings'])}; LiteLLM "
        f"{data['environment'].get('litellm', '?')} with `--num_workers "
        f"{data['settings'].get('litellm_workers')}`, `LITELLM_LOG=ERROR`, a master key, no "
        "database. Same machine, mock and generator; bare Envoy is measured again in the same "
        "run as the floor.\n\n" + figures(data).replace("### ", "#### ")
    )


def write_docs(
    path: Path, data: dict[str, Any], compare: dict[str, Any] | None = None, method: str = METHOD
) -> None:
    """Rewrite docs/benchmarks.md; the hand-written analysis block is carried over."""
    existing = path.read_text() if path.exists() else ""
    doc = (
        "# Benchmarks\n\n"
        "LLMux against a bare Envoy proxy (the floor) and, with `--compare-litellm`, "
        "LiteLLM's proxy, all in front of the same fast mock provider. This file is "
        "rewritten by `python -m bench.run` (`make bench`); the hand-written analysis "
        "between its markers is kept.\n\n"
        "## How to run\n\n"
        "```sh\n"
        "make bench                      # python -m bench.run: the full run (~25 min)\n"
        "make bench-compare              # the same plus LiteLLM (bench/.litellm-venv)\n"
        "python -m bench.run --smoke     # seconds; what tests/test_bench_smoke.py runs\n"
        "python -m bench.run --help      # repetitions, durations, rates, connections, ...\n"
        "python -m bench.soak --requests 1000000   # ext_proc RSS over time, to JSON\n"
        "python -m bench.profile         # py-spy profile of an ext_proc worker under load\n"
        "python -m bench.stream_cost     # CPU per streamed chunk, one event per chunk\n"
        "python -m bench.admission_cost  # worker CPU of rate-limit admission [--redis URL]\n"
        "python -m bench.ab --against DIR --ablate NAMES  # paired A/B (noisy machines)\n"
        "python -m bench.docs RESULTS.json [--compare LITELLM.json]  # re-render this file\n"
        "```\n\n"
        "Raw results: `bench/results/*.json` (gitignored), with a Markdown copy of the tables.\n\n"
        f"## Last run: {data['started']}\n\n"
        f"Settings: {settings_line(data['settings'])}\n\n"
        "### Machine and versions\n\n" + environment_table(data["environment"]) + "\n\n"
        "## Analysis\n\n" + _keep_analysis(existing) + "\n\n"
        "## Method\n\n" + method.strip() + "\n\n"
        "## Figures\n\nEach cell: median (min to max) over the repetitions.\n\n"
        + figures(data)
        + ("\n" + compare_section(compare) if compare else "")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    """Re-render docs/benchmarks.md from saved results (the analysis block is kept)."""
    import argparse

    import orjson

    p = argparse.ArgumentParser(prog="python -m bench.docs", description=main.__doc__)
    p.add_argument("results", type=Path, help="bench/results/<time>.json of a bench.run")
    p.add_argument("--compare", type=Path, help="results of a --compare-litellm run to append")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    data = orjson.loads(args.results.read_bytes())
    compare = orjson.loads(args.compare.read_bytes()) if args.compare else None
    write_docs(args.docs, data, compare)
    print(f"rewrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
