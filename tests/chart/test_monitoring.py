"""Monitoring (values `monitoring`, tenants' backup.pushgateway and backup.notify): the exporter's
Deployment, Service, credentials and NetworkPolicy; the ServiceMonitor and PrometheusRule, whose
structure and PromQL are checked here (kubernetes-validate has no schemas for the Prometheus
Operator's kinds), and with promtool where there is one (its check, and its tests of the alerts
over time); the backup-age limits against an independent reading of the cron schedules;
the metrics and ping variables of the Jobs and the egress they get. tests/chart/values/monitoring.yaml
is the main render; the rest varies one tenant."""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import shutil
import subprocess

import helm_python as helm
import pytest
import yaml

import chartlib
from chartlib import Endpoint, connection_allowed, container, pod_templates, render, resolve_env
from conftest import one_tenant_values, values_file
from test_structure import restricted_violations

NS = chartlib.RELEASE_NAMESPACE
EXPORTER = "kura-exporter"
READER = {"accessKeyId": "reader-access-key-id", "secretAccessKey": "reader-secret-access-key"}
# tests/chart/values/monitoring.yaml
PUSHGATEWAY_URL = "http://prometheus-pushgateway.monitoring.svc:9091"
ACME_PING = "https://hc-ping.com/3f0c8d2e-5b7a-4c1e-9a6d-2b8e4f1a7c90"
PING_ADDRESS = "104.21.3.4"  # in acme's and globex's backup.notify.egress
ACME_ONLY_PING_ADDRESS = "172.67.3.4"  # in acme's only
ICOS_ADDRESS = "161.26.0.10"

