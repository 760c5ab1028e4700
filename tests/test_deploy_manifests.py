"""manifests/: kubectl accepts every Kubernetes object, their parts fit together, the
Prometheus config and alerts pass promtool (alerts fire when they should), every metric
they and the dashboard use is one xds-server exports, and the Envoy bootstraps are what
`xds-server bootstrap` writes and Envoy accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fake_kube import FakeKubeApiServer, write_kubeconfig
from xds_server.app.metrics import ProcessMetrics
from xds_server.lab.procs import envoy_binary
from xds_server.spec import validate_spec

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
KUBE = MANIFESTS / "kubernetes"
BOOTSTRAP = ("--admin-port", "9901", "--admin-host", "0.0.0.0", "--xds-address")
BOOTSTRAP += ("xds-server.xds-system.svc.cluster.local:18000",)


def dry_run(kubeconfig: Path) -> list[str]:
    return ["--kubeconfig", str(kubeconfig), "apply", "--dry-run=client", "--validate=false"]


def kube_objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(KUBE.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in kube_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple[FakeKubeApiServer, Path]]:
    fake = FakeKubeApiServer().start()
    yield fake, write_kubeconfig(tmp_path / "kubeconfig", {"fake": fake})
    fake.close()


def test_kubectl_client_dry_run_accepts_every_manifest(
    fake_api: tuple[FakeKubeApiServer, Path],
) -> None:
    """kubectl needs API discovery even for a client-side dry run: the fake API server
    serves it for the kinds used here (and 404 for each object, so kubectl would create
    it). --validate=false: the fake serves no OpenAPI documents; the structure is
    checked by the tests below instead."""
    fake, kubeconfig = fake_api
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make setup` installs it"
    out = subprocess.run(
        [kubectl, *dry_run(kubeconfig), "-f", str(KUBE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(kube_objects())
    assert all(line.endswith("created (dry run)") for line in lines), lines
    assert all(r.method == "GET" for r in fake.requests)  # a dry run writes nothing


def test_kubectl_dry_run_rejects_a_broken_manifest(
    tmp_path: Path, fake_api: tuple[FakeKubeApiServer, Path]
) -> None:
    """The check above can fail: an unknown kind is refused."""
    _, kubeconfig = fake_api
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deploymnet\nmetadata: {name: x}\n")
    out = subprocess.run(
        ["kubectl", *dry_run(kubeconfig), "-f", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "Deploymnet" in out.stderr


def test_the_deployment_runs_the_server_safely() -> None:
    dep = find("Deployment", "xds-server")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"xds": 18000, "admin": 18001, "metrics": 18002}
    assert c["readinessProbe"]["tcpSocket"]["port"] == "xds"
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    args = dict(a.partition("=")[::2] for a in c["args"][1:])
    assert "--insecure" in args  # off loopback, behind the NetworkPolicy (issue 30)
    assert c["args"][0] == "serve"
    for flag, port in (("xds", 18000), ("admin", 18001), ("metrics", 18002)):
        assert args[f"--{flag}-address"] == f"0.0.0.0:{port}"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert args["--spec"] == f"{mounts['spec']}/mesh.yaml"
    assert args["--state-dir"] == mounts["state"]
    assert pod["serviceAccountName"] == find("ServiceAccount", "xds-server")["metadata"]["name"]
    # the Service exposes exactly the three named container ports
    svc = find("Service", "xds-server")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert svc["spec"]["selector"].items() <= pod_labels(dep).items()


def pod_labels(dep: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = dep["spec"]["template"]["metadata"]["labels"]
    return labels


def test_the_configmaps_spec_is_valid_and_matches_the_rbac() -> None:
    cm = find("ConfigMap", "xds-server-spec")
    spec = validate_spec(yaml.safe_load(cm["data"]["mesh.yaml"]), "20-configmap.yaml")
    assert spec.istio is not None and spec.istio.apply
    assert set(spec.istio.clusters) == set(spec.regions)
    role = find("Role", "xds-server-istio-apply")
    binding = find("RoleBinding", "xds-server-istio-apply")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
    assert role["metadata"]["namespace"] == spec.istio.namespace
    assert role["rules"] == [
        {
            "apiGroups": ["networking.istio.io"],
            "resources": ["virtualservices", "destinationrules"],
            "verbs": ["get", "list", "create", "patch", "delete"],
        }
    ]
    (subject,) = binding["subjects"]
    assert (subject["kind"], subject["name"], subject["namespace"]) == (
        "ServiceAccount",
        "xds-server",
        "xds-system",
    )
    assert not [o for o in kube_objects() if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_network_policy_opens_the_three_ports_and_little_else() -> None:
    pol = find("NetworkPolicy", "xds-server")
    assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {18000, 18001, 18002}
    admin = next(r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == 18001)
    assert admin["from"] == [{"podSelector": {"matchLabels": {"xds-server/admin-client": "true"}}}]
    assert all(r.get("ports") for r in pol["spec"]["egress"])


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make setup` installs Debian's prometheus package"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, cwd=MANIFESTS / "prometheus"
    )


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((MANIFESTS / "prometheus/alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert {
        "XdsCanaryRolledBack",
        "XdsNodesNacking",
        "XdsNodesStale",
        "XdsControlPlaneDown",
        "XdsStateStoreFailing",
    } <= alerts


def exported_metric_names() -> set[str]:
    """Every series name xds-server's /metrics can have (counters: _total, ...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names = set()
    for family in ProcessMetrics.create().registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return names


def used_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(xds_[a-z_]+)\b", text))


def test_alerts_and_dashboard_use_only_metrics_xds_server_exports() -> None:
    exported = exported_metric_names()
    assert "xds_nacks_total" in exported and "xds_istio_apply_total" in exported
    rules = yaml.safe_load((MANIFESTS / "prometheus/alerts.yml").read_text())
    alerts = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    dashboard = json.loads((MANIFESTS / "grafana/xds-server-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for where, text in (("alerts.yml", alerts), ("dashboard", exprs)):
        used = used_metric_names(text)
        assert used, where
        assert used <= exported, f"{where}: not exported: {sorted(used - exported)}"
    assert used_metric_names("rate(xds_no_such_metric_total[1m])") - exported  # can fail


def test_the_dashboard_is_grafana_json_with_rollout_and_push_panels() -> None:
    dashboard = json.loads((MANIFESTS / "grafana/xds-server-dashboard.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Canary weight per region", "Pushes per region", "Push duration p99"} <= titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] and p["gridPos"]["w"] > 0 for p in dashboard["panels"])


@pytest.mark.parametrize("region", ["us-east", "eu-west", "ap-south"])
def test_envoy_bootstraps_are_current_and_accepted_by_envoy(tmp_path: Path, region: str) -> None:
    path = MANIFESTS / "envoy" / f"bootstrap-{region}.json"
    fresh = subprocess.run(
        [
            sys.executable,
            "-m",
            "xds_server.cli",
            "bootstrap",
            "--region",
            region,
            "--node-id",
            f"{region}-envoy",
            *BOOTSTRAP,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert path.read_text() == fresh, f"{path.name} is stale: regenerate it (see manifests/)"
    assert json.loads(fresh)["node"]["locality"]["region"] == region
    res = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
