"""Per-process CPU and memory from /proc: utime+stime deltas, VmHWM and VmRSS."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Proc:
    """One process the benchmark watches, with the role it plays (envoy, extproc, ...)."""

    pid: int
    role: str


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Field 2 (comm) may contain spaces; fields after the closing parenthesis are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def descendants(pid: int) -> list[int]:
    """All live descendants of a process, found through each process's parent pid."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return sorted(found)


def system_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / CLOCK_TICKS


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a process (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_by_role(procs: list[Proc]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in procs:
        out[p.role] = out.get(p.role, 0.0) + cpu_seconds(p.pid)
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: max(0.0, after.get(role, 0.0) - before.get(role, 0.0)) for role in after}


def memory(procs: list[Proc]) -> list[dict[str, object]]:
    """Peak and current RSS of each process, in MiB."""
    return [
        {
            "role": p.role,
            "pid": p.pid,
            "peak_rss_mib": round(peak_rss_kib(p.pid) / 1024, 1),
            "rss_mib": round(rss_kib(p.pid) / 1024, 1),
        }
        for p in procs
    ]


def rss_by_role(procs: list[Proc]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in procs:
        out[p.role] = out.get(p.role, 0.0) + rss_kib(p.pid) / 1024
    return {k: round(v, 1) for k, v in out.items()}
