"""The container images, built (cached layers reused: ~2 min cold after the one-time
debootstrap, seconds warm) and run for real with podman, as Kubernetes would run them: a
read-only root filesystem, only /run/llmux and /tmp writable, uid 10001.

A host where podman cannot run fails here, saying how to fix it (scripts/setup-system.sh,
which `make test` runs): never a silent skip.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import httpx2
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scripts import image
from tests.harness import free_port

pytestmark = pytest.mark.e2e

# Generous: CI is a loaded 2-core machine; podman on vfs adds its own seconds.
READY_WITHIN = 60.0


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    why = image.cannot_run_containers()
    if why:
        pytest.fail(f"cannot build or run container images: {why}")
    started = time.monotonic()
    names = image.build(quiet=True)
    print(f"\nimages built (cache reused where it could be) in {time.monotonic() - started:.1f} s")
    return names


def podman_run(name: str, *args: str, ports: dict[int, int] | None = None) -> str:
    """Start a container the way the Helm chart runs one; returns its id."""
    cmd = image.podman(
        "run",
        "--detach",
        *image.ulimits(),
        "--read-only",
        "--read-only-tmpfs=false",  # only what the chart mounts is writable
        "--mount",
        "type=tmpfs,destination=/run/llmux,chown",
        "--mount",
        "type=tmpfs,destination=/tmp,chown",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    )
    for host, inside in (ports or {}).items():
        cmd += ["--publish", f"127.0.0.1:{host}:{inside}"]
    proc = subprocess.run([*cmd, name, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"podman run {name} failed: {proc.stderr}"
    return proc.stdout.strip()


def logs(cid: str) -> str:
    proc = subprocess.run(image.podman("logs", cid), capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr


def exec_python(cid: str, code: str) -> subprocess.CompletedProcess[str]:
    # The image's own Python: there is no shell to exec.
    return subprocess.run(
        image.podman("exec", cid, "/opt/llmux/bin/python", "-c", code),
        capture_output=True,
        text=True,
        check=False,
    )


@contextlib.contextmanager
def container(name: str, *args: str, ports: dict[int, int] | None = None) -> Iterator[str]:
    cid = podman_run(name, *args, ports=ports)
    try:
        yield cid
    finally:
        subprocess.run(image.podman("rm", "--force", "--time", "5", cid), capture_output=True)


def wait_ready(url: str, cid: str) -> float:
    """Seconds until `url` first answered 200."""
    started = time.monotonic()
    while time.monotonic() - started < READY_WITHIN:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"{url} not ready in {READY_WITHIN:.0f} s; container log:\n{logs(cid)[-4000:]}")


def test_gateway_image_read_only_answers_the_openai_sdk(images: dict[str, str]) -> None:
    port = free_port()
    with container(images["llmux"], ports={port: 4000}) as cid:
        waited = wait_ready(f"http://127.0.0.1:{port}/health/ready", cid)
        ready_line = next(
            (line for line in logs(cid).splitlines() if "LLMux ready on 0.0.0.0:4000" in line), ""
        )
        print(f"\nfirst 200 from the host {waited:.2f} s after podman run; {ready_line}")

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything")
        reply = client.chat.completions.create(
            model="llmux-mock", messages=[{"role": "user", "content": "hello from a container"}]
        )
        assert reply.choices[0].message.content == (
            "This is a mock response from LLMux to: hello from a container"
        )
        assert reply.usage is not None and reply.usage.prompt_tokens > 0

        stream = client.chat.completions.create(
            model="llmux-mock",
            messages=[{"role": "user", "content": "stream it"}],
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "This is a mock response from LLMux to: stream it"

        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        assert isinstance(err.value.body, dict) and "no-such-model" in err.value.body["message"]

        # Non-root, read-only, no shell: checked inside the running container.
        probe = exec_python(
            cid,
            "import os\n"
            "print(os.getuid(), os.getgid())\n"
            "try:\n    open('/opt/llmux/x', 'w')\nexcept OSError as e:\n    print(e.errno)\n"
            "print(os.path.exists('/bin/sh'), os.path.exists('/usr/bin/apt-get'))\n",
        )
        assert probe.stdout.split() == ["10001", "10001", "30", "False", "False"], probe


def test_extproc_image_serves_grpc_health_read_only(images: dict[str, str]) -> None:
    port = free_port()
    with container(images["llmux-extproc"], ports={port: 50051}) as cid:
        started = time.monotonic()
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - started < READY_WITHIN:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    break
                except grpc.RpcError:
                    time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING, logs(cid)[-4000:]
        print(f"\nextproc SERVING {time.monotonic() - started:.2f} s after podman run")
        # The processor alone: no Envoy in this image.
        probe = exec_python(
            cid,
            "import os, llmux_extproc.control.envoy_binary as e\n"
            "try:\n    e.find_envoy()\nexcept e.EnvoyNotFound:\n    print('no envoy')\n"
            "print(os.getuid())\n",
        )
        assert probe.stdout.split() == ["no", "envoy", "10001"], probe


def test_kube_play_runs_the_gateway_manifest(images: dict[str, str], tmp_path: Path) -> None:
    """deploy/k8s/gateway.yaml as rendered from the chart, run as a pod by `podman kube
    play` with the built image: its ConfigMap mounted, its security context (uid 10001,
    read-only root, the emptyDirs), its probes. Changed only where a single host differs
    from a cluster: one replica, a hostPort to reach it, and the Secret's master key as a
    plain env var (podman 4.3 reads `envFrom: secretRef` from its own secret store, in a
    format of its own)."""
    port = free_port()
    master = "sk-kube-play-test"
    docs = [
        d for d in yaml.safe_load_all((image.ROOT / "deploy/k8s/gateway.yaml").read_text()) if d
    ]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 1
    (pod_container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert pod_container["image"] == images["llmux"]
    assert pod_container.pop("envFrom") == [{"secretRef": {"name": "llmux-secrets"}}]
    pod_container["env"] = [{"name": "LLMUX_MASTER_KEY", "value": master}]
    http = next(p for p in pod_container["ports"] if p["containerPort"] == 4000)
    http.update(hostPort=port, hostIP="127.0.0.1")
    manifest = tmp_path / "gateway.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))

    env = image.kube_env()
    play = subprocess.run(
        image.podman("kube", "play", "--replace", str(manifest)),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        assert play.returncode == 0, play.stderr
        pod_name = "llmux-pod-0-llmux"
        waited = wait_ready(f"http://127.0.0.1:{port}/health/ready", pod_name)
        print(f"\nkube play pod ready {waited:.2f} s after the pod started")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=master)
        reply = client.chat.completions.create(
            model="llmux-mock", messages=[{"role": "user", "content": "from a pod"}]
        )
        assert (
            reply.choices[0].message.content == "This is a mock response from LLMux to: from a pod"
        )
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong")
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(
                model="llmux-mock", messages=[{"role": "user", "content": "x"}]
            )
        user = subprocess.run(
            image.podman("inspect", "--format", "{{.Config.User}}", pod_name),
            capture_output=True,
            text=True,
            check=False,
        )
        assert user.stdout.strip().startswith("10001"), user
    finally:
        subprocess.run(
            image.podman("kube", "down", str(manifest)), capture_output=True, env=env, check=False
        )


def test_kube_play_runs_the_sidecar_manifest(images: dict[str, str], tmp_path: Path) -> None:
    """deploy/k8s/sidecar.yaml: LLMux beside an application in one pod, listening on a Unix
    socket in the shared emptyDir. The application is a stand-in (the extproc image's
    Python, idle); the OpenAI SDK reaches the socket through the emptyDir's directory on
    the host, where the application's container would."""
    master = "sk-kube-play-sidecar"
    docs = [
        d for d in yaml.safe_load_all((image.ROOT / "deploy/k8s/sidecar.yaml").read_text()) if d
    ]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 1
    app, llmux = deployment["spec"]["template"]["spec"]["containers"]
    assert (app["name"], llmux["name"], llmux["image"]) == ("app", "llmux", images["llmux"])
    app.update(
        image=images["llmux-extproc"],
        command=["/opt/llmux/bin/python", "-c", "import time; time.sleep(3600)"],
    )
    llmux.pop("envFrom")
    llmux["env"] = [{"name": "LLMUX_MASTER_KEY", "value": master}]
    manifest = tmp_path / "sidecar.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))

    env = image.kube_env()
    play = subprocess.run(
        image.podman("kube", "play", "--replace", str(manifest)),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        assert play.returncode == 0, play.stderr
        mounts = subprocess.run(
            image.podman(
                "inspect",
                "--format",
                '{{range .Mounts}}{{.Destination}}={{.Source}}{{"\\n"}}{{end}}',
                "llmux-pod-0-llmux",
            ),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        shared = dict(line.split("=", 1) for line in mounts.split())["/run/llmux-shared"]
        sock = Path(shared) / "llmux.sock"
        started = time.monotonic()
        while not sock.exists() and time.monotonic() - started < READY_WITHIN:
            time.sleep(0.05)
        assert sock.exists(), logs("llmux-pod-0-llmux")[-4000:]
        # openai 3.x takes an httpx2 client (its fork of httpx), which has the same UDS
        # transport.
        client = openai.OpenAI(
            base_url="http://llmux/v1",
            api_key=master,
            http_client=openai.DefaultHttpxClient(transport=httpx2.HTTPTransport(uds=str(sock))),
        )
        reply = None
        while reply is None and time.monotonic() - started < READY_WITHIN:
            try:
                reply = client.chat.completions.create(
                    model="llmux-mock", messages=[{"role": "user", "content": "over the socket"}]
                )
            except openai.APIConnectionError:
                time.sleep(0.1)
            except openai.InternalServerError:  # 503 while the workers come up
                time.sleep(0.1)
        assert reply is not None, logs("llmux-pod-0-llmux")[-4000:]
        assert reply.choices[0].message.content == (
            "This is a mock response from LLMux to: over the socket"
        )
    finally:
        subprocess.run(
            image.podman("kube", "down", str(manifest)), capture_output=True, env=env, check=False
        )


def test_kube_play_runs_the_mesh_manifest(images: dict[str, str], tmp_path: Path) -> None:
    """deploy/k8s/mesh.yaml: the processor alone (llmux-extproc image) as a pod, serving
    grpc.health.v1 on 50051 (what the platform's Envoy and the kubelet's gRPC probe ask)."""
    port = free_port()
    docs = [d for d in yaml.safe_load_all((image.ROOT / "deploy/k8s/mesh.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 1
    (proc,) = deployment["spec"]["template"]["spec"]["containers"]
    assert proc["image"] == images["llmux-extproc"]
    proc.pop("envFrom")
    proc["env"] = [{"name": "LLMUX_MASTER_KEY", "value": "sk-mesh"}]
    grpc_port = next(p for p in proc["ports"] if p["containerPort"] == 50051)
    grpc_port.update(hostPort=port, hostIP="127.0.0.1")
    manifest = tmp_path / "mesh.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))

    env = image.kube_env()
    play = subprocess.run(
        image.podman("kube", "play", "--replace", str(manifest)),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        assert play.returncode == 0, play.stderr
        started = time.monotonic()
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while status is None and time.monotonic() - started < READY_WITHIN:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                except grpc.RpcError:
                    time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING, logs("llmux-pod-0-llmux")[-4000:]
    finally:
        subprocess.run(
            image.podman("kube", "down", str(manifest)), capture_output=True, env=env, check=False
        )