MONITORING_NS = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = Endpoint.pod("monitoring", {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"}, MONITORING_NS)
GRAFANA = Endpoint.pod("monitoring", {"app.kubernetes.io/name": "grafana"}, MONITORING_NS)
PUSHGATEWAY = Endpoint.pod("monitoring", {"app.kubernetes.io/name": "prometheus-pushgateway"}, MONITORING_NS)
KUBE_DNS = Endpoint.pod("kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})

# The series kura writes (the contract of issue 14): the exporter's and each run's.
EXPORTER_SERIES = {
    "kura_backup_last_complete_timestamp_seconds",
    "kura_backup_last_complete_bytes",
    "kura_backups_complete",
    "kura_backups_incomplete",
    "kura_backup_oldest_complete_timestamp_seconds",
    "kura_exporter_scrape_errors_total",
    "kura_exporter_last_refresh_timestamp_seconds",
}
RUN_SERIES = {
    "kura_last_run_timestamp_seconds",
    "kura_last_success_timestamp_seconds",
    "kura_last_run_success",
    "kura_last_run_duration_seconds",
    "kura_last_run_exit_code",
    "kura_backup_stored_bytes",
    "kura_backup_raw_bytes",
    "kura_backup_parts",
    "kura_prune_deleted_backups",
    "kura_prune_kept_backups",
}
# The chart's own recording: when Prometheus started watching a tenant's source.
WATCHED = "kura:backup_source_watched_since_timestamp_seconds"
RECORDED_SERIES = {WATCHED}
SERIES_LABELS = {"tenant", "source", "operation"}
RUN_ENV = {"KURA_PUSHGATEWAY_URL", "KURA_NOTIFY_URL"}
STORAGE_SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "IBM_API_KEY_ID"}
# Prometheus' own duration syntax (the Prometheus Operator's CRDs use the same pattern).
PROM_DURATION = re.compile(r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env") or []}


def with_monitoring(values: dict | None = None, **monitoring) -> dict:
    """One tenant, and the exporter with reader credentials plus whatever `monitoring` adds."""
    base = chartlib.merge(one_tenant_values(), {"monitoring": {"exporter": {"enabled": True, "credentials": READER}}})
    base = chartlib.merge(base, {"monitoring": monitoring})
    return chartlib.merge(base, values or {})


def with_rules(values: dict | None = None, **rules) -> dict:
    return with_monitoring(values, rules={"enabled": True, **rules})


def render_error(values: dict) -> str:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    return str(failure.value)


def schema_error(values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    return str(failure.value)


def exporter_template(rendered) -> chartlib.PodTemplate:
    (t,) = [t for t in pod_templates(rendered.objects) if t.labels.get("app.kubernetes.io/component") == "exporter"]
    return t


def template_named(rendered, name: str) -> chartlib.PodTemplate:
    (t,) = [t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == name]
    return t


def pod(rendered, name: str) -> Endpoint:
    t = template_named(rendered, name)
    return Endpoint.pod(t.namespace, t.labels, {"kubernetes.io/metadata.name": t.namespace})


def exporter_pod(rendered) -> Endpoint:
    t = exporter_template(rendered)
    return Endpoint.pod(t.namespace, t.labels, {"kubernetes.io/metadata.name": t.namespace})


def alert_rules(rendered) -> list[dict]:
    return [r for g in rendered.get("PrometheusRule", "kura")["spec"]["groups"] for r in g["rules"] if "alert" in r]


def recording_rules(rendered) -> list[dict]:
    return [r for g in rendered.get("PrometheusRule", "kura")["spec"]["groups"] for r in g["rules"] if "record" in r]


def age_rules(rendered) -> dict[tuple[str, str], list[dict]]:
    """(tenant, source) → the two KuraBackupTooOld rules, the age one first."""
    found: dict[tuple[str, str], list[dict]] = {}
    for r in alert_rules(rendered):
        if r["alert"] == "KuraBackupTooOld":
            found.setdefault((r["labels"]["tenant"], r["labels"]["source"]), []).append(r)
    return found


def age_limit(rendered, tenant: str = "acme", source: str = "postgres") -> int:
    age, _ = age_rules(rendered)[(tenant, source)]
    return int(re.fullmatch(r".* > (\d+)", age["expr"]).group(1))


# --- PromQL, as far as a test can read it without Prometheus -------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>[0-9]+(?:\.[0-9]+)?)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<range>\[[0-9]+(?:ms|[smhdwy])\])
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=(){},])
    )""",
    re.X,
)
FUNCTIONS = {"time", "vector", "absent", "increase", "rate", "max", "min", "sum", "count", "avg"} | {
    "max_over_time", "min_over_time", "absent_over_time"}
AGGREGATIONS = {"max", "min", "sum", "count", "avg"}
GROUPING = {"by", "without", "on", "ignoring"}
SET_OPERATORS = {"and", "or", "unless"}


def promql_series(expr: str) -> set[str]:
    """Tokenises a PromQL expression and checks what a reader can: brackets balance, label matchers
    are `name op "string"` pairs, grouping clauses list label names, a range follows a selector,
    and every name is a known function, keyword or kura series. Returns the series it names."""
    assert "{{" not in expr and "}}" not in expr, f"template text in {expr!r}"
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m and m.end() > pos, f"cannot read {expr[pos:]!r} in {expr!r}"
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
        if not expr[pos:].strip():
            break
    series: set[str] = set()
    depth = 0
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in GROUPING:
            assert nxt == ("op", "("), f"{text} without a label list in {expr!r}"
            i += 2
            while tokens[i] != ("op", ")"):
                assert tokens[i][0] == "ident" and LABEL_NAME.match(tokens[i][1]), f"bad label list in {expr!r}"
                assert tokens[i][1] in SERIES_LABELS, f"{tokens[i][1]} is not a label of kura's series"
                i += 1
                if tokens[i] == ("op", ","):
                    i += 1
            i += 1
            continue
        if kind == "ident" and text in SET_OPERATORS:
            pass
        elif kind == "ident" and nxt == ("op", "("):
            assert text in FUNCTIONS, f"unknown function {text} in {expr!r}"
        elif kind == "ident" and text in AGGREGATIONS and nxt[0] == "ident" and nxt[1] in GROUPING:
            pass  # max by (…) (…)
        elif kind == "ident":
            assert text in EXPORTER_SERIES | RUN_SERIES | RECORDED_SERIES, f"{text} is not a series kura writes ({expr!r})"
            series.add(text)
            if nxt == ("op", "{"):
                i += 2
                while True:
                    name, op, value = tokens[i], tokens[i + 1], tokens[i + 2]
                    assert name[0] == "ident" and name[1] in SERIES_LABELS, f"bad matcher in {expr!r}"
                    assert op[1] in ("=", "!=", "=~", "!~") and value[0] == "string", f"bad matcher in {expr!r}"
                    i += 3
                    if tokens[i] == ("op", "}"):
                        break
                    assert tokens[i] == ("op", ","), f"bad matchers in {expr!r}"
                    i += 1
            if i + 1 < len(tokens) and tokens[i + 1][0] == "range":
                i += 1
        elif kind == "range":
            raise AssertionError(f"a range that follows no selector in {expr!r}")
        elif (kind, text) == ("op", "("):
            depth += 1
        elif (kind, text) == ("op", ")"):
            depth -= 1
            assert depth >= 0, f"unbalanced parentheses in {expr!r}"
        elif kind == "op" and text in "{}":
            raise AssertionError(f"a brace outside a selector in {expr!r}")
        i += 1
    assert depth == 0, f"unbalanced parentheses in {expr!r}"
    assert series, f"{expr!r} reads no kura series"
    return series


def test_the_promql_reader_catches_mistakes():
    assert promql_series('time() - max by (tenant, source) (kura_backup_last_complete_timestamp_seconds{tenant="a",source="b"}) > 1') == {
        "kura_backup_last_complete_timestamp_seconds"
    }
    assert promql_series("increase(kura_exporter_scrape_errors_total[30m]) > 0") == {"kura_exporter_scrape_errors_total"}
    for bad in (
        "time() - (kura_backups_complete > 1",
        "kura_backups_complete) > 1",
        "kura_backup_age_seconds > 1",
        'kura_backups_complete{tenant=acme} == 0',
        'kura_backups_complete{namespace="x"} == 0',
        "max by (instance) (kura_backups_complete)",
        "frobnicate(kura_backups_complete)",
        "time() > 0",
        "kura_backups_complete > {{ $value }}",
    ):
        with pytest.raises(AssertionError):
            promql_series(bad)


ANNOTATION_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def check_prometheus_rule(obj: dict) -> None:
    """The PrometheusRule as the Prometheus Operator's CRD and Prometheus' rule files define it."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert obj["metadata"]["namespace"] == NS and obj["metadata"]["name"]
    assert set(obj["spec"]) == {"groups"}
    groups = obj["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    # Two rules whose alerts carry the same name and labels would share their ALERTS series
    # (promtool check rules refuses them as duplicates).
    identities = [(r.get("alert") or r["record"], tuple(sorted(r["labels"].items()))) for g in groups for r in g["rules"]]
    assert len(set(identities)) == len(identities)
    for group in groups:
        assert set(group) == {"name", "rules"}, group.keys()
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            if "record" in rule:
                where = f"{group['name']}/{rule['record']}"
                assert set(rule) == {"record", "expr", "labels"}, where
                assert rule["record"] in RECORDED_SERIES and promql_series(rule["expr"]) == {rule["record"]}, where
                assert set(rule["labels"]) == {"tenant", "source"} and all(isinstance(v, str) for v in rule["labels"].values()), where
                continue
            where = f"{group['name']}/{rule.get('alert')}"
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, where
            assert LABEL_NAME.match(rule["alert"]), where
            assert "alertname" not in rule["labels"], where
            assert isinstance(rule["expr"], str) and promql_series(rule["expr"]), where
            assert isinstance(rule["for"], str) and PROM_DURATION.match(rule["for"]), where
            assert rule["labels"]["severity"] in ("critical", "warning"), where
            for name, value in rule["labels"].items():
                assert LABEL_NAME.match(name) and isinstance(value, str), where
            assert set(rule["annotations"]) == {"summary", "description"}, where
            for text in rule["annotations"].values():
                assert isinstance(text, str) and text, where
                assert text.count("{{") == text.count("}}"), where
                for reference in ANNOTATION_TEMPLATE.findall(text):
                    assert reference in ("$value", "$value | humanizeDuration") or reference in {
                        f"$labels.{label}" for label in SERIES_LABELS
                    }, (where, reference)


def check_service_monitor(obj: dict, service: dict) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert obj["metadata"]["namespace"] == NS
    spec = obj["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert chartlib.selector_matches(spec["selector"], service["metadata"]["labels"])
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
        assert PROM_DURATION.match(endpoint["interval"]) and PROM_DURATION.match(endpoint["scrapeTimeout"])


# --- off by default -------------------------------------------------------------------------------


def test_nothing_of_monitoring_renders_by_default(one, three, managed, encrypted):
    for rendered in (one, three, managed, encrypted):
        assert not [o for o in rendered.objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
        assert not [o for o in rendered.objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "exporter"]
        assert not [o for o in rendered.objects if re.search(r"-(notify|pushgateway-clients|notify-clients)$", o["metadata"]["name"])]
        for t in pod_templates(rendered.objects):
            assert t.owner["metadata"].get("namespace") != NS or t.labels["app.kubernetes.io/component"] == "fluent-bit", t.where
            for c in t.containers():
                assert not RUN_ENV & set(env_of(c)), t.where
            assert not {"kura.io/pushgateway-client", "kura.io/notify-client"} & set(t.labels), t.where
        assert "exporter" not in rendered.notes


def test_the_defaults_stated_explicitly_change_nothing():
    fixed = chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"postgres": {"auth": {"password": "p"}}, "couchdb": {"enabled": False}}}})
    stated = chartlib.merge(fixed, {
        "monitoring": {"exporter": {"enabled": False}, "serviceMonitor": {"enabled": False}, "rules": {"enabled": False}},
        "tenantDefaults": {"backup": {"pushgateway": {"url": ""}, "notify": {"existingSecret": "", "url": "", "key": "url"}}},
    })
    assert render(stated).objects == render(fixed).objects


# --- the exporter ---------------------------------------------------------------------------------


def test_exporter_objects_live_in_the_release_namespace(monitored):
    own = {(o["kind"], o["metadata"]["name"]) for o in monitored.in_namespace(NS) if o["metadata"]["labels"]["app.kubernetes.io/component"] in ("exporter", "network-policy", "alerts")}
    assert own == {
        ("ServiceAccount", EXPORTER),
        ("Secret", EXPORTER),
        ("Deployment", EXPORTER),
        ("Service", EXPORTER),
        ("NetworkPolicy", EXPORTER),
        ("ServiceMonitor", EXPORTER),
        ("PrometheusRule", "kura"),
    }
    # Nothing of it in any tenant namespace.
    assert not [o for o in monitored.objects if o["metadata"].get("namespace") != NS and o["metadata"]["labels"]["app.kubernetes.io/component"] == "exporter"]


