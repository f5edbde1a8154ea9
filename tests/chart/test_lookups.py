"""What the chart decides from objects it reads on the cluster with `lookup`.

Offline, `lookup` finds nothing, so the renders of the other tests never reach these branches.
Here the chart's own helpers run on objects shaped like the API's: a copy of the chart whose only
template hands them fake lookup results from values (the schema is left out, so such keys pass).
"""

from __future__ import annotations

import shutil

import helm_python as helm
import pytest
import yaml

import chartlib

PROBE = """\
{{- if eq .Values.probe "kubeApi" }}
rule: {{ include "kura.kubeApiEgress" (dict "np" .Values.networkPolicy "endpoints" .Values.endpoints) | quote }}
{{- else if eq .Values.probe "switch" }}
{{- $tenant := dict "name" "acme" "ns" "tenant-acme" }}
{{- include "kura.workloadSwitchCheck" (dict "tenant" $tenant "component" "postgres" "name" "acme-postgres" "other" .Values.other "live" .Values.live "pods" .Values.pods) }}
passed: true
{{- end }}
"""


@pytest.fixture(scope="module")
def probe_chart(tmp_path_factory) -> helm.Chart:
    root = tmp_path_factory.mktemp("probe") / "kura"
    shutil.copytree(chartlib.CHART, root)
    (root / "values.schema.json").unlink()
    for path in (root / "templates").rglob("*"):
        if path.is_file() and path.name != "_helpers.tpl":
            path.unlink()
    (root / "templates" / "probe.yaml").write_text(PROBE)
    return helm.Chart.load(str(root))


def run(chart: helm.Chart, values: dict) -> dict:
    manifests = chart.render(values, name=chartlib.RELEASE, namespace=chartlib.RELEASE_NAMESPACE)
    return yaml.safe_load(manifests["kura/templates/probe.yaml"]) or {}


# --- the API server -----------------------------------------------------------------------------


def kube_api_rule(chart, endpoints: dict, **kube_api) -> dict | None:
    values = {"probe": "kubeApi", "endpoints": endpoints}
    if kube_api:
        values["networkPolicy"] = {"kubeAPI": kube_api}
    rule = run(chart, values)["rule"]
    return yaml.safe_load(rule) if rule else None


IKS_ENDPOINTS = {
    "kind": "Endpoints",
    "metadata": {"name": "kubernetes", "namespace": "default"},
    "subsets": [{"addresses": [{"ip": "172.20.0.1"}], "ports": [{"name": "https", "port": 2040, "protocol": "TCP"}]}],
}


def test_api_server_rule_takes_address_and_port_from_the_endpoints(probe_chart):
    # IKS: the Service is 172.21.0.1:443, the policy sees the endpoint, 172.20.0.1:2040.
    assert kube_api_rule(probe_chart, IKS_ENDPOINTS) == {
        "to": [{"ipBlock": {"cidr": "172.20.0.1/32"}}],
        "ports": [{"port": 2040, "protocol": "TCP"}],
    }
    # Several API servers (a highly available control plane), the same port on each.
    ha = {"subsets": [{"addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.3"}], "ports": [{"port": 6443, "protocol": "TCP"}]}]}
    assert kube_api_rule(probe_chart, ha) == {
        "to": [{"ipBlock": {"cidr": "10.0.0.2/32"}}, {"ipBlock": {"cidr": "10.0.0.3/32"}}],
        "ports": [{"port": 6443, "protocol": "TCP"}],
    }


def test_api_server_rule_falls_back_to_the_configured_ports(probe_chart):
    # Endpoints without ports (never seen, but not ruled out): the values' list, 2040 included.
    no_ports = {"subsets": [{"addresses": [{"ip": "172.20.0.1"}]}]}
    assert kube_api_rule(probe_chart, no_ports)["ports"] == [{"port": p, "protocol": "TCP"} for p in (443, 6443, 2040)]
    # Addresses given in values: the Endpoints are not consulted, the values' ports apply.
    given = kube_api_rule(probe_chart, IKS_ENDPOINTS, cidrs=["10.0.0.1/32"], ports=[443])
    assert given == {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    # Offline: nothing found, no rule (apps with RBAC rules then reach no API server).
    assert kube_api_rule(probe_chart, {}) is None


# --- switching a database between Deployment and StatefulSet -------------------------------------


def switch(chart, other: str, live: dict, pods: list | None = None) -> dict:
    return run(chart, {"probe": "switch", "other": other, "live": live, "pods": {"items": pods or []}})


def pod(name: str, owner_kind: str, owner_name: str, phase: str = "Running") -> dict:
    """A pod as its controller makes it: a Deployment's pods are named and labelled after their
    ReplicaSet's pod-template-hash."""
    labels = {"pod-template-hash": owner_name.rsplit("-", 1)[1]} if owner_kind == "ReplicaSet" else {}
    metadata = {"name": name, "labels": labels, "ownerReferences": [{"kind": owner_kind, "name": owner_name}]}
    return {"metadata": metadata, "status": {"phase": phase}}


def test_switch_is_refused_while_the_old_workload_runs(probe_chart):
    with pytest.raises(helm.HelmRenderError, match=r"scale deployment/acme-postgres --replicas=0"):
        switch(probe_chart, "Deployment", {"spec": {"replicas": 1}, "status": {"replicas": 1}})
    # Scaled to 0 but a pod still shutting down (status.replicas lags behind spec).
    with pytest.raises(helm.HelmRenderError, match="second server"):
        switch(probe_chart, "StatefulSet", {"spec": {"replicas": 0}, "status": {"replicas": 1}})
    # Scaled to 0, counted gone, but the pod has not ended yet.
    with pytest.raises(helm.HelmRenderError, match="pod acme-postgres-7d4b9c-x2x7q"):
        switch(
            probe_chart, "Deployment", {"spec": {"replicas": 0}, "status": {}},
            [pod("acme-postgres-7d4b9c-x2x7q", "ReplicaSet", "acme-postgres-7d4b9c")],
        )
    with pytest.raises(helm.HelmRenderError, match="pod acme-postgres-0"):
        switch(probe_chart, "StatefulSet", {"spec": {"replicas": 0}}, [pod("acme-postgres-0", "StatefulSet", "acme-postgres")])


def test_switch_passes_once_the_old_workload_is_down(probe_chart):
    assert switch(probe_chart, "Deployment", {}) == {"passed": True}  # nothing to switch from
    others = [
        pod("acme-postgres-0", "StatefulSet", "acme-postgres"),  # the new kind's own pod
        pod("acme-couchdb-5f6d7c-abcde", "ReplicaSet", "acme-couchdb-5f6d7c"),
        pod("acme-postgres-exporter-6c8f9d-qwert", "ReplicaSet", "acme-postgres-exporter-6c8f9d"),  # an app
        pod("acme-postgres-7d4b9c-done1", "ReplicaSet", "acme-postgres-7d4b9c", phase="Succeeded"),
    ]
    assert switch(probe_chart, "Deployment", {"spec": {"replicas": 0}, "status": {"replicas": 0}}, others) == {"passed": True}
