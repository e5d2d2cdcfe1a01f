"""`python -m bench.soak --requests 1000000`: a long closed-loop run through LLMux, sampling
the RSS of every LLMux process over time into JSON, to show whether memory grows.

The load mixes every request kind LLMux serves (non-streaming and streaming, OpenAI and
translated), round-robin on each connection, against the same mock provider as bench.run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.procstats import memory, rss_by_role
from bench.runner import log, probe, save_json, settle
from bench.targets import KINDS, ROOT, LLMux, Upstreams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=1, help="LLMux ext_proc workers")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="request kinds to mix"
    )
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="llmux-soak-"))
    upstreams = Upstreams(workdir)
    target = LLMux(upstreams, workdir, args.workers)
    samples: list[dict[str, Any]] = []
    progress = [0]
    stop = threading.Event()

    def sampler(started: float) -> None:
        while True:
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 2),
                    "requests": progress[0],
                    "rss_mib": rss_by_role(target.processes),
                    "processes": memory(target.processes),
                }
            )
            if stop.wait(args.interval):
                return

    upstreams.start()
    try:
        cold = target.start()
        settle(target)
        kinds = [k for k in args.kinds if probe(target, k) == "ok"]
        log(f"soak: {args.requests} requests, kinds {kinds}, {args.connections} connections")
        requests = [target.raw_request(k) for k in kinds]
        started = time.monotonic()
        thread = threading.Thread(target=sampler, args=(started,), daemon=True)
        thread.start()

        def on_progress(n: int) -> None:
            progress[0] = n
            if n % 50_000 == 0:
                log(f"soak: {n} requests, RSS {rss_by_role(target.processes)}")

        result = loadgen.run(
            loadgen.closed_loop(
                "127.0.0.1",
                target.port,
                requests,
                args.connections,
                duration=0,
                warmup=0,
                max_requests=args.requests,
                on_progress=on_progress,
            )
        )
        stop.set()
        thread.join()
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 2),
                "requests": progress[0],
                "rss_mib": rss_by_role(target.processes),
                "processes": memory(target.processes),
            }
        )
    finally:
        stop.set()
        target.stop()
        upstreams.stop()

    def growth(role: str) -> float | None:
        # From the first sample past 10% of the run (warm) to the last.
        warm = [s for s in samples if s["requests"] >= args.requests * 0.1]
        if not warm or role not in warm[0]["rss_mib"]:
            return None
        return round(float(warm[-1]["rss_mib"][role]) - float(warm[0]["rss_mib"][role]), 1)

    summary = {
        "requests": progress[0],
        "kinds": kinds,
        "cold_start_s": round(cold, 3),
        "throughput_rps": result.throughput_rps,
        "errors": result.errors,
        "latency_ms": result.latency_ms,
        "rss_mib_first": samples[0]["rss_mib"],
        "rss_mib_last": samples[-1]["rss_mib"],
        "rss_growth_after_warmup_mib": {
            role: growth(role) for role in samples[-1]["rss_mib"] if growth(role) is not None
        },
    }
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    save_json(
        path,
        {
            "summary": summary,
            "settings": vars(args) | {"output": str(args.output)},
            "samples": samples,
        },
    )
    log(f"soak summary: {summary}")
    log(f"samples: {path}")
    return 0 if not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