def test_exporter_pod_is_restricted_and_probed(monitored):
    t = exporter_template(monitored)
    deployment = monitored.get("Deployment", EXPORTER, NS)
    assert deployment["spec"]["replicas"] == 1
    assert restricted_violations(t) == []
    assert t.spec["automountServiceAccountToken"] is False
    assert t.spec["serviceAccountName"] == EXPORTER
    sa = monitored.get("ServiceAccount", EXPORTER, NS)
    assert sa["automountServiceAccountToken"] is False
    assert sa["imagePullSecrets"] == [{"name": "all-icr-io"}]
    (c,) = t.spec["containers"]
    backup = container(template_named(monitored, "acme-backup"), "kura")
    assert c["image"] == backup["image"] and c["command"] == ["/usr/local/bin/kura"]
    assert c["args"] == ["exporter", "--listen", "0.0.0.0:9187", "--interval", "5m"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9187, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert [v for v in t.spec["volumes"] if "secret" in v] == []


def test_exporter_reads_every_tenant_with_its_own_credentials(monitored):
    t = exporter_template(monitored)
    (c,) = t.spec["containers"]
    env = env_of(c)
    # Every tenant under the prefix: no KURA_TENANT, no sources, no keys.
    assert "KURA_TENANT" not in env
    assert not [n for n in env if n.startswith(("KURA_POSTGRES", "KURA_COUCHDB", "KURA_ENCRYPT", "KURA_IDENTITY"))]
    assert not RUN_ENV & set(env)
    assert env["KURA_STORAGE"]["value"] == "s3://acme-saas-backups/backups"
    assert env["KURA_S3_ENDPOINT"]["value"] == "https://s3.direct.eu-de.cloud-object-storage.appdomain.cloud"
    assert env["KURA_S3_REGION"]["value"] == "eu-de" and env["KURA_S3_PATH_STYLE"]["value"] == "false"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert set(env[name]) == {"name", "valueFrom"}
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == EXPORTER
    resolved = resolve_env(c, monitored, NS)
    assert (resolved["AWS_ACCESS_KEY_ID"], resolved["AWS_SECRET_ACCESS_KEY"]) == (READER["accessKeyId"], READER["secretAccessKey"])
    # The reader keys only in the exporter's Secret; the writer keys never reach the exporter.
    secret = monitored.get("Secret", EXPORTER, NS)
    assert set(secret["data"]) == {"access-key-id", "secret-access-key"}
    outside = json.dumps([o for o in monitored.objects if o["kind"] != "Secret"]) + monitored.notes
    assert not [v for v in READER.values() if v in outside]
    assert "writer" not in json.dumps(secret)
    # Rotating the keys restarts the pod (variables from Secrets are read at start).
    checksum = t.metadata["annotations"]["checksum/credentials"]
    rotated = render(chartlib.merge(values_file("monitoring.yaml"), {"monitoring": {"exporter": {"credentials": {"secretAccessKey": "rotated"}}}}))
    assert exporter_template(rotated).metadata["annotations"]["checksum/credentials"] != checksum


@pytest.mark.parametrize(
    "credentials, expected",
    [
        ({"existingSecret": "icos-reader"}, {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}),
        ({"existingSecret": "icos-reader", "type": "apikey", "serviceInstanceId": "crn:v1:x"}, {"IBM_API_KEY_ID", "IBM_AUTH_ENDPOINT", "IBM_SERVICE_INSTANCE_ID"}),
        ({"apikey": "reader-apikey-0123456789"}, {"IBM_API_KEY_ID", "IBM_AUTH_ENDPOINT"}),
    ],
    ids=["existing-hmac", "existing-apikey", "apikey-value"],
)
def test_exporter_credential_forms(credentials, expected):
    values = chartlib.merge(one_tenant_values(), {
        "monitoring": {"exporter": {"enabled": True, "credentials": credentials, "objectStorage": {"iamEgress": {"cidrs": ["104.96.0.0/16"]}}}},
    })
    rendered = render(values)
    (c,) = exporter_template(rendered).spec["containers"]
    env = env_of(c)
    assert (STORAGE_SECRET_ENV | {"IBM_AUTH_ENDPOINT", "IBM_SERVICE_INSTANCE_ID"}) & set(env) == expected
    secret = credentials.get("existingSecret", EXPORTER)
    for name in STORAGE_SECRET_ENV & expected:
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret
    if credentials.get("existingSecret"):
        assert rendered.find("Secret", EXPORTER, NS) is None
    else:
        assert base64.b64decode(rendered.get("Secret", EXPORTER, NS)["data"]["apikey"]).decode() == credentials["apikey"]
    policy = rendered.get("NetworkPolicy", EXPORTER, NS)
    iam = Endpoint.address("104.96.1.1")  # in the exporter's iamEgress
    assert connection_allowed([policy], exporter_pod(rendered), iam, 443) is ("IBM_API_KEY_ID" in expected)


def test_exporter_needs_credentials_of_its_own():
    message = render_error(chartlib.merge(one_tenant_values(), {"monitoring": {"exporter": {"enabled": True}}}))
    assert "monitoring.exporter.credentials" in message and "Reader" in message
    # Not even with no tenant at all.
    assert "monitoring.exporter.credentials" in render_error({"monitoring": {"exporter": {"enabled": True}}})


def test_exporter_storage_follows_object_storage_and_its_overrides():
    rendered = render(with_monitoring({"objectStorage": {"prefix": "/kura/", "pathStyle": True, "endpoint": "http://minio.storage:9000", "region": "us-east-1"}}))
    env = env_of(exporter_template(rendered).spec["containers"][0])
    assert env["KURA_STORAGE"]["value"] == "s3://kura-backups/kura"
    assert (env["KURA_S3_ENDPOINT"]["value"], env["KURA_S3_REGION"]["value"], env["KURA_S3_PATH_STYLE"]["value"]) == ("http://minio.storage:9000", "us-east-1", "true")
    env = env_of(exporter_template(render(with_monitoring(exporter={"objectStorage": {"bucket": "other", "prefix": "", "pathStyle": True}}))).spec["containers"][0])
    assert env["KURA_STORAGE"]["value"] == "s3://other"
    assert env["KURA_S3_PATH_STYLE"]["value"] == "true"
    assert env["KURA_S3_ENDPOINT"]["value"] == "https://s3.direct.eu-de.cloud-object-storage.appdomain.cloud"


def test_exporter_service_port_and_a_custom_port(monitored):
    service = monitored.get("Service", EXPORTER, NS)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9187, "targetPort": "metrics", "protocol": "TCP"}]
    assert chartlib.selector_matches({"matchLabels": service["spec"]["selector"]}, exporter_template(monitored).labels)
    # Only the exporter's pod behind it.
    assert [t.where for t in pod_templates(monitored.objects) if chartlib.selector_matches({"matchLabels": service["spec"]["selector"]}, t.labels)] == [f"Deployment/{NS}/{EXPORTER}"]

    rendered = render(with_monitoring(exporter={"port": 9300, "interval": "15m"}))
    (c,) = exporter_template(rendered).spec["containers"]
    assert c["args"] == ["exporter", "--listen", "0.0.0.0:9300", "--interval", "15m"]
    assert c["ports"][0]["containerPort"] == 9300
    assert rendered.get("Service", EXPORTER)["spec"]["ports"][0]["port"] == 9300
    policies = rendered.of_kind("NetworkPolicy")
    assert connection_allowed(policies, PROMETHEUS, exporter_pod(rendered), 9300)
    assert not connection_allowed(policies, PROMETHEUS, exporter_pod(rendered), 9187)


