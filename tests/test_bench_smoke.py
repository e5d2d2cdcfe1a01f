"""`python -m bench.run --smoke`: the benchmark runs end to end and reports figures.

No timing assertions: only that a table with numbers for bare Envoy and LLMux comes out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?")


def _table_row(markdown: str, section: str, row_start: str) -> dict[str, str]:
    """One row of a Markdown table in a `### section`, as column name -> cell."""
    body = markdown.split(f"### {section}", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(line for line in lines if line.startswith(f"| {row_start}"))
    return dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))


@pytest.mark.e2e
def test_smoke_run_reports_numbers_for_bare_envoy_and_llmux(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (md_path,) = tmp_path.glob("*.md")
    (json_path,) = tmp_path.glob("*.json")
    markdown = md_path.read_text()

    throughput = _table_row(
        markdown, "Closed-loop maximum throughput", "non-streaming, OpenAI provider"
    )
    latency = _table_row(markdown, "Latency at fixed offered rates", "non-streaming, OpenAI")
    for column in ("bare Envoy", "LLMux workers=1"):
        assert NUMBER.match(throughput[column]), (column, throughput)
    assert NUMBER.match(latency["bare Envoy p50 / p99 (ms)"]), latency
    assert NUMBER.match(latency["LLMux workers=1 p50 / p99 (ms)"]), latency

    # The failover scenario: one of two deployments fails, every request still answered.
    failover = _table_row(
        markdown, "Failover: one of two deployments answers 500", "LLMux failover, cooldowns and"
    )
    assert NUMBER.match(failover["answered req/s"]), failover
    assert failover["client error rate"] == "0.00%", failover
    assert NUMBER.match(failover["attempts on the failing deployment per request"]), failover

    data = json.loads(json_path.read_text())
    assert {"bare", "llmux-w1"} <= {run["target"] for run in data["runs"]}
    assert data["environment"]["envoy"]
    assert all("cold_start_s" in run for run in data["runs"]), data["runs"]
