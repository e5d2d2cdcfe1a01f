"""wrk for closed-loop maximum throughput: installed from Debian when missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import orjson

from bench.loadgen import LoadResult
from bench.procstats import cpu_seconds

_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50\\":%d,\\"p90\\":%d,\\"p99\\":%d," ..
    "\\"p999\\":%d,\\"max\\":%d,\\"mean\\":%f}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def find_wrk() -> str | None:
    return shutil.which("wrk")


def ensure_wrk(install: bool) -> str | None:
    """The wrk binary; with `install`, `apt-get install wrk` first when it is missing."""
    found = find_wrk()
    if found or not install:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"]):
        # Try the install first; refresh the package lists only if it fails.
        if subprocess.run(cmd, env=env, capture_output=True).returncode == 0 and find_wrk():
            return find_wrk()
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, capture_output=True)
    return find_wrk()


def wrk_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True)
    match = re.search(r"wrk \S+", out.stdout + out.stderr)
    return match.group(0) if match else "wrk"


def run_wrk(
    binary: str,
    url: str,
    body: bytes,
    connections: int,
    duration: float,
    threads: int = 1,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
        script.write_text(_SCRIPT.format(body=body.decode(), headers=extra))
        cmd = [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Sample wrk's own CPU just before it exits (a zombie's /proc stat is gone).
        cpu = 0.0
        while proc.poll() is None:
            cpu = cpu_seconds(proc.pid) or cpu
            time.sleep(0.05)
        out, err = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out.strip()}")
    data = orjson.loads(line[len("BENCHJSON ") :])
    elapsed = data["duration_us"] / 1e6
    errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout") if data[k]}
    ok = int(data["requests"]) - errors.get("status", 0)
    latency = {k: round(data[k] / 1000, 3) for k in ("p50", "p90", "p99", "p999", "max", "mean")}
    return LoadResult(
        mode="closed",
        generator="wrk",
        duration_s=round(elapsed, 3),
        ok=ok,
        throughput_rps=round(ok / elapsed, 1),
        total=int(data["requests"]),
        errors=errors,
        connections=connections,
        latency_ms=latency,
        service_ms=latency,
        generator_cpu_s=round(cpu, 3),
    )
