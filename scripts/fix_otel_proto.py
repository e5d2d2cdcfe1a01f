"""Reinstall opentelemetry-proto's files over xds-protos' copies.

xds-protos ships its own, older `opentelemetry/proto` (Envoy's API imports it), and
whichever wheel pip installs last owns those files: after a fresh `pip install`, the OTLP
exporters failed with `cannot import name 'InstrumentationScope'`. The newer generated code
is a superset, so Envoy's stubs keep working with it. Run by `make` (the venv) and by
deploy/Containerfile (the image) right after installing the dependencies.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def main() -> int:
    version = importlib.metadata.version("opentelemetry-proto")
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "--force-reinstall",
            "--no-deps",
            f"opentelemetry-proto=={version}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
