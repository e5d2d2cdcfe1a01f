"""The deployment artefacts: the Helm chart in every mode, the plain manifests rendered
from it, the CI workflow. Rendered with Helm's own library, validated against
Kubernetes' own schemas (kubernetes-validate, strict: unknown fields fail) and GitHub's
workflow schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from llmux_extproc.control.config import parse_config
from scripts.render_deploy import CHART, MODES, ROOT, manifests, render

KUBERNETES = "1.33.0"  # the oldest release with every field the chart uses (preStop sleep)


def documents(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(values)) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    found: dict[str, Any] = doc
    return found


def llmux_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "llmux"]
    found: dict[str, Any] = container
    return found


def test_helm_lint_finds_no_errors() -> None:
    result = helm.lint(str(CHART))
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []  # above INFO


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_renders_objects_kubernetes_accepts(mode: str) -> None:
    values = {
        "mode": mode,
        "autoscaling": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
    }
    docs = documents(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    expected += ["Service"] + ([] if mode == "mesh" else ["ServiceMonitor"])
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: not in Kubernetes' schemas
            assert doc["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_validation_is_strict() -> None:
    """The check above can fail: an unknown field is refused."""
    doc = by_kind(documents({"mode": "gateway"}), "Service")
    doc["spec"]["nonsense"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("mode", MODES)
def test_the_config_map_holds_a_config_llmux_accepts(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMUX_MASTER_KEY", "sk-from-the-secret")  # envFrom in the pod
    docs = documents({"mode": mode, "drainTimeout": 30})
    text = by_kind(docs, "ConfigMap")["data"]["config.yaml"]
    config = parse_config(text)
    assert config.settings.drain_timeout_s == 30
    assert str(config.settings.runtime_dir) == "/run/llmux"  # the emptyDir, root fs read-only
    if mode == "sidecar":
        assert str(config.settings.listen) == "unix:/run/llmux-shared/llmux.sock"


@pytest.mark.parametrize("mode", MODES)
def test_pods_run_unprivileged_on_a_read_only_root(mode: str) -> None:
    docs = documents({"mode": mode})
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = llmux_container(docs)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_sigkill_never_cuts_a_drain_within_its_timeout() -> None:
    docs = documents({"mode": "gateway", "drainTimeout": 120, "preStopSeconds": 7})
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 7 + 120 + 10
    container = llmux_container(docs)
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"


def test_sidecar_shares_the_socket_directory_with_the_app() -> None:
    docs = documents({"mode": "sidecar"})
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {
        c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in pod["containers"]
    }
    assert mounts["app"]["shared"] == mounts["llmux"]["shared"] == "/run/llmux-shared"
    assert {"name": "shared", "emptyDir": {}} in pod["volumes"]
    # The Service fronts the application, not LLMux.
    service = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert "http" not in {p["name"] for p in llmux_container(docs)["ports"]}


def test_mesh_runs_only_the_processor_with_grpc_health() -> None:
    docs = documents({"mode": "mesh"})
    container = llmux_container(docs)
    assert container["image"].startswith("ghcr.io/llmux/llmux-extproc:")
    assert container["args"][:1] == ["extproc"]
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    assert by_kind(docs, "Service")["spec"]["clusterIP"] == "None"  # one DNS record per pod
    assert by_kind(docs, "Service")["spec"]["ports"] == [
        {"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "grpc"}
    ]


def test_an_unknown_mode_is_refused_by_name() -> None:
    with pytest.raises(helm.HelmError, match="mode must be gateway, sidecar or mesh"):
        render({"mode": "daemonset"})


def test_the_plain_manifests_are_the_chart_rendered() -> None:
    for path, text in manifests().items():
        assert path.read_text() == text, f"{path}: run python scripts/render_deploy.py"


def test_the_ci_workflow_is_valid_and_runs_the_readme_test_command() -> None:
    workflow = ROOT / ".github" / "workflows" / "ci.yml"
    check = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            str(workflow),
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    assert [s["run"] for s in jobs["test"]["steps"] if "run" in s] == [".ci/run"]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