def test_exporter_network_policy_admits_the_scrape_and_reaches_the_store(monitored):
    policies = monitored.of_kind("NetworkPolicy")
    exporter = exporter_pod(monitored)
    allowed = lambda src, dst, port, proto="TCP": connection_allowed(policies, src, dst, port, proto)
    assert allowed(PROMETHEUS, exporter, 9187)
    assert not allowed(PROMETHEUS, exporter, 9188)
    assert not allowed(GRAFANA, exporter, 9187)
    assert not allowed(Endpoint.pod("tenant-acme", {"app.kubernetes.io/name": "prometheus"}, {"kubernetes.io/metadata.name": "tenant-acme"}), exporter, 9187)
    assert not allowed(pod(monitored, "acme-backup"), exporter, 9187)
    assert allowed(exporter, Endpoint.address(ICOS_ADDRESS), 443)
    assert allowed(exporter, KUBE_DNS, 53, "UDP")
    assert not allowed(exporter, Endpoint.address("93.184.216.34"), 443)
    assert not allowed(exporter, pod(monitored, "acme-postgres"), 5432)
    assert not allowed(exporter, PUSHGATEWAY, 9091)
    # It selects the exporter alone: Fluent Bit and anything else in the namespace stay as they are.
    (policy,) = [p for p in policies if p["metadata"]["namespace"] == NS]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "exporter"
    # Another scraper, by values; and no policy at all without networkPolicy.enabled.
    # Values merge into the default matchLabels: null drops a default key.
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": None, "app": "vmagent"}}}
    rendered = render(with_monitoring(exporter={"ingress": ingress}))
    vmagent = Endpoint.pod("observability", {"app": "vmagent"}, {"kubernetes.io/metadata.name": "observability"})
    assert connection_allowed(rendered.of_kind("NetworkPolicy"), vmagent, exporter_pod(rendered), 9187)
    assert not connection_allowed(rendered.of_kind("NetworkPolicy"), PROMETHEUS, exporter_pod(rendered), 9187)
    assert render(with_monitoring({"networkPolicy": {"enabled": False}})).of_kind("NetworkPolicy") == []


def test_registry_credentials_reach_the_exporter():
    rendered = render(with_monitoring({"registryCredentials": {"create": True, "password": "ibm-cloud-api-key"}}))
    secret = rendered.get("Secret", "kura-registry", NS)
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert {"name": "kura-registry"} in rendered.get("ServiceAccount", EXPORTER, NS)["imagePullSecrets"]


# --- ServiceMonitor -------------------------------------------------------------------------------


def test_service_monitor_only_when_enabled(monitored):
    assert render(with_monitoring()).find("ServiceMonitor", EXPORTER) is None
    monitor = monitored.get("ServiceMonitor", EXPORTER, NS)
    check_service_monitor(monitor, monitored.get("Service", EXPORTER, NS))
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("1m", "30s")
    rendered = render(with_monitoring(serviceMonitor={"enabled": True, "interval": "30s", "scrapeTimeout": "10s", "labels": {"prometheus": "main"}}))
    monitor = rendered.get("ServiceMonitor", EXPORTER)
    check_service_monitor(monitor, rendered.get("Service", EXPORTER))
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s" and monitor["metadata"]["labels"]["prometheus"] == "main"
    assert "release" not in monitor["metadata"]["labels"]


def test_service_monitor_and_rules_refuse_to_render_without_the_exporter():
    message = render_error(chartlib.merge(one_tenant_values(), {"monitoring": {"serviceMonitor": {"enabled": True}}}))
    assert "monitoring.exporter.enabled" in message
    message = render_error(chartlib.merge(one_tenant_values(), {"monitoring": {"rules": {"enabled": True}}}))
    assert "monitoring.exporter.enabled" in message and "monitoring.rules.enabled" in message
    # Even when only the Pushgateway rule could apply: a backup that never runs must not go unnoticed.
    pushing = chartlib.merge(one_tenant_values(), {"monitoring": {"rules": {"enabled": True}}, "tenantDefaults": {"backup": {"pushgateway": {"url": PUSHGATEWAY_URL}}}})
    assert "monitoring.exporter.enabled" in render_error(pushing)


# --- PrometheusRule -------------------------------------------------------------------------------


def test_prometheus_rule_is_structurally_valid(monitored):
    rule = monitored.get("PrometheusRule", "kura", NS)
    check_prometheus_rule(rule)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [g["name"] for g in rule["spec"]["groups"]] == ["kura-backups", "kura-exporter", "kura-runs"]
    alerts = {r["alert"] for r in alert_rules(monitored)}
    assert alerts == {"KuraBackupTooOld", "KuraLastRunFailed", "KuraIncompleteBackupsPiling", "KuraExporterScrapeErrors", "KuraExporterDown"}
    for r in alert_rules(monitored):
        assert r["labels"]["team"] == "platform", r["alert"]  # rules.alertLabels
        series = promql_series(r["expr"])
        if r["alert"] == "KuraLastRunFailed":
            assert series == {"kura_last_run_success"}
        else:
            assert series <= EXPORTER_SERIES | RECORDED_SERIES, r["alert"]
    assert render(with_monitoring()).find("PrometheusRule", "kura") is None


def missing_expr(selector: str, limit: str, seconds: int, exporter_down: str = "15m", exporter_down_seconds: int = 900) -> str:
    """No complete backup at all: in the whole last limit, every sample of the source's count of
    complete backups was 0 or there was none (absent_over_time() of this tenant and source, never
    of the whole series); Prometheus has watched the source for the limit (a tenant just added has
    as long to make its first backup as a backup may be old); the exporter reports now (else
    KuraExporterDown, not one alert per source)."""
    return (
        f"((max by (tenant, source) (max_over_time(kura_backups_complete{selector}[{limit}])) == 0) or "
        f"absent_over_time(kura_backups_complete{selector}[{limit}])) "
        f"and on (tenant, source) (time() - {WATCHED}{selector} >= {seconds}) "
        f"and on () (time() - max(max_over_time(kura_exporter_last_refresh_timestamp_seconds[{exporter_down}])) < {exporter_down_seconds})"
    )


