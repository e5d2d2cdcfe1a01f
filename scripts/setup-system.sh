#!/usr/bin/env bash
# System packages the tests need that pip cannot bring: Debian's Prometheus (the server
# and promtool), which tests/test_e2e_prometheus.py runs against a live LLMux and which
# checks deploy/prometheus/ rules. Does nothing when they are already installed.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
as_root=()
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "setup-system: prometheus/promtool missing; install Debian's 'prometheus' package as root" >&2
        exit 1
    fi
    as_root=(sudo)
fi
echo "setup-system: installing Debian's prometheus package (server and promtool)"
"${as_root[@]}" apt-get update -qq
# --no-install-recommends: the server binary and promtool, without the node exporter.
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus
