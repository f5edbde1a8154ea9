"""The chart renders with the real Helm engine, lints clean, and every object it renders is valid
Kubernetes; values.schema.json turns mistakes into errors."""

from __future__ import annotations

import functools

import helm_python as helm
import pytest

import chartlib
from chartlib import KUBE_MAX, KUBE_MIN, KubeValidator, render
from conftest import MANY_TENANTS, VALUES_DIR, many_tenant_values, one_tenant_values, values_file


@functools.lru_cache(maxsize=None)
def validator(version: str) -> KubeValidator:
    return KubeValidator(version)


# The Prometheus Operator's kinds have no schema in kubernetes-validate: test_monitoring.py checks
# their structure itself.
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


# Against the oldest supported Kubernetes and the newest schemas available. The 200-tenant render
# (5,000 objects that differ from the smaller ones only in names) is checked against the oldest
# only, to keep the suite fast.
@pytest.mark.parametrize(
    "name, version",
    [(name, version) for name in ("defaults", "one", "three", "long_name", "encrypted", "managed", "monitored") for version in (KUBE_MIN, KUBE_MAX)]
    + [("many", KUBE_MIN)],
)
def test_every_object_is_valid_kubernetes(request, name, version):
    rendered = request.getfixturevalue(name)
    kubernetes = [o for o in rendered.objects if (o["apiVersion"], o["kind"]) not in OPERATOR_KINDS]
    assert len(rendered.objects) - len(kubernetes) == (2 if name == "monitored" else 0)
    errors = [e for obj in kubernetes for e in validator(version).errors(obj)]
    assert errors == []


def test_defaults_render_only_what_needs_no_tenant(defaults):
    # No tenants and Fluent Bit off: nothing is created, and NOTES says how to add a tenant.
    assert defaults.objects == []
    assert "tenants.acme" in defaults.notes


@pytest.mark.parametrize(
    "values",
    [None, one_tenant_values(), values_file("three-tenants.yaml"), values_file("encryption.yaml"), values_file("managed-services.yaml"), values_file("monitoring.yaml")],
    ids=["defaults", "one", "three", "encrypted", "managed", "monitored"],
)
def test_lint_strict_is_clean(values):
    report = chartlib.lint(values)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_many_tenants_render_every_tenant(many):
    namespaces = {o["metadata"]["name"] for o in many.of_kind("Namespace")}
    assert namespaces == {f"tenant-{name}" for name in MANY_TENANTS}
    assert len(many.of_kind("CronJob")) == 2 * len(MANY_TENANTS)  # backup + restore template


def test_every_values_file_renders():
    files = sorted(VALUES_DIR.glob("*.yaml"))
    assert files
    for path in files:
        assert render(values_file(path.name)).objects, path


def test_set_flags_address_one_tenant():
    # `helm upgrade --set tenants.acme.postgres.persistence.size=50Gi` is how a customer changes.
    values = chartlib.merge(
        many_tenant_values(["acme", "globex"]),
        helm.parse_set_string("tenants.acme.postgres.persistence.size=50Gi,tenants.globex.backup.suspend=true"),
    )
    rendered = render(values)
    assert rendered.get("PersistentVolumeClaim", "acme-postgres-data")["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert rendered.get("PersistentVolumeClaim", "globex-postgres-data")["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert rendered.get("CronJob", "globex-backup")["spec"]["suspend"] is True
    assert rendered.get("CronJob", "acme-backup")["spec"]["suspend"] is False


def schema_error(values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    return str(failure.value)


@pytest.mark.parametrize(
    "values, where",
    [
        ({"tenants": {"acme": {"postgress": {}}}}, "postgress"),
        ({"tenants": {"acme": {"backup": {"retention": {"keepDialy": 7}}}}}, "keepDialy"),
        ({"tenantDefaults": {"couchdb": {"persistence": {"sise": "5Gi"}}}}, "sise"),
        ({"objectStorage": {"bukket": "x"}}, "bukket"),
        ({"fluentBit": {"lokiUrl": "https://x"}}, "lokiUrl"),
    ],
    ids=["tenant", "retention", "defaults", "storage", "fluent-bit"],
)
def test_schema_rejects_a_misspelled_key(values, where):
    assert where in schema_error(values)


@pytest.mark.parametrize("schedule", ["0 2 * *", "every night", "0 2 * * * *", "CRON_TZ=UTC 0 2 * * *"])
def test_schema_rejects_a_bad_schedule(schedule):
    assert "schedule" in schema_error({"tenants": {"acme": {"backup": {"schedule": schedule}}}})


@pytest.mark.parametrize(
    "values, where",
    [
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"tenants": {"Acme": {}}}, "Acme"),
        ({"tenants": {"acme": {"postgres": {"podSecurityContext": {"runAsUser": 0}}}}}, "runAsUser"),
        ({"tenants": {"acme": {"backup": {"resources": {"requests": {"cpu": "1"}}}}}}, "limits"),
        ({"tenants": {"acme": {"apps": {"postgres": {"image": {"repository": "x"}}}}}}, "postgres"),
        ({"tenants": {"acme": {"restore": {"backup": "yesterday"}}}}, "backup"),
        ({"networkPolicy": {"dns": {"extraCidrs": ["169.254.20.10"]}}}, "extraCidrs"),
        ({"fluentBit": {"extraHostLogPaths": ["var/data/kubeletlogs"]}}, "extraHostLogPaths"),
    ],
    ids=["latest-tag", "tenant-name", "root", "no-limits", "reserved-app-name", "backup-id", "dns-cidr", "relative-host-path"],
)
def test_schema_rejects_unsafe_values(values, where):
    assert where in schema_error(values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tenants": {"acme": {}}}, "objectStorage.credentials"),
        (
            {"objectStorage": chartlib.STORAGE_CREDENTIALS, "tenants": {"acme": {"backup": {"retention": {"keepDaily": 0, "keepWeekly": 0, "keepMonthly": 0}}}}},
            "at least one keep rule",
        ),
        ({"objectStorage": chartlib.STORAGE_CREDENTIALS, "fluentBit": {"enabled": True}}, "fluentBit.loki.url"),
        (
            {"objectStorage": chartlib.STORAGE_CREDENTIALS, "tenants": {"acme": {"apps": {"web": {"image": {"repository": "x", "tag": "1"}}}}}},
            "readinessProbe",
        ),
        # kura refuses --globals for CouchDB (exit 2): the Job would fail every time.
        (
            {"objectStorage": chartlib.STORAGE_CREDENTIALS, "tenants": {"acme": {"restore": {"globals": True, "source": "couchdb"}}}},
            "restore.globals",
        ),
    ],
    ids=["no-credentials", "no-retention", "no-loki", "no-probe", "globals-for-couchdb"],
)
def test_templates_refuse_incomplete_values(values, message):
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    assert message in str(failure.value)