def test_backup_age_rules_cover_each_source_of_each_watched_tenant(monitored):
    rules = age_rules(monitored)
    # umbrella's backups are in another bucket, which the exporter does not read; initech has no CouchDB.
    assert set(rules) == {("acme", "postgres"), ("acme", "couchdb"), ("globex", "postgres"), ("globex", "couchdb"), ("initech", "postgres")}
    for (tenant, source), (age, missing) in rules.items():
        selector = f'{{tenant="{tenant}",source="{source}"}}'
        assert age["expr"].startswith(f"time() - max by (tenant, source) (kura_backup_last_complete_timestamp_seconds{selector}) > ")
        assert age["for"] == "10m" and age["labels"]["severity"] == "critical"
        assert (age["labels"]["tenant"], age["labels"]["source"]) == (tenant, source)
        assert (age["labels"]["reason"], missing["labels"]["reason"]) == ("stale", "missing")
        assert {k: v for k, v in age["labels"].items() if k != "reason"} == {k: v for k, v in missing["labels"].items() if k != "reason"}
        limit = age_limit(monitored, tenant, source)
        assert limit % 3600 == 0
        assert missing["expr"] == missing_expr(selector, f"{limit // 3600}h", limit)
        # The waiting is in the expression: a gap in the series resets a `for`.
        assert missing["for"] == "10m" and missing["labels"]["severity"] == "critical"
        (watched,) = [r for r in recording_rules(monitored) if r["labels"] == {"tenant": tenant, "source": source}]
        assert watched == {"record": WATCHED, "expr": f"min_over_time({WATCHED}{selector}[1d]) or on () vector(time())", "labels": {"tenant": tenant, "source": source}}
        for r in (age, missing):
            assert tenant in r["annotations"]["summary"] and source in r["annotations"]["summary"]
            assert f"tenant {tenant}" in r["annotations"]["description"] and f"source {source}" in r["annotations"]["description"].lower()
            assert f"kubectl -n tenant-{tenant} get jobs" in r["annotations"]["description"]
    assert "umbrella" not in json.dumps(monitored.get("PrometheusRule", "kura"))
    assert len(recording_rules(monitored)) == len(rules)
    # Every absent() and absent_over_time() names one tenant and one source.
    for r in alert_rules(monitored):
        for inner in re.findall(r"absent\(([^)]*)\)", r["expr"]):
            assert inner == "kura_exporter_last_refresh_timestamp_seconds", r["expr"]
        for inner in re.findall(r"absent_over_time\(([^)]*)\[[0-9]+h\]\)", r["expr"]):
            assert re.fullmatch(r'kura_backups_complete\{tenant="[a-z-]+",source="(postgres|couchdb)"\}', inner), r["expr"]
        assert r["expr"].count("absent_over_time(") == len(re.findall(r"absent_over_time\(([^)]*)\[[0-9]+h\]\)", r["expr"]))


def test_backup_age_limits_of_the_monitoring_values(monitored):
    # acme: the staggered daily backup, 24h + 2h; globex every 6h, 6h + 2h; initech its status.maxAge.
    assert age_limit(monitored, "acme") == 26 * 3600 == age_limit(monitored, "acme", "couchdb")
    assert age_limit(monitored, "globex") == 8 * 3600
    assert age_limit(monitored, "initech") == 80 * 3600
    assert "status.maxAge" in age_rules(monitored)[("initech", "postgres")][0]["annotations"]["description"]


def tenant_with_schedule(schedule: str, zone: str = "Etc/UTC", slack: str = "0s", **tenant) -> dict:
    return with_rules({"schedule": {"timeZone": zone}, "tenants": {"acme": {"backup": {"schedule": schedule}, **tenant}}}, backupAgeSlack=slack)


# --- an independent reading of cron: the runs of two years, day by day ---------------------------


def _field(text: str, low: int, high: int, names: dict[str, int] | None = None) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if span in ("*", "?"):
            start, end = low, high
        else:
            ends = [names[e.lower()] if names and e.lower() in names else int(e) for e in span.split("-")]
            start, end = ends[0], ends[-1] if len(ends) == 2 else (high if step else ends[0])
        values.update(range(start, end + 1, int(step or 1)))
    return values


def reference_gap(schedule: str) -> int:
    """The longest time between two runs in 2027–2031, in seconds, by listing every run (in UTC).
    robfig/cron semantics: with both the day of the month and of the week restricted, either
    matches; with one of them `*`, the other alone decides."""
    macros = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
    minute, hour, dom, month, dow = macros.get(schedule, schedule).split()
    days = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
    minutes, hours = _field(minute, 0, 59), _field(hour, 0, 23)
    doms, months = _field(dom, 1, 31), _field(month, 1, 12)
    dows = {d % 7 for d in _field(dow, 0, 7, days)}
    times = sorted(h * 60 + m for h in hours for m in minutes)
    runs = []
    day = datetime.date(2027, 1, 1)
    while day.year < 2032:
        dom_ok, dow_ok = day.day in doms, (day.isoweekday() % 7) in dows
        matches = (dom_ok or dow_ok) if dom not in ("*", "?") and dow not in ("*", "?") else (dom_ok and dow_ok)
        if day.month in months and matches:
            base = (day - datetime.date(2027, 1, 1)).days * 1440
            runs.extend(base + t for t in times)
        day += datetime.timedelta(days=1)
    return max(b - a for a, b in zip(runs, runs[1:])) * 60


@pytest.mark.parametrize(
    "schedule",
    [
        "0 1 * * *",
        "15 */6 * * *",
        "30 3 * * 1-5",
        "0 2 * * 0",
        "0 3 * * mon,wed,fri",
        "0 3 * * SUN,SAT",
        "*/15 * * * *",
        "10/20 * * * *",
        "0 0,12 * * *",
        "5 1-5/2 * * *",
        "45 22-23,0-1 * * *",
        "0,30 8-18 * * 1-5",
        "0 4 1 * *",
        "0 4 1,15 * *",
        "0 4 1-28/7 * *",
        "@hourly",
        "@daily",
        "@weekly",
        "@monthly",
        "@yearly",
    ],
)
def test_backup_age_limit_is_the_longest_gap_of_the_schedule(schedule):
    assert reference_gap("0 1 * * *") == 86400
    assert age_limit(render(tenant_with_schedule(schedule))) == reference_gap(schedule)


def test_backup_age_limit_adds_the_slack_and_an_hour_of_daylight_saving_time():
    assert age_limit(render(tenant_with_schedule("0 1 * * *", slack="2h"))) == 26 * 3600
    assert age_limit(render(tenant_with_schedule("0 1 * * *", slack="90m"))) == 25 * 3600 + 1800
    # A day of a zone with DST can last 25 hours; runs less than an hour apart do not grow.
    assert age_limit(render(tenant_with_schedule("0 1 * * *", zone="Europe/Berlin", slack="2h"))) == 27 * 3600
    assert age_limit(render(tenant_with_schedule("*/15 * * * *", zone="Europe/Berlin"))) == 900
    for fixed in ("UTC", "Etc/GMT-2", "GMT"):
        assert age_limit(render(tenant_with_schedule("0 1 * * *", zone=fixed))) == 86400, fixed
    # The default: staggered daily backups, 24h + 2h, whatever the minute.
    rendered = render(with_rules(chartlib.merge(one_tenant_values(), {"tenants": {"globex": {}, "initech": {}}})))
    assert {age_limit(rendered, t) for t in ("acme", "globex", "initech")} == {26 * 3600}


def test_status_max_age_is_the_limit_when_set():
    rendered = render(tenant_with_schedule("0 1 * * *", status={"maxAge": "36h"}))
    assert age_limit(rendered) == 36 * 3600
    age, missing = age_rules(rendered)[("acme", "postgres")]
    assert missing["expr"] == missing_expr('{tenant="acme",source="postgres"}', "36h", 36 * 3600)
    assert "status.maxAge, 36h" in age["annotations"]["description"]


@pytest.mark.parametrize("schedule", ["0 4 31 * *", "0 4 */7 * *", "0 4 1 * 1", "0 4 1 6 *", "0 4 L * *", "0 4 * * 1#2"])
def test_a_schedule_the_chart_cannot_read_needs_status_max_age(schedule):
    message = render_error(tenant_with_schedule(schedule))
    assert "tenants.acme.status.maxAge" in message and schedule in message
    assert age_limit(render(tenant_with_schedule(schedule, status={"maxAge": "32d"}))) == 32 * 86400


