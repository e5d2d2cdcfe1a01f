"""Build LLMux's two container images from `deploy/Containerfile`, with podman and no
registry (none is reachable from here, so nothing is pulled):

- the build stage's base is Debian bookworm made by `debootstrap --variant=minbase`, cached
  as a tarball under `~/.cache/llmux-image/` (`LLMUX_IMAGE_CACHE`) and imported as a local
  image, so a machine debootstraps once (~3 min) and every later build reuses it;
- podman runs with its own storage under that cache directory (so it clashes with no
  other podman user's configuration), the kernel's overlay driver (`vfs` with
  LLMUX_IMAGE_STORAGE=vfs) and `runc` (`crun` fails on this machine's cgroups);
- `--timestamp 0` makes the images reproducible: every file and the image's creation date
  are at the epoch, so the same inputs give the same image ID.

    python -m scripts.image build      # both images, tagged with the package version
    python -m scripts.image sizes      # compressed sizes (podman save | gzip -9)

`tests/test_image.py` builds through `build()` and runs the images with `podman run
--read-only`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
CACHE = Path(os.environ.get("LLMUX_IMAGE_CACHE", "~/.cache/llmux-image")).expanduser()
REGISTRY = "ghcr.io/llmux"
TARGETS = ("llmux-extproc", "llmux")
BUILD_STAGE = "localhost/llmux-build-stage:latest"  # the gateway image is built on the extproc one

# What the build stage needs on top of minbase. The final stages copy only what the
# gateway uses out of it (deploy/image/collect.py), so these never reach an image whole.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "binutils")
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class ImageError(RuntimeError):
    pass


def version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def image_name(target: str) -> str:
    return f"{REGISTRY}/{target}:{version()}"


def base_image() -> str:
    digest = hashlib.sha256(" ".join(BASE_PACKAGES).encode()).hexdigest()[:10]
    return f"localhost/llmux-build-base:bookworm-{digest}"


# overlay (the kernel's, as root) where it works: vfs copies every layer whole for each
# step and each intermediate container, which made a fully cached build take ~100 s
# instead of ~15 s here. LLMUX_IMAGE_STORAGE=vfs is the fallback (always works).
STORAGE_DRIVER = os.environ.get("LLMUX_IMAGE_STORAGE", "overlay")


def podman(*args: str) -> list[str]:
    # One storage root per driver: podman refuses a root made with another driver.
    return [
        "podman",
        "--root",
        str(CACHE / f"storage-{STORAGE_DRIVER}"),
        "--runroot",
        str(CACHE / f"runroot-{STORAGE_DRIVER}"),
        "--storage-driver",
        STORAGE_DRIVER,
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        *args,
    ]


def ulimits() -> list[str]:
    """`podman run` flags for resource limits this host lets a container have.

    Without them podman 4.3 asks runc for RLIMIT_NOFILE 1048576 (even with `--ulimit
    host`), above this sandbox's hard limit, and root here lacks CAP_SYS_RESOURCE, so
    runc fails with "error setting rlimit type 7: operation not permitted". NPROC at the
    host's hard limit (96362) failed the same way; 32768 (podman's usual value) works."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def kube_env() -> dict[str, str]:
    """Environment for `podman kube play`, which has no --ulimit flag: the same limits as
    ulimits(), through a containers.conf of our own (CONTAINERS_CONF)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def cannot_run_containers() -> str | None:
    """Why this host cannot build and run images, with how to fix it; None when it can."""
    missing = [t for t in ("podman", "debootstrap", "runc") if shutil.which(t) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed: run `sh scripts/setup-system.sh` as root "
            "(make test does)"
        )
    if os.geteuid() != 0:
        return "building the base with debootstrap and podman's vfs storage needs root"
    probe = run(podman("info", "--format", "{{.Host.OCIRuntime.Name}}"), capture_output=True)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-500:]}"
    return None


def _rootfs_tarball() -> Path:
    """Debian bookworm minbase + BASE_PACKAGES as a tarball, made once per package list."""
    tag = base_image().rsplit("-", 1)[1]
    tarball = CACHE / f"bookworm-minbase-{tag}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"rootfs-{tag}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    print(f"image: debootstrap bookworm into {work} (once per machine) ...", flush=True)
    proc = run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(work),
            DEBIAN_MIRROR,
        ],
        capture_output=True,
    )
    if proc.returncode != 0:
        raise ImageError(f"debootstrap failed: {(proc.stdout + proc.stderr)[-2000:]}")
    # Downloaded .debs and apt lists would only make the base layer bigger.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (work / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    partial = tarball.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        tar.add(work, arcname=".")
    partial.rename(tarball)
    shutil.rmtree(work, ignore_errors=True)
    print(f"image: base rootfs in {time.monotonic() - started:.0f} s", flush=True)
    return tarball


def ensure_base() -> str:
    name = base_image()
    if run(podman("image", "exists", name)).returncode == 0:
        return name
    tarball = _rootfs_tarball()
    proc = run(podman("import", str(tarball), name), capture_output=True)
    if proc.returncode != 0:
        raise ImageError(f"podman import failed: {proc.stderr.strip()[-2000:]}")
    return name


def host_ca_bundle() -> str:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")):
        if candidate and os.path.isfile(candidate):
            return candidate
    return "/etc/ssl/certs/ca-certificates.crt"


def build(targets: tuple[str, ...] = TARGETS, quiet: bool = False) -> dict[str, str]:
    """Build the images (cached layers reused); returns target -> image name."""
    base = ensure_base()
    names: dict[str, str] = {}
    # The build stage is tagged too, so that pruning below keeps its layers (the pip
    # install of the dependencies above all) as the cache of the next build, while the
    # layers of earlier sources, untagged now, go: without this the store grew by ~1 GB
    # for every source change.
    for target in ("build", *targets):
        name = BUILD_STAGE if target == "build" else image_name(target)
        cmd = podman(
            "build",
            "--layers",
            "--timestamp",
            "0",
            "--network",
            "host",  # pip reaches PyPI from the build stage; no CNI bridge needed
            "--build-arg",
            f"BASE={base}",
            # pip in the build stage trusts what pip on the host trusts (a proxy's CA
            # here); mounted, not copied, so it reaches no image.
            "--volume",
            f"{host_ca_bundle()}:/mnt/build-ca.crt:ro",
            "--build-arg",
            "PIP_CERT=/mnt/build-ca.crt",
            "--target",
            target,
            "--tag",
            name,
            "--file",
            str(CONTAINERFILE),
            str(ROOT),
        )
        proc = run(cmd, capture_output=quiet)
        if proc.returncode != 0:
            tail = (proc.stdout or "")[-3000:] + (proc.stderr or "")[-2000:] if quiet else ""
            raise ImageError(f"podman build --target {target} failed{': ' + tail if tail else ''}")
        if target != "build":
            names[target] = name
    run(podman("image", "prune", "--force"), capture_output=True)
    return names


def compressed_size(name: str) -> int:
    """Bytes of `podman save` of the image through gzip -9: what a registry would store
    (its layers compressed), give or take the manifest."""
    proc = subprocess.Popen(podman("save", "--format", "oci-archive", name), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    counter = _Counter()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=9, mtime=0) as gz:
        shutil.copyfileobj(proc.stdout, gz, 1 << 20)
    if proc.wait() != 0:
        raise ImageError(f"podman save {name} failed")
    return counter.size


class _Counter:
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def uncompressed_size(name: str) -> int:
    proc = run(podman("image", "inspect", "--format", "{{.Size}}", name), capture_output=True)
    return int(proc.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "sizes", "base"])
    args = parser.parse_args()
    why = cannot_run_containers()
    if why:
        print(f"image: {why}", file=sys.stderr)
        return 1
    try:
        if args.command == "base":
            print(ensure_base())
        elif args.command == "build":
            started = time.monotonic()
            for target, name in build().items():
                print(f"image: {target}: {name}")
            print(f"image: built in {time.monotonic() - started:.1f} s")
        else:
            for target in TARGETS:
                name = image_name(target)
                print(
                    f"{name}: {compressed_size(name) / 1e6:.1f} MB compressed, "
                    f"{uncompressed_size(name) / 1e6:.1f} MB uncompressed"
                )
    except ImageError as e:
        print(f"image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
