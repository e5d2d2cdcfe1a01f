"""`python -m bench.run` (`make bench`): LLMux against bare Envoy (and LiteLLM) on one machine.

One command: starts the mock provider, then for each repetition each target fresh, measures
the scenarios, and writes `bench/results/<time>.json` and `.md` and rewrites
docs/benchmarks.md. `--smoke` is a seconds-long run that installs nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import docs, envinfo
from bench.runner import Settings, TargetPlan, log, max_streams_for_fd_limit, run_all, save_json
from bench.targets import (
    ROOT,
    BareEnvoy,
    LiteLLM,
    LLMux,
    LLMuxFailover,
    LLMuxKeys,
    Target,
    Upstreams,
    ensure_litellm,
    litellm_version,
)
from bench.wrk import ensure_wrk, wrk_version


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="seconds-long run, installs nothing")
    p.add_argument("--compare-litellm", action="store_true", help="also run LiteLLM's proxy")
    p.add_argument("--repetitions", type=int, help="repetitions per figure (default 3)")
    p.add_argument("--duration", type=float, help="closed-loop seconds (default 4)")
    p.add_argument("--rate-duration", type=float, help="open-loop seconds (default 5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each run (default 1)")
    p.add_argument("--connections", type=int, nargs="+", help="closed-loop connections")
    p.add_argument("--rates", type=float, nargs="+", help="open-loop offered req/s")
    p.add_argument(
        "--failover-rates",
        type=float,
        nargs="+",
        help="open-loop offered req/s of the failover scenario (default 200)",
    )
    p.add_argument(
        "--no-failover",
        action="store_true",
        help="skip the failover scenario (a group of two deployments, one failing)",
    )
    p.add_argument(
        "--no-keys",
        action="store_true",
        help="skip the virtual-key scenarios (they need PostgreSQL, and Redis)",
    )
    p.add_argument("--streams", type=int, help="held open streams (default 10000; 0: skip)")
    p.add_argument("--hold", type=float, help="seconds to hold the streams (default 15)")
    p.add_argument(
        "--workers", type=int, nargs="+", help="LLMux worker counts (default 1 2; 0: no LLMux)"
    )
    p.add_argument(
        "--full-suite-workers",
        type=int,
        nargs="+",
        help="LLMux worker counts that also get the fixed-rate latency runs (default 1)",
    )
    p.add_argument("--litellm-workers", type=int, help="LiteLLM --num_workers (default nproc)")
    p.add_argument("--wrk-threads", type=int, help="wrk threads (default 1)")
    p.add_argument("--no-wrk", action="store_true", help="closed loop with the Python generator")
    p.add_argument("--access-log", help="LLMux access_log setting (default off)")
    p.add_argument("--output", type=Path, help="results directory (default bench/results)")
    p.add_argument("--docs", type=Path, help="docs file to rewrite (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the docs file")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.smoke:
        s = Settings(
            repetitions=1,
            duration=1.0,
            rate_duration=1.0,
            warmup=0.2,
            connections=(4,),
            rates=(50.0,),
            failover_rates=(50.0,),
            keys_rates=(50.0,),
            streams=20,
            hold_s=1.0,
            first_byte_timeout=5.0,
            workers=(1,),
            full_suite_workers=(1,),
            smoke=True,
        )
    overrides = {
        "repetitions": args.repetitions,
        "duration": args.duration,
        "rate_duration": args.rate_duration,
        "warmup": args.warmup,
        "connections": tuple(args.connections) if args.connections else None,
        "rates": tuple(args.rates) if args.rates else None,
        "failover_rates": tuple(args.failover_rates) if args.failover_rates else None,
        "streams": args.streams,
        "hold_s": args.hold,
        "workers": tuple(args.workers) if args.workers else None,
        "full_suite_workers": tuple(args.full_suite_workers) if args.full_suite_workers else None,
        "litellm_workers": args.litellm_workers or os.cpu_count() or 2,
        "wrk_threads": args.wrk_threads,
        "access_log": args.access_log,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    s.compare_litellm = bool(args.compare_litellm)
    s.failover = not args.no_failover
    s.keys = not args.no_keys
    if not args.no_wrk:
        # The smoke run installs nothing: wrk if present, else the Python generator.
        s.wrk = ensure_wrk(install=not s.smoke)
    return s


def plans_for(settings: Settings, upstreams: Upstreams, workdir: Path) -> list[TargetPlan]:
    """Targets in the order each repetition runs them: a gateway first, so the floor only
    runs the kinds some gateway serves. `--workers 0` leaves LLMux out. The failover
    targets (cooldowns and breaker off, then the defaults) follow the first LLMux, with
    its worker count, and run before the floor, which measures the same failover with
    Envoy's own retry."""
    plans: list[TargetPlan] = []
    llmux_workers = [w for w in settings.workers if w > 0]
    bare = TargetPlan(BareEnvoy(upstreams, workdir), open_loop=True, hold=True)
    for i, workers in enumerate(llmux_workers):
        target: Target = LLMux(upstreams, workdir, workers, settings.access_log)
        full = workers in settings.full_suite_workers
        plans.append(TargetPlan(target, open_loop=full, hold=full and i == 0))
        if i == 0:
            if settings.failover:
                for health in (False, True):
                    failover = LLMuxFailover(
                        upstreams, workdir, workers, health, settings.access_log
                    )
                    plans.append(TargetPlan(failover, open_loop=True, hold=False))
            if settings.keys:
                for redis in (False, True):
                    keys = LLMuxKeys(upstreams, workdir, workers, redis, settings.access_log)
                    plans.append(TargetPlan(keys, True, False, settings.keys_rates))
            plans.append(bare)
    if settings.compare_litellm:
        plans.append(TargetPlan(LiteLLM(upstreams, workdir, settings.litellm_workers), True, True))
    if not llmux_workers:
        plans.append(bare)
    return plans


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds, so every started process is stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    settings = settings_from(args)
    extra: dict[str, str] = {
        "load generator": (wrk_version(settings.wrk) + " (closed loop), ") if settings.wrk else "",
    }
    extra["load generator"] += "bench/loadgen.py (open loop" + (
        ")" if settings.wrk else ", closed loop)"
    )
    if settings.compare_litellm:
        log("preparing LiteLLM in bench/.litellm-venv (first time: pip install 'litellm[proxy]')")
        if ensure_litellm(install=not settings.smoke) is None:
            print("LiteLLM is not installed and --smoke installs nothing", file=sys.stderr)
            return 2
        extra["litellm"] = litellm_version()
    cap, why = max_streams_for_fd_limit()
    if settings.streams > cap:
        log(f"held streams: asked {settings.streams}, the machine allows ~{cap} ({why})")
    output: Path = args.output or ROOT / "bench" / "results"
    output.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="llmux-bench-"))
    upstreams = Upstreams(workdir)
    log(f"settings: {settings.to_json()}; work dir {workdir}")
    try:
        upstreams.start()
        data = run_all(plans_for(settings, upstreams, workdir), settings)
    finally:
        upstreams.stop()
    data = {
        "started": started,
        "settings": settings.to_json(),
        "environment": envinfo.environment(extra),
        **data,
    }
    json_path = output / f"{stamp}{'-smoke' if settings.smoke else ''}.json"
    save_json(json_path, data)
    md = docs.results_markdown(data)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(md)
    print(md)
    log(f"raw results: {json_path}; tables: {md_path}")
    if args.docs or (not args.no_docs and not settings.smoke):
        docs_path = args.docs or ROOT / "docs" / "benchmarks.md"
        docs.write_docs(docs_path, data)
        log(f"rewrote {docs_path}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
