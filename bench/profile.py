"""`python -m bench.profile`: where an ext_proc worker spends its time under load.

Starts the mock provider and LLMux (`workers: 1`), drives closed-loop load at it, and
samples the worker with `py-spy record` (installed into this virtualenv with pip when
missing). Writes the collapsed stacks and prints the top frames by own (leaf) time and
by total (inclusive) time.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import loadgen
from bench.runner import log, settle
from bench.targets import ROOT, LLMux, Upstreams


def ensure_py_spy() -> str:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists() and not shutil.which("py-spy"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(exe) if exe.exists() else str(shutil.which("py-spy"))


def top_frames(collapsed: str, n: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own time, inclusive time) shares per frame from py-spy's collapsed-stack output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return [], []
    return (
        [(f, c / total * 100) for f, c in own.most_common(n)],
        [(f, c / total * 100) for f, c in inclusive.most_common(n)],
    )


_BUCKETS = (
    ("waiting in epoll (idle)", ("epoll_wait", "epoll_pwait")),
    ("socket syscalls (sendmsg/write/recv/read)", ("sendmsg", "write (", "recv", "read (")),
    ("other syscalls (futex, getpid, ...)", ("syscall (", "getpid")),
    ("protobuf (upb)", ("_message.abi3.so",)),
    ("gRPC core / cygrpc", ("cygrpc",)),
    ("prometheus_client", ("prometheus_client",)),
    ("LLMux code (llmux_extproc)", ("llmux_extproc/",)),
    ("asyncio / uvloop", ("asyncio/", "uvloop", "loop.c", "_asynciomodule")),
)


def buckets(collapsed: str) -> list[tuple[str, float]]:
    """Share of samples by the kind of code at the top of the stack (the leaf)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        leaf = stack.split(";")[-1]
        total += int(count_text)
        name = next((b for b, keys in _BUCKETS if any(k in leaf for k in keys)), "other")
        counts[name] += int(count_text)
    return [(name, c / total * 100) for name, c in counts.most_common()] if total else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--kind", default="openai", help="openai, anthropic, openai_stream, ...")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="include native (C/C++) frames")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    py_spy = ensure_py_spy()
    workdir = Path(tempfile.mkdtemp(prefix="llmux-profile-"))
    upstreams = Upstreams(workdir)
    target = LLMux(upstreams, workdir, 1)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"profile-{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    upstreams.start()
    try:
        target.start()
        settle(target)
        worker = next(p.pid for p in target.processes if p.role == "extproc")
        request = target.raw_request(args.kind)
        results: list[loadgen.LoadResult] = []
        load = threading.Thread(
            target=lambda: results.append(
                loadgen.run(
                    loadgen.closed_loop(
                        "127.0.0.1",
                        target.port,
                        [request],
                        args.connections,
                        args.seconds + 2,
                        warmup=0,
                    )
                )
            )
        )
        load.start()
        time.sleep(1)
        cmd = [
            py_spy,
            "record",
            "--pid",
            str(worker),
            "--duration",
            str(int(args.seconds)),
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "--output",
            str(out),
            # Native unwinding needs the target paused at each sample; otherwise don't pause.
            *(["--native"] if args.native else ["--nonblocking"]),
        ]
        log("running: " + " ".join(cmd))
        spy = subprocess.run(cmd, capture_output=True, text=True)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {spy.stderr.strip() or spy.stdout.strip()}")
        load.join()
    finally:
        target.stop()
        upstreams.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    own, inclusive = top_frames(out.read_text(), args.top)
    if results:
        r = results[0]
        print(
            f"load: {r.throughput_rps:.0f} req/s at {args.connections} connections "
            f"({args.kind}), p50 {r.latency_ms.get('p50')} ms"
        )
    print("\nSamples by leaf:")
    for name, share in buckets(out.read_text()):
        print(f"{share:6.1f}%  {name}")
    print(f"\nTop frames by own time (ext_proc worker pid {worker}, {out}):")
    for frame, share in own:
        print(f"{share:6.1f}%  {frame}")
    print("\nTop frames by inclusive time:")
    for frame, share in inclusive:
        print(f"{share:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
