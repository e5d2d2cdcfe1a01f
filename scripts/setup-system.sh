#!/bin/sh
# Debian packages the tests need, installed by the project itself (nothing by hand):
# Prometheus (the server and promtool: tests/test_e2e_prometheus.py and the rule checks)
# and what builds and runs the images (tests/test_image.py).
# Idempotent and quick when everything is present: dpkg is asked first, apt only
# for what is missing. One list so helpers' additions merge as lines.
set -eu

PACKAGES="
prometheus
podman
buildah
runc
debootstrap
uidmap
fuse-overlayfs
slirp4netns
catatonit
"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

as_root=""
if [ "$(id -u)" -ne 0 ]; then
    # A CI runner's user (GitHub's) has password-less sudo; a developer without it is told.
    if sudo -n true 2>/dev/null; then
        as_root="sudo -n"
    else
        echo "setup-system: missing Debian packages:$missing (as root: apt-get install -y --no-install-recommends$missing)" >&2
        exit 1
    fi
fi
echo "setup-system: installing$missing"
$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# shellcheck disable=SC2086
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
