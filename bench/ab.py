"""`python -m bench.ab`: LLMux variants compared pairwise on one machine.

    python -m bench.ab [--rounds 16] [--seconds 2] [--kind openai] [--connections 32]
                       [--against DIR ...] [--ablate NAMES ...]

The variants: this checkout, each `--against DIR` (another checkout with its own `.venv`,
e.g. `git worktree add /tmp/old REV && make -C /tmp/old lint`), each `--ablate NAMES`
(this checkout with parts of its Envoy config taken out, `bench.ablate`). All run at
once, `workers: 1`, in front of one mock, and are measured in turn (closed loop, wrk),
the order reversed every other round. Each round's figures are divided by the first
variant's in the same round, so the machine's drift between rounds cancels: on the
shared 2-core test machine identical runs minutes apart differ by ±15%, and only the
paired ratios resolve a few percent. Prints medians and quartiles of those ratios.
Idle variants cost the measured one a little (18 ms of CPU per second each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.runner import Settings, log, measure
from bench.targets import LLMux, Upstreams
from bench.wrk import ensure_wrk


class Variant(LLMux):
    def __init__(self, upstreams: Upstreams, workdir: Path, n: int, label: str) -> None:
        super().__init__(upstreams, workdir, 1)
        self.name = f"v{n}"  # short: the runtime directory holds Unix sockets
        self.label = label
        self.ablate = ""
        self.exe: list[str] | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        if self.exe is not None:
            return [*self.exe, *cmd[-3:]], env
        if self.ablate:
            return [sys.executable, "-m", "bench.ablate", *cmd[-3:]], {"LLMUX_ABLATE": self.ablate}
        return cmd, env


def variants(args: argparse.Namespace, upstreams: Upstreams, workdir: Path) -> list[Variant]:
    out: list[Variant] = [Variant(upstreams, workdir, 0, "this checkout")]
    for path in args.against:
        v = Variant(upstreams, workdir, len(out), f"checkout {path}")
        v.cwd = Path(path)
        v.exe = [str(Path(path, ".venv", "bin", "llmux"))]
        out.append(v)
    for names in args.ablate:
        v = Variant(upstreams, workdir, len(out), f"without {names}")
        v.ablate = names
        out.append(v)
    return out


def quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    last = len(ordered) - 1
    return ordered[round(0.25 * last)], statistics.median(ordered), ordered[round(0.75 * last)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--kind", default="openai")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--against", nargs="*", default=[], help="other checkouts (with a .venv)")
    p.add_argument("--ablate", nargs="*", default=[], help="bench.ablate name lists")
    args = p.parse_args(argv)
    wrk = ensure_wrk(install=True)
    settings = Settings(duration=args.seconds, warmup=0.3, settle_limit_s=5, wrk=wrk)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    upstreams = Upstreams(workdir)
    upstreams.start()
    targets = variants(args, upstreams, workdir)
    rows: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    try:
        for t in targets:
            t.start()
        for r in range(args.rounds):
            for t in targets if r % 2 == 0 else targets[::-1]:
                m = measure(t, args.kind, settings, connections=args.connections)
                cpu = m["cpu_us_per_request"]
                rows[t.name].append({"rps": m["result"]["throughput_rps"], **cpu})
            log(f"round {r + 1}/{args.rounds} done")
    finally:
        for t in targets:
            t.stop()
        upstreams.stop()
    first = rows[targets[0].name]
    print(
        f"{args.kind}, {args.connections} connections, {args.rounds} rounds of {args.seconds:g} s"
    )
    for t in targets:
        mine = rows[t.name]
        rps = quartiles([m["rps"] / f["rps"] for m, f in zip(mine, first, strict=True)])
        cpu = {
            role: statistics.median(m.get(role, 0.0) for m in mine)
            for role in ("extproc", "envoy", "supervisor")
        }
        print(
            f"{t.label}: {statistics.median(m['rps'] for m in mine):,.0f} req/s, "
            f"ratio {rps[1]:.3f} ({rps[0]:.3f}-{rps[2]:.3f}); CPU us/request "
            + ", ".join(f"{role} {v:.0f}" for role, v in cpu.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