def test_tenants_without_backups_or_elsewhere_have_no_age_alert():
    values = with_rules({"tenants": {"globex": {"backup": {"enabled": False}}, "initech": {"objectStorage": {"prefix": "other"}}, "hooli": {"objectStorage": {"endpoint": "https://s3.private.eu-de.cloud-object-storage.appdomain.cloud"}}}})
    rendered = render(values)
    assert {t for t, _ in age_rules(rendered)} == {"acme"}
    assert "The backups of hooli, initech go to another bucket, prefix or endpoint" in rendered.notes
    # The exporter moved to initech's prefix: initech is watched, acme is not.
    moved = render(chartlib.merge(values, {"monitoring": {"exporter": {"objectStorage": {"prefix": "other"}}}}))
    assert {t for t, _ in age_rules(moved)} == {"initech"}
    # No tenant at all: the exporter's own alerts only.
    empty = render({"monitoring": {"exporter": {"enabled": True, "credentials": READER}, "rules": {"enabled": True}}})
    assert [g["name"] for g in empty.get("PrometheusRule", "kura")["spec"]["groups"]] == ["kura-exporter"]


def test_exporter_and_incomplete_backup_alerts():
    rules = {r["alert"]: r for r in reversed(alert_rules(render(with_rules(incompleteBackups={"threshold": 5, "for": "6h"}, alertLabels={"severity": "page", "team": "db"}))))}
    assert rules["KuraIncompleteBackupsPiling"]["expr"] == "max by (tenant, source) (kura_backups_incomplete) > 5"
    assert rules["KuraIncompleteBackupsPiling"]["for"] == "6h"
    assert rules["KuraExporterScrapeErrors"]["expr"] == "increase(kura_exporter_scrape_errors_total[30m]) > 0"
    # Three intervals (at least 15 minutes) without a refresh, or no series at all.
    assert rules["KuraExporterDown"]["expr"] == "absent(kura_exporter_last_refresh_timestamp_seconds) or (time() - max(kura_exporter_last_refresh_timestamp_seconds) > 900)"
    slow_render = render(with_rules({"monitoring": {"exporter": {"interval": "20m"}}}))
    slow = {r["alert"]: r for r in alert_rules(slow_render)}
    assert slow["KuraExporterDown"]["expr"].endswith("> 3600)")
    # The missing-backup alert holds off while the exporter is down as KuraExporterDown sees it.
    _, missing = age_rules(slow_render)[("acme", "postgres")]
    assert missing["expr"] == missing_expr('{tenant="acme",source="postgres"}', "26h", 26 * 3600, "1h", 3600)
    # alertLabels add to an alert's labels; its own severity stays.
    assert rules["KuraExporterDown"]["labels"] == {"severity": "critical", "team": "db"}
    assert rules["KuraBackupTooOld"]["labels"] == {"severity": "critical", "team": "db", "tenant": "acme", "source": "postgres", "reason": "stale"}
    assert "{{ $labels.tenant }}" in rules["KuraIncompleteBackupsPiling"]["annotations"]["summary"]


def test_last_run_failed_only_with_a_pushgateway(monitored):
    without = render(with_rules())
    assert "KuraLastRunFailed" not in {r["alert"] for r in alert_rules(without)}
    (failed,) = [r for r in alert_rules(monitored) if r["alert"] == "KuraLastRunFailed"]
    # Not restore by default: a manual restore's failure would stay in the Pushgateway until the next one.
    assert failed["expr"] == 'max by (tenant, source, operation) (kura_last_run_success{operation=~"backup|prune|verify"}) == 0'
    # A failed run that the Job's retry repairs within failedRunFor does not alert.
    assert failed["for"] == "15m"
    for label in ("operation", "tenant", "source"):
        assert f"{{{{ $labels.{label} }}}}" in failed["annotations"]["summary"]
    pushing = render(with_rules({"tenants": {"acme": {"backup": {"pushgateway": {"url": PUSHGATEWAY_URL}}}}}, failedRunOperations=["backup", "restore"]))
    (failed,) = [r for r in alert_rules(pushing) if r["alert"] == "KuraLastRunFailed"]
    assert 'operation=~"backup|restore"' in failed["expr"]
    patient = render(with_rules({"tenants": {"acme": {"backup": {"pushgateway": {"url": PUSHGATEWAY_URL}}}}}, failedRunFor="1h"))
    assert [r["for"] for r in alert_rules(patient) if r["alert"] == "KuraLastRunFailed"] == ["1h"]
    check_prometheus_rule(pushing.get("PrometheusRule", "kura"))


# --- the rules run by promtool ----------------------------------------------------------------------
# `promtool check rules` and `promtool test rules` on the rendered spec (a Prometheus rule file as
# it is), one sample a minute. promtool comes with Prometheus (Debian: the prometheus package);
# PROMTOOL names it (scripts/chart-test unpacks Debian's package into its cache), else PATH.
# Without it these skip, except in CI, where they fail: an alert rule must not go unchecked.

PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
if not PROMTOOL and os.environ.get("CI") == "true":
    PROMTOOL = "promtool (missing: scripts/chart-test installs it)"
needs_promtool = pytest.mark.skipif(not PROMTOOL, reason="no promtool (PROMTOOL or PATH)")
LIMIT_MINUTES = 26 * 60  # acme's in one_tenant_values(): a daily schedule plus the slack


def checked_rules(tmp_path, rendered):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rendered.get("PrometheusRule", "kura")["spec"], sort_keys=False))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return rules


def run_promtool(tmp_path, rendered, tests: list[dict]) -> None:
    rules = checked_rules(tmp_path, rendered)
    case = tmp_path / "test.yaml"
    tests = [{"interval": "1m", **t} for t in tests]
    case.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    tested = subprocess.run([PROMTOOL, "test", "rules", str(case)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def samples(runs: list[tuple[int, int, str]], end: int) -> str:
    """promtool's notation for minutes [0, end): (from, to, value) runs, missing in between; value
    "t" is the sample's own time in seconds (what a refresh timestamp is at each refresh)."""
    out, at = [], 0
    for start, stop, value in runs:
        if start > at:
            out.append(f"_x{start - at}")
        out.append(f"{start * 60}+60x{stop - start - 1}" if value == "t" else f"{value}x{stop - start - 1}")
        at = stop
    if end > at:
        out.append(f"_x{end - at}")
    return " ".join(out)


def exporter_series(name: str, pods: list[tuple[int, int]], value: str, end: int) -> list[dict]:
    """One series per exporter pod (a restart is a new pod, a few minutes without any)."""
    at = name.index("{") + 1
    return [{"series": f'{name[:at]}pod="kura-exporter-{i}"{"," if name[at] != "}" else ""}{name[at:]}', "values": samples([(a, b, value)], end)} for i, (a, b) in enumerate(pods)]


def refreshes(pods: list[tuple[int, int]], end: int) -> list[dict]:
    return exporter_series('kura_exporter_last_refresh_timestamp_seconds{}', pods, "t", end)


def expected(rule: dict, **labels: str) -> dict:
    text = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], v) for k, v in rule["annotations"].items()}
    return {"exp_labels": {"alertname": rule["alert"], **rule["labels"], **labels}, "exp_annotations": text}


def alerts_at(minute: int, name: str, alerts: list[dict]) -> dict:
    return {"eval_time": f"{minute}m", "alertname": name, "exp_alerts": alerts}


