"""`python -m bench.overload`: what clients get when the workers cannot keep up.

Open-loop translated streams (the Anthropic mock of the main bench) at a fixed rate against
LLMux with one worker, then a trickle of requests to see that it recovers. Reports the
statuses clients got, the response flags of Envoy's access log, the ext_proc errors Envoy
logged (by gRPC status), and whether Envoy crashed. The figures in docs/architecture.md
("What overload looks like") come from this. Heavy: it saturates a small machine on
purpose; never part of `make bench` or the tests.

    python -m bench.overload --rate 1000 --duration 8 [--max-streams-per-worker 512]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.targets import LLMux, Upstreams

_GRPC_ERROR = re.compile(r"Received gRPC error on stream: (\d+), message (.{0,40})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    p.add_argument("--rate", type=float, default=1000.0, help="offered req/s (default 1000)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds at that rate")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-streams-per-worker", type=int, help="llmux.max_streams_per_worker")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="llmux-overload-"))
    upstreams = Upstreams(work)
    upstreams.start()
    target = LLMux(upstreams, work, workers=args.workers, access_log=str(work / "access.log"))
    base_config = target.config

    def config() -> dict[str, Any]:
        doc = base_config()
        if args.max_streams_per_worker:
            doc["llmux"]["max_streams_per_worker"] = args.max_streams_per_worker
        return doc

    target.config = config  # type: ignore[method-assign]
    try:
        target.start()
        request = target.raw_request("anthropic_stream")
        load = loadgen.run(
            loadgen.open_loop("127.0.0.1", target.port, request, args.rate, args.duration)
        )
        time.sleep(2)
        after = loadgen.run(loadgen.open_loop("127.0.0.1", target.port, request, 20, 2, 0.2))
    finally:
        target.stop()
        upstreams.stop()
    statuses: Counter[str] = Counter()
    for line in (work / "access.log").read_text().splitlines():
        entry = json.loads(line)
        statuses[f"{entry['status']} {entry['flags']}"] += 1
    envoy_log = (work / f"{target.name}.log").read_text(errors="replace")
    grpc_errors = Counter(f"{code} {msg}" for code, msg in _GRPC_ERROR.findall(envoy_log))
    report = {
        "rate": args.rate,
        "max_streams_per_worker": args.max_streams_per_worker or "default",
        "load": {k: load.to_json()[k] for k in ("ok", "errors", "latency_ms", "connections")},
        "after": {"ok": after.ok, "errors": after.errors},
        "access_log": dict(statuses.most_common()),
        "ext_proc_grpc_errors": dict(grpc_errors.most_common()),
        "envoy_crashed": envoy_log.count("Caught Segmentation fault"),
        "workdir": str(work),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
