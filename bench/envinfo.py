"""The machine and the versions a run measured: recorded with every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.targets import ROOT
from llmux_extproc.control.envoy_binary import find_envoy


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(extra: dict[str, str] | None = None) -> dict[str, Any]:
    envoy = _run([find_envoy(), "--version"])
    match = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    sha = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=all", "--", "llmux_extproc"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": _mem_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": match.group(1) if match else envoy[:80],
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "uvloop": _version("uvloop"),
        "llmux_git_sha": sha,
        # Uncommitted (or untracked) files of the gateway under test: figures describe the
        # tree as it was, which may be ahead of the commit above.
        "llmux_uncommitted": " ".join(
            line.split()[-1] for line in dirty.splitlines() if line.strip()
        )
        or "none",
        "python_executable": sys.executable,
        **(extra or {}),
    }