def missing_rules(rendered) -> dict[str, dict]:
    return {source: rules[1] for (_, source), rules in age_rules(rendered).items()}


@needs_promtool
def test_promtool_checks_the_rules_of_the_monitoring_values(monitored, tmp_path):
    checked_rules(tmp_path, monitored)


@needs_promtool
def test_promtool_no_backup_at_all_alerts_after_the_limit_despite_exporter_restarts(tmp_path):
    rendered = render(with_rules())
    assert age_limit(rendered) == LIMIT_MINUTES * 60 == age_limit(rendered, "acme", "couchdb")
    missing = missing_rules(rendered)
    end = LIMIT_MINUTES + 60
    # The exporter restarts at 12h (5 minutes without a series) and at 20h (3 minutes); a `for` of
    # the limit would start again after each.
    pods = [(0, 720), (725, 1200), (1203, end)]
    # postgres: nothing of it in the store (no series at all); couchdb: backups that never complete.
    inputs = refreshes(pods, end) + exporter_series('kura_backups_complete{tenant="acme",source="couchdb"}', pods, "0", end)
    both = [expected(missing["postgres"]), expected(missing["couchdb"])]
    run_promtool(tmp_path, rendered, [{"input_series": inputs, "alert_rule_test": [
        *(alerts_at(m, "KuraBackupTooOld", []) for m in (30, 722, 1202, LIMIT_MINUTES - 1)),
        # True from the limit on, not before: pending for 10 minutes, then firing.
        alerts_at(LIMIT_MINUTES + 9, "KuraBackupTooOld", []),
        alerts_at(LIMIT_MINUTES + 11, "KuraBackupTooOld", both),
        alerts_at(end - 1, "KuraBackupTooOld", both),
        alerts_at(end - 1, "KuraExporterDown", []),
    ]}])


@needs_promtool
def test_promtool_a_first_backup_in_time_or_a_dead_exporter_is_no_missing_alert(tmp_path):
    rendered = render(with_rules())
    end = LIMIT_MINUTES + 60
    pods = [(0, 600), (604, end)]
    # postgres' first backup completes after 20h (its series appears then, 1); couchdb had an
    # incomplete one first (0), then a complete one at 25h.
    first = refreshes(pods, end) + [
        {"series": 'kura_backups_complete{tenant="acme",source="postgres",pod="kura-exporter-1"}', "values": samples([(1200, end, "1")], end)},
        {"series": 'kura_backup_last_complete_timestamp_seconds{tenant="acme",source="postgres",pod="kura-exporter-1"}', "values": samples([(1200, end, "72000")], end)},
        {"series": 'kura_backups_complete{tenant="acme",source="couchdb",pod="kura-exporter-1"}', "values": samples([(700, 1500, "0"), (1500, end, "1")], end)},
        {"series": 'kura_backup_last_complete_timestamp_seconds{tenant="acme",source="couchdb",pod="kura-exporter-1"}', "values": samples([(1500, end, "90000")], end)},
    ]
    # The exporter dies at 20h with nothing backed up: KuraExporterDown, not one alert per source.
    (down,) = [r for r in alert_rules(rendered) if r["alert"] == "KuraExporterDown"]
    dead = refreshes([(0, 1200)], end)
    run_promtool(tmp_path, rendered, [
        {"input_series": first, "alert_rule_test": [alerts_at(m, "KuraBackupTooOld", []) for m in (LIMIT_MINUTES + 11, end - 1)]},
        {"input_series": dead, "alert_rule_test": [
            alerts_at(end - 1, "KuraBackupTooOld", []),
            alerts_at(end - 1, "KuraExporterDown", [expected(down)]),
        ]},
    ])


@needs_promtool
def test_promtool_a_failed_run_that_a_retry_repairs_does_not_alert(tmp_path):
    rendered = render(with_rules({"tenants": {"acme": {"backup": {"pushgateway": {"url": PUSHGATEWAY_URL}}}}}))
    (failed,) = [r for r in alert_rules(rendered) if r["alert"] == "KuraLastRunFailed"]
    assert failed["for"] == "15m"
    end = 180
    pushed = 'kura_last_run_success{tenant="acme",source="postgres",operation="backup",job="kura"}'
    # Fails at 0:10, the Job's retry succeeds at 0:20; fails again at 1:00 and stays failed.
    inputs = [{"series": pushed, "values": samples([(0, 10, "1"), (10, 20, "0"), (20, 60, "1"), (60, end, "0")], end)}]
    labels = {"tenant": "acme", "source": "postgres", "operation": "backup"}
    run_promtool(tmp_path, rendered, [{"input_series": inputs, "alert_rule_test": [
        *(alerts_at(m, "KuraLastRunFailed", []) for m in (15, 21, 59, 74)),
        alerts_at(76, "KuraLastRunFailed", [expected(failed, **labels)]),
    ]}])


# --- per-run metrics and pings --------------------------------------------------------------------


def component(t: chartlib.PodTemplate) -> str:
    return t.labels["app.kubernetes.io/component"]


def test_pushgateway_url_reaches_the_backup_verify_and_restore_jobs_only(monitored):
    seen = set()
    for t in pod_templates(monitored.objects):
        tenant = t.labels.get("kura.io/tenant")
        expected = component(t) in ("backup", "verify", "restore") and tenant != "initech"
        for c in t.containers():
            env = env_of(c)
            assert ("KURA_PUSHGATEWAY_URL" in env) is expected, f"{t.where}/{c['name']}"
            if expected:
                assert env["KURA_PUSHGATEWAY_URL"] == {"name": "KURA_PUSHGATEWAY_URL", "value": PUSHGATEWAY_URL}
                seen.add((tenant, component(t)))
        assert (t.labels.get("kura.io/pushgateway-client") == "true") is expected, t.where
    assert seen == {(tenant, job) for tenant in ("acme", "globex", "umbrella") for job in ("backup", "verify", "restore")}


def test_notify_url_reaches_the_backup_jobs_only_and_only_from_a_secret(monitored):
    found = {}
    for t in pod_templates(monitored.objects):
        for c in t.containers():
            env = env_of(c)
            if "KURA_NOTIFY_URL" in env:
                assert component(t) == "backup", t.where
                assert set(env["KURA_NOTIFY_URL"]) == {"name", "valueFrom"} and set(env["KURA_NOTIFY_URL"]["valueFrom"]) == {"secretKeyRef"}
                found[t.labels["kura.io/tenant"]] = env["KURA_NOTIFY_URL"]["valueFrom"]["secretKeyRef"]
        assert (t.labels.get("kura.io/notify-client") == "true") is (t.labels.get("kura.io/tenant") in ("acme", "globex") and component(t) == "backup"), t.where
    assert found == {"acme": {"name": "acme-notify", "key": "url"}, "globex": {"name": "globex-healthchecks", "key": "ping-url"}}
    backup = container(template_named(monitored, "acme-backup"), "kura")
    assert resolve_env(backup, monitored, "tenant-acme")["KURA_NOTIFY_URL"] == ACME_PING
    secret = monitored.get("Secret", "acme-notify", "tenant-acme")
    assert secret["data"] == {"url": base64.b64encode(ACME_PING.encode()).decode()}
    assert monitored.find("Secret", "globex-healthchecks") is None  # the operator's
    # The URL authorises pings: nowhere but in that Secret, not even its token.
    token = ACME_PING.rsplit("/", 1)[1]
    outside = json.dumps([o for o in monitored.objects if o is not secret]) + monitored.notes
    assert token not in outside and "hc-ping.com" not in outside


def test_notify_is_checked_without_printing_the_url():
    token = "9d1a-Secret-Token-77e2"
    bad = render_error(chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"backup": {"notify": {"url": f"hc-ping.com/{token}", "egress": {"cidrs": ["104.21.0.0/16"]}}}}}}))
    assert "backup.notify.url" in bad and token not in bad
    # A rule without peers would open every address: the ping endpoint's CIDRs are required.
    missing = render_error(chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"backup": {"notify": {"url": f"https://hc-ping.com/{token}"}}}}}))
    assert "backup.notify.egress.cidrs" in missing and token not in missing
    # Without NetworkPolicies they are not needed; without backups nothing of notify renders.
    assert render(chartlib.merge(one_tenant_values(), {"networkPolicy": {"enabled": False}, "tenants": {"acme": {"backup": {"notify": {"url": f"https://hc-ping.com/{token}"}}}}})).get("Secret", "acme-notify")
    off = render(chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"backup": {"enabled": False, "notify": {"url": f"https://hc-ping.com/{token}"}}}}}))
    assert off.find("Secret", "acme-notify") is None and off.find("NetworkPolicy", "acme-notify-clients") is None


def test_run_egress_exactly_where_configured(monitored):
    policies = monitored.of_kind("NetworkPolicy")
    allowed = lambda name, dst, port: connection_allowed(policies, pod(monitored, name), dst, port)
    ping, acme_only_ping = Endpoint.address(PING_ADDRESS), Endpoint.address(ACME_ONLY_PING_ADDRESS)
    for tenant in ("acme", "globex", "umbrella"):
        for job in ("backup", "restore", "verify-postgres"):
            assert allowed(f"{tenant}-{job}", PUSHGATEWAY, 9091), (tenant, job)
            assert not allowed(f"{tenant}-{job}", PUSHGATEWAY, 9092), (tenant, job)
        assert not allowed(f"{tenant}-status", PUSHGATEWAY, 9091), tenant
    assert not allowed("initech-backup", PUSHGATEWAY, 9091)  # it sets no pushgateway
    assert not allowed("acme-backup", Endpoint.pod("monitoring", {"app.kubernetes.io/name": "prometheus"}, MONITORING_NS), 9091)
    assert allowed("acme-backup", ping, 443) and allowed("acme-backup", acme_only_ping, 443)
    assert not allowed("acme-backup", ping, 80)
    assert allowed("globex-backup", ping, 443) and not allowed("globex-backup", acme_only_ping, 443)
    for name in ("acme-restore", "acme-verify-postgres", "acme-status", "umbrella-backup", "initech-backup"):
        assert not allowed(name, ping, 443), name
    assert monitored.find("NetworkPolicy", "initech-pushgateway-clients") is None
    assert monitored.find("NetworkPolicy", "umbrella-notify-clients") is None


def test_an_external_pushgateway_by_cidrs():
    values = chartlib.merge(one_tenant_values(), {
        "monitoring": {"pushgateway": {"cidrs": ["10.240.1.20/32"], "port": 443}},
        "tenantDefaults": {"backup": {"pushgateway": {"url": "https://push.example.com/"}}},
    })
    rendered = render(values)
    (rule,) = rendered.get("NetworkPolicy", "acme-pushgateway-clients")["spec"]["egress"]
    assert rule == {"to": [{"ipBlock": {"cidr": "10.240.1.20/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    backup = container(template_named(rendered, "acme-backup"), "kura")
    assert env_of(backup)["KURA_PUSHGATEWAY_URL"]["value"] == "https://push.example.com"
    assert not connection_allowed(rendered.of_kind("NetworkPolicy"), pod(rendered, "acme-backup"), PUSHGATEWAY, 9091)


def test_notes_name_the_exporter_and_how_to_look(monitored, one):
    assert "kubectl -n kura-system port-forward svc/kura-exporter 9187" in monitored.notes
    assert "curl -s localhost:9187/metrics" in monitored.notes
    assert "ServiceMonitor kura-exporter" in monitored.notes
    assert "PrometheusRule kura, with KuraBackupTooOld for 5 source(s) of 3 tenant(s) and KuraLastRunFailed" in monitored.notes
    assert "The backups of umbrella go to another bucket" in monitored.notes
    plain = render(with_monitoring()).notes
    assert "No ServiceMonitor (monitoring.serviceMonitor.enabled): point Prometheus at\nhttp://kura-exporter.kura-system.svc:9187/metrics" in plain
    assert "PrometheusRule" not in plain and "Monitoring" not in one.notes


@pytest.mark.parametrize(
    "values, where",
    [
        ({"monitoring": {"exporter": {"enable": True}}}, "enable"),
        ({"monitoring": {"exporters": {}}}, "exporters"),
        ({"monitoring": {"exporter": {"interval": "5 minutes"}}}, "interval"),
        ({"monitoring": {"exporter": {"port": 80}}}, "port"),
        ({"monitoring": {"exporter": {"objectStorage": {"credentials": {"accessKeyId": "x"}}}}}, "objectStorage"),
        ({"monitoring": {"exporter": {"objectStorage": {"bukket": "x"}}}}, "bukket"),
        ({"monitoring": {"exporter": {"credentials": {"type": "reader"}}}}, "type"),
        ({"monitoring": {"serviceMonitor": {"interval": "1 minute"}}}, "interval"),
        ({"monitoring": {"rules": {"backupAgeSlack": "2 hours"}}}, "backupAgeSlack"),
        ({"monitoring": {"rules": {"failedRunOperations": ["backups"]}}}, "failedRunOperations"),
        ({"monitoring": {"rules": {"failedRunFor": "15 minutes"}}}, "failedRunFor"),
        ({"monitoring": {"rules": {"incompleteBackups": {"threshold": -1}}}}, "threshold"),
        ({"monitoring": {"pushgateway": {"cidrs": ["10.0.0.1"]}}}, "cidrs"),
        ({"tenants": {"acme": {"backup": {"pushgateway": {"url": "pushgateway.monitoring:9091"}}}}}, "url"),
        ({"tenants": {"acme": {"backup": {"pushgateway": "http://pushgateway:9091"}}}}, "pushgateway"),
        ({"tenants": {"acme": {"backup": {"notify": {"uri": "https://hc-ping.com/x"}}}}}, "uri"),
        ({"tenants": {"acme": {"backup": {"notify": {"egress": {"ports": [0]}}}}}}, "ports"),
        ({"tenants": {"acme": {"backup": {"metricsFile": "/tmp/kura.prom"}}}}, "metricsFile"),
        ({"tenants": {"acme": {"apps": {"notify": {"image": {"repository": "x"}}}}}}, "notify"),
    ],
    ids=[
        "enable", "exporters", "interval", "privileged-port", "exporter-credentials-in-objectStorage", "exporter-storage-typo",
        "credentials-type", "scrape-interval", "slack", "operations", "failed-run-for", "threshold", "pushgateway-cidr", "pushgateway-url",
        "pushgateway-string", "notify-typo", "notify-port", "metrics-file", "reserved-app-name",
    ],
)
def test_schema_rejects_bad_monitoring_values(values, where):
    assert where in schema_error(values)
