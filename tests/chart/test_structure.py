"""What the rendered objects must look like: Pod Security `restricted`, resources, pinned images,
labels, names, isolation between tenants, staggered schedules, and the settings of every Job."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re

import helm_python as helm
import pytest

import chartlib
from chartlib import Endpoint, PodTemplate, connection_allowed, container, pod_templates, render
from conftest import LONG_TENANT, MANY_TENANTS, many_tenant_values, one_tenant_values, values_file

STANDBY_SERVER = "10.240.0.15"  # globex's restore.extraEgress in three-tenants.yaml

RECOMMENDED_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]
# Pod templates leave out version and chart on purpose (a chart upgrade must not restart the
# databases); everything else is there.
POD_LABELS = [l for l in RECOMMENDED_LABELS if l not in ("app.kubernetes.io/version", "helm.sh/chart")]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
ICOS_ADDRESS = "161.26.0.10"  # inside the default object-storage egress CIDRs
KUBE_DNS = Endpoint.pod("kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
INGRESS_CONTROLLER = Endpoint.pod("kube-system", {"app": "public-crxyz-alb1"}, {"kubernetes.io/metadata.name": "kube-system"})


def is_fluent_bit(t: PodTemplate) -> bool:
    return t.labels.get("app.kubernetes.io/component") == "fluent-bit"


def restricted_violations(t: PodTemplate) -> list[str]:
    """The fields Pod Security's `restricted` profile checks, plus the chart's own rule that every
    root filesystem is read-only with an emptyDir on /tmp."""
    spec, psc = t.spec, t.spec.get("securityContext", {})
    found = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(field)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    if psc.get("sysctls"):
        found.append("sysctls")
    for c in t.containers():
        csc = c.get("securityContext", {})
        name = c["name"]
        if csc.get("privileged"):
            found.append(f"{name}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities added")
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{name}: runAsNonRoot")
        if csc.get("runAsUser", psc.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        if any("hostPort" in p for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if csc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: readOnlyRootFilesystem")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        if not tmp or tmp[0]["name"] not in empty_dirs:
            found.append(f"{name}: no emptyDir on /tmp")
    return found


def test_every_pod_meets_pod_security_restricted(tenant_render):
    templates = [t for t in pod_templates(tenant_render.objects) if not is_fluent_bit(t)]
    assert templates
    violations = {t.where: v for t in templates if (v := restricted_violations(t))}
    assert violations == {}


def test_fluent_bit_departs_from_restricted_only_where_it_must(three):
    (fluent_bit,) = [t for t in pod_templates(three.objects) if is_fluent_bit(t)]
    # It reads the node's log files (root-owned, mode 0640) and keeps its offsets on the node.
    assert sorted(restricted_violations(fluent_bit)) == [
        "fluent-bit: runAsNonRoot",
        "fluent-bit: runAsUser 0",
        "volume hostlogs-0: ['hostPath']",
        "volume state: ['hostPath']",
        "volume varlog: ['hostPath']",
    ]
    mounts = {m["name"]: m for m in fluent_bit.containers()[0]["volumeMounts"]}
    assert mounts["varlog"].get("readOnly") is True
    assert mounts["hostlogs-0"].get("readOnly") is True
    assert fluent_bit.namespace == chartlib.RELEASE_NAMESPACE


def fluent_bit_only(**settings) -> dict:
    fluent_bit = {"enabled": True, "loki": {"url": "https://loki.example.com/loki/api/v1/push"}, **settings}
    return {"objectStorage": chartlib.STORAGE_CREDENTIALS, "fluentBit": fluent_bit}


def test_fluent_bit_reads_through_the_log_symlinks_of_iks_workers(three):
    # IKS: /var/log/containers/x.log -> /var/log/pods/… and /var/log/pods -> /var/data/kubeletlogs.
    # The target is mounted at its own path, so the absolute links resolve in the container too.
    pod = three.get("DaemonSet", "kura-fluent-bit", chartlib.RELEASE_NAMESPACE)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    # DirectoryOrCreate: a node without the directory gets an empty one, not a pod stuck starting.
    assert volumes["hostlogs-0"]["hostPath"] == {"path": "/var/data/kubeletlogs", "type": "DirectoryOrCreate"}
    assert mounts["hostlogs-0"] == {"name": "hostlogs-0", "mountPath": "/var/data/kubeletlogs", "readOnly": True}

    rendered = render(fluent_bit_only(extraHostLogPaths=["/var/data/kubeletlogs", "/mnt/logs"]))
    pod = rendered.get("DaemonSet", "kura-fluent-bit")["spec"]["template"]["spec"]
    assert [v["hostPath"]["path"] for v in pod["volumes"] if v["name"].startswith("hostlogs-")] == ["/var/data/kubeletlogs", "/mnt/logs"]
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"].startswith("hostlogs-")] == ["/var/data/kubeletlogs", "/mnt/logs"]

    pod = render(fluent_bit_only(extraHostLogPaths=[])).get("DaemonSet", "kura-fluent-bit")["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"].startswith("hostlogs-")]

    with pytest.raises(helm.HelmRenderError, match="extraHostLogPaths"):
        render(fluent_bit_only(extraHostLogPaths=["/var/log/"]))


def test_tenant_namespaces_enforce_restricted(three):
    for ns in three.of_kind("Namespace"):
        labels = ns["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_every_container_has_requests_and_limits(tenant_render):
    missing = []
    for t in pod_templates(tenant_render.objects):
        for c in t.containers():
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        missing.append(f"{t.where}/{c['name']}: {kind}.{resource}")
    assert missing == []


def test_no_image_is_latest_or_unpinned(tenant_render):
    bad = []
    for t in pod_templates(tenant_render.objects):
        for c in t.containers():
            image = c["image"]
            name, _, digest = image.partition("@")
            tag = name.rsplit("/", 1)[-1].partition(":")[2]
            if (not tag and not digest) or tag == "latest":
                bad.append(f"{t.where}/{c['name']}: {image}")
    assert bad == []


def test_kura_image_defaults_to_the_app_version(one):
    chart_yaml = (chartlib.CHART / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion: "?([^"\n]+)"?', chart_yaml, re.M).group(1)
    backup = next(t for t in pod_templates(one.objects) if t.owner["metadata"]["name"] == "acme-backup")
    assert container(backup, "kura")["image"].endswith(f":{app_version}")


def test_recommended_labels_on_every_object_and_pod(tenant_render):
    missing = []
    for obj in tenant_render.objects:
        labels = obj["metadata"].get("labels", {})
        missing += [f"{obj['kind']}/{obj['metadata']['name']}: {l}" for l in RECOMMENDED_LABELS if not labels.get(l)]
        too_long = [v for v in labels.values() if len(str(v)) > 63]
        assert not too_long, obj["metadata"]["name"]
    for t in pod_templates(tenant_render.objects):
        missing += [f"{t.where} pod: {l}" for l in POD_LABELS if not t.labels.get(l)]
    assert missing == []


def test_names_are_valid_for_long_tenant_names(long_name):
    cronjobs = [o for o in long_name.of_kind("CronJob") if LONG_TENANT[:20] in o["metadata"]["name"]]
    assert len(cronjobs) == 5  # backup, restore, status, verify-postgres, verify-couchdb
    for obj in long_name.objects:
        name = obj["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, name
        if obj["kind"] == "CronJob":
            # The controller names Jobs <cronjob>-<11 characters>; a Job name is a 63-char label.
            assert len(name) <= 52, name
        if obj["kind"] == "Service":
            assert DNS_1035.match(name), name
    names = [o["metadata"]["name"] for o in cronjobs]
    assert len(set(names)) == len(names)
    for t in pod_templates(long_name.objects):
        for c in t.containers():
            assert DNS_LABEL.match(c["name"]) and len(c["name"]) <= 63
            for port in c.get("ports", []):
                assert len(port.get("name", "")) <= 15


def test_tenant_objects_stay_in_their_namespace(three):
    for obj in three.objects:
        tenant = obj["metadata"]["labels"].get("kura.io/tenant")
        if tenant and obj["kind"] != "Namespace":
            expected = {"acme": "tenant-acme", "globex": "globex-prod", "initech": "tenant-initech"}[tenant]
            assert obj["metadata"]["namespace"] == expected, obj["metadata"]["name"]


# --- isolation --------------------------------------------------------------------------------


def tenant_namespaces(rendered) -> dict[str, dict]:
    """namespace → labels, for every namespace that holds tenant objects (created or existing)."""
    spaces = {}
    for obj in rendered.objects:
        if "kura.io/tenant" in obj["metadata"].get("labels", {}):
            ns = obj["metadata"]["name"] if obj["kind"] == "Namespace" else obj["metadata"]["namespace"]
            spaces.setdefault(ns, {"kubernetes.io/metadata.name": ns})
    for ns in rendered.of_kind("Namespace"):
        spaces[ns["metadata"]["name"]].update(ns["metadata"]["labels"])
    return spaces


def test_each_tenant_namespace_has_default_deny(tenant_render):
    policies = tenant_render.of_kind("NetworkPolicy")
    for ns in tenant_namespaces(tenant_render):
        deny = [
            p
            for p in policies
            if p["metadata"]["namespace"] == ns
            and p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        assert len(deny) == 1, ns


def test_no_policy_admits_another_tenant(tenant_render):
    spaces = tenant_namespaces(tenant_render)
    for policy in tenant_render.of_kind("NetworkPolicy"):
        own = policy["metadata"]["namespace"]
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction) or []:
                peers = rule.get(key)
                # A rule without peers admits every pod in the cluster.
                assert peers, f"{policy['metadata']['name']}: {direction} rule open to everyone"
                for peer in peers:
                    if "ipBlock" in peer:
                        assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen >= 8, peer
                        continue
                    if "namespaceSelector" not in peer:
                        continue  # podSelector alone: the policy's own namespace
                    selected = [ns for ns, labels in spaces.items() if chartlib.selector_matches(peer["namespaceSelector"], labels)]
                    assert selected == [], f"{policy['metadata']['name']} in {own} admits {selected}"


def endpoints(rendered, namespace: str) -> dict[str, Endpoint]:
    """component (or app name, or CronJob name) → the pod a template creates."""
    labels_of_ns = tenant_namespaces(rendered)[namespace]
    found = {}
    for t in pod_templates(rendered.in_namespace(namespace)):
        key = t.labels.get("kura.io/app") or t.labels["app.kubernetes.io/component"]
        found[key] = Endpoint.pod(namespace, t.labels, labels_of_ns)
    return found


def test_policies_let_the_stack_work_and_nothing_else(three):
    policies = three.of_kind("NetworkPolicy")
    allowed = lambda src, dst, port, proto="TCP": connection_allowed(policies, src, dst, port, proto)
    icos = Endpoint.address(ICOS_ADDRESS)
    internet = Endpoint.address("93.184.216.34")
    api = Endpoint.address("10.0.0.1")
    acme, globex, initech = (endpoints(three, ns) for ns in ("tenant-acme", "globex-prod", "tenant-initech"))

    for tenant, jobs in ((acme, ("backup", "restore", "test")), (initech, ("backup", "restore"))):
        for job in jobs:
            assert allowed(tenant[job], tenant["postgres"], 5432), job
            assert allowed(tenant[job], tenant["couchdb"], 5984), job
            assert allowed(tenant[job], icos, 443), job
            assert not allowed(tenant[job], internet, 443), job
    for job in ("backup", "restore", "status", "verify"):
        assert allowed(globex[job], icos, 443), job
    assert allowed(globex["verify"], globex["postgres"], 5432)
    assert not allowed(globex["status"], globex["postgres"], 5432)

    # restore.extraEgress: the restore pods, and only they, reach the standby server.
    standby = Endpoint.address(STANDBY_SERVER)
    assert allowed(globex["restore"], standby, 5432)
    assert not allowed(globex["restore"], standby, 22)
    assert not allowed(globex["backup"], standby, 5432)
    assert not allowed(globex["postgres"], standby, 5432)
    assert not allowed(acme["restore"], standby, 5432)

    assert allowed(acme["web"], acme["postgres"], 5432)
    assert allowed(acme["worker"], acme["couchdb"], 5984)
    assert allowed(acme["web"], acme["worker"], 8080)
    assert not allowed(acme["web"], icos, 443)
    assert not allowed(acme["postgres"], icos, 443)
    assert not allowed(acme["postgres"], acme["couchdb"], 5984)
    assert not allowed(acme["couchdb"], internet, 443)

    assert allowed(INGRESS_CONTROLLER, acme["web"], 8080)
    assert not allowed(INGRESS_CONTROLLER, acme["postgres"], 5432)
    assert not allowed(INGRESS_CONTROLLER, initech["reporter"], 9090)  # no Ingress

    assert allowed(initech["reporter"], api, 443)  # it has RBAC rules
    assert not allowed(acme["web"], api, 443)

    for tenant in (acme, globex, initech):
        for pod in tenant.values():
            assert allowed(pod, KUBE_DNS, 53, "UDP")

    # Across tenants: nothing, in any direction.
    tenants = [acme, globex, initech]
    for a in tenants:
        for b in tenants:
            if a is b:
                continue
            for src in a.values():
                for dst in b.values():
                    for port in (5432, 5984, 8080, 9090):
                        assert not allowed(src, dst, port), (src, dst, port)


def test_database_policies_use_the_container_port_not_the_service_port():
    # A NetworkPolicy sees a connection after the Service has translated its port: with the
    # Service on 6432, the packet that reaches the pod is still for 5432.
    values = chartlib.merge(
        one_tenant_values(),
        {"tenants": {"acme": {
            "postgres": {"port": 6432},
            "couchdb": {"port": 6984},
            "apps": {"web": {"image": {"repository": "icr.io/acme/web", "tag": "1.0.0"}, "ports": {"http": 8080},
                             "waitFor": ["postgres", "couchdb"]}},
        }}},
    )
    rendered = render(values)
    policies = rendered.of_kind("NetworkPolicy")
    acme = endpoints(rendered, "tenant-acme")
    for db, service_port, pod_port in (("postgres", 6432, 5432), ("couchdb", 6984, 5984)):
        (port,) = rendered.get("Service", f"acme-{db}")["spec"]["ports"]
        assert port["port"] == service_port
        server = container(next(t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == f"acme-{db}"), db)
        assert {p["name"]: p["containerPort"] for p in server["ports"]}[port["targetPort"]] == pod_port
        for client in ("web", "backup", "restore", "test"):
            assert connection_allowed(policies, acme[client], acme[db], pod_port), (client, db)
            assert not connection_allowed(policies, acme[client], acme[db], service_port), (client, db)
        named = [p for p in policies if f"kura.io/{db}-client" in json.dumps(p["spec"])]
        assert named and all(r["ports"] == [{"port": pod_port, "protocol": "TCP"}] for p in named for r in p["spec"].get("ingress", []) + p["spec"].get("egress", []))
    # Clients still dial the Service.
    web = next(t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == "acme-web")
    assert [c["args"][2] for c in web.spec["initContainers"]] == [
        "postgres://postgres@acme-postgres.tenant-acme.svc:6432/postgres",
        "http://admin@acme-couchdb.tenant-acme.svc:6984",
    ]


def test_dns_extra_cidrs_reach_a_node_local_dns_cache(one):
    # NodeLocal DNS cache answers on the kube-dns ClusterIP and 169.254.20.10, on the node: the
    # kube-dns pod selector never sees those queries.
    cache_addresses = ("172.21.0.10", "169.254.20.10")
    values = chartlib.merge(one_tenant_values(), {"networkPolicy": {"dns": {"extraCidrs": [f"{a}/32" for a in cache_addresses]}}})
    rendered = render(values)
    policies = rendered.of_kind("NetworkPolicy")
    pods = endpoints(rendered, "tenant-acme")
    for pod in pods.values():
        for address in cache_addresses:
            for protocol in ("UDP", "TCP"):
                assert connection_allowed(policies, pod, Endpoint.address(address), 53, protocol)
            assert not connection_allowed(policies, pod, Endpoint.address(address), 443)
        assert connection_allowed(policies, pod, KUBE_DNS, 53, "UDP")
    defaults = one.of_kind("NetworkPolicy")
    for pod in endpoints(one, "tenant-acme").values():
        assert not connection_allowed(defaults, pod, Endpoint.address("169.254.20.10"), 53, "UDP")


# --- schedules --------------------------------------------------------------------------------


def backup_minutes(rendered) -> dict[str, int]:
    """tenant → minute of the day its backup starts."""
    minutes = {}
    for cj in rendered.of_kind("CronJob"):
        if cj["metadata"]["labels"]["app.kubernetes.io/component"] == "backup":
            minute, hour, *rest = cj["spec"]["schedule"].split()
            assert rest == ["*", "*", "*"], cj["spec"]["schedule"]
            minutes[cj["metadata"]["labels"]["kura.io/tenant"]] = int(hour) * 60 + int(minute)
    return minutes


def test_schedules_of_200_tenants_use_distinct_minutes_in_the_window(many):
    minutes = backup_minutes(many)
    assert len(minutes) == 200
    assert len(set(minutes.values())) == 200
    assert all(60 <= m < 60 + 300 for m in minutes.values())  # 01:00 + 300 minutes
    # Spread over the window, not packed at its start.
    assert max(minutes.values()) - min(minutes.values()) > 240


def test_a_new_tenant_moves_few_others():
    def minutes(names):
        rendered = chartlib.chart().render(many_tenant_values(names), name="kura", namespace="kura-system")
        found = {}
        for doc in rendered["kura/templates/tenant/backup-cronjob.yaml"].split("\n---\n"):
            tenant = re.search(r"kura\.io/tenant: (\S+)", doc)
            schedule = re.search(r'\n  schedule: "(\d+) (\d+) ', doc)
            if tenant and schedule:
                found[tenant.group(1)] = int(schedule.group(2)) * 60 + int(schedule.group(1))
        return found

    before = minutes(MANY_TENANTS)
    after = minutes(MANY_TENANTS + ["newcomer"])
    moved = [t for t in before if before[t] != after[t]]
    assert len(before) == 200 and len(after) == 201
    assert len(moved) <= 3, moved


def test_schedules_are_deterministic_and_explicit_ones_win(three):
    again = render(values_file("three-tenants.yaml"))
    assert backup_minutes(again) == backup_minutes(three)
    assert three.get("CronJob", "globex-backup")["spec"]["schedule"] == "30 23 * * *"
    assert three.get("CronJob", "globex-backup")["spec"]["timeZone"] == "Europe/Berlin"
    # The weekly verify runs 3 hours after Sunday's backup, here past midnight: on Monday.
    assert three.get("CronJob", "globex-verify-postgres")["spec"]["schedule"] == "30 2 * * 1"
    assert three.get("CronJob", "globex-status")["spec"]["schedule"] == "30 */6 * * *"


# --- the Jobs ---------------------------------------------------------------------------------


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


def test_backup_cronjob(one):
    cj = one.get("CronJob", "acme-backup", "tenant-acme")
    spec, job = cj["spec"], cj["spec"]["jobTemplate"]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 3600
    assert spec["timeZone"] == "Etc/UTC"
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
    assert job["activeDeadlineSeconds"] == 14400 and job["backoffLimit"] == 2
    assert job["ttlSecondsAfterFinished"] == 259200
    assert job["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "kura", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"] == ["/usr/local/bin/kura"]
    assert c["args"] == ["backup", "--prune", "postgres", "couchdb"]
    env = env_of(c)
    assert env["KURA_STORAGE"]["value"] == "s3://kura-backups/backups"
    assert env["KURA_TENANT"]["value"] == "acme"
    assert env["KURA_LOG_FORMAT"]["value"] == "json"
    assert env["KURA_POSTGRES_URL"]["value"] == "postgres://postgres@acme-postgres.tenant-acme.svc:5432/postgres"
    assert env["KURA_COUCHDB_URL"]["value"] == "http://admin@acme-couchdb.tenant-acme.svc:5984"
    assert env["KURA_POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "acme-postgres", "key": "postgres-password"}
    assert {k: v["value"] for k, v in env.items() if k.startswith("KURA_KEEP_")} == {
        "KURA_KEEP_DAILY": "7",
        "KURA_KEEP_WEEKLY": "4",
        "KURA_KEEP_MONTHLY": "6",
    }


def test_restore_template(one):
    cj = one.get("CronJob", "acme-restore", "tenant-acme")
    assert cj["spec"]["suspend"] is True
    job = cj["spec"]["jobTemplate"]["spec"]
    (c,) = job["template"]["spec"]["containers"]
    assert c["args"] == ["restore", "$(KURA_RESTORE_SOURCE)", "$(KURA_RESTORE_BACKUP)"]
    env = env_of(c)
    assert env["KURA_RESTORE_SOURCE"]["value"] == "postgres"
    assert env["KURA_RESTORE_BACKUP"]["value"] == "latest"
    # Both sources are declared, so KURA_RESTORE_SOURCE=couchdb works too.
    assert {"KURA_POSTGRES_URL", "KURA_COUCHDB_URL"} <= set(env)
    fail_codes = job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]
    assert set(fail_codes) == {2, 5, 6, 7}


def test_optional_jobs_follow_the_tenant(three):
    status = container(next(t for t in pod_templates(three.objects) if t.owner["metadata"]["name"] == "globex-status"), "kura")
    assert status["args"] == ["status", "postgres", "--schedule", "30 23 * * *", "--timezone", "Europe/Berlin", "--slack", "2h"]
    verify = container(next(t for t in pod_templates(three.objects) if t.owner["metadata"]["name"] == "globex-verify-postgres"), "kura")
    assert verify["args"] == ["verify", "postgres", "latest", "--deep"]
    restore = container(next(t for t in pod_templates(three.objects) if t.owner["metadata"]["name"] == "globex-restore"), "kura")
    assert restore["args"] == ["restore", "$(KURA_RESTORE_SOURCE)", "$(KURA_RESTORE_BACKUP)", "--globals"]
    backup = container(next(t for t in pod_templates(three.objects) if t.owner["metadata"]["name"] == "globex-backup"), "kura")
    assert backup["args"] == ["backup", "--prune", "postgres"]
    assert "KURA_COUCHDB_URL" not in env_of(backup)
    assert env_of(backup)["KURA_KEEP_YEARLY"]["value"] == "3"
    initech = container(next(t for t in pod_templates(three.objects) if t.owner["metadata"]["name"] == "initech-backup"), "kura")
    assert {k: v["value"] for k, v in env_of(initech).items() if k.startswith("KURA_KEEP_")} == {"KURA_KEEP_WITHIN": "30d"}
    assert env_of(initech)["KURA_STORAGE"]["value"] == "s3://initech-backups/nightly"
    assert env_of(initech)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "initech-icos-hmac"
    assert three.find("Secret", "initech-object-storage") is None
    assert not [o for o in three.objects if o["metadata"]["name"].startswith("acme-status")]


# --- databases, apps, credentials --------------------------------------------------------------


def test_an_empty_tenant_entry_is_a_complete_tenant(one):
    ns = "tenant-acme"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in one.in_namespace(ns)}
    for expected in [
        ("Deployment", "acme-postgres"),
        ("Service", "acme-postgres"),
        ("PersistentVolumeClaim", "acme-postgres-data"),
        ("Secret", "acme-postgres"),
        ("Deployment", "acme-couchdb"),
        ("Service", "acme-couchdb"),
        ("PersistentVolumeClaim", "acme-couchdb-data"),
        ("Secret", "acme-couchdb"),
        ("ConfigMap", "acme-couchdb-config"),
        ("Secret", "acme-object-storage"),
        ("CronJob", "acme-backup"),
        ("CronJob", "acme-restore"),
        ("ServiceAccount", "acme-kura"),
        ("ServiceAccount", "acme-databases"),
        ("NetworkPolicy", "acme-default-deny"),
        ("ResourceQuota", "acme-quota"),
        ("LimitRange", "acme-limits"),
        ("Pod", "acme-test"),
    ]:
        assert expected in kinds, expected
    assert one.get("Namespace", ns)
    for name in ("acme-postgres", "acme-couchdb"):
        deployment = one.get("Deployment", name)
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    postgres = container(next(t for t in pod_templates(one.objects) if t.owner["metadata"]["name"] == "acme-postgres"), "postgres")
    assert env_of(postgres)["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    assert {m["mountPath"] for m in postgres["volumeMounts"]} >= {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"}
    assert postgres["readinessProbe"] and postgres["livenessProbe"]


def test_existing_namespace_secret_and_claim_are_used(three):
    assert three.find("Namespace", "globex-prod") is None
    assert three.find("Secret", "globex-postgres") is None
    assert three.find("PersistentVolumeClaim", "globex-postgres-data") is None
    sts = three.get("StatefulSet", "globex-postgres", "globex-prod")
    pod = sts["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "data-globex-postgres-0"}} in pod["volumes"]
    env = env_of(pod["containers"][0])
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "globex-db-credentials", "key": "superuser-password"}
    assert pod["containers"][0]["args"] == ["-c", "max_connections=300", "-c", "shared_buffers=512MB"]
    assert not [o for o in three.in_namespace("globex-prod") if "couchdb" in o["metadata"]["name"] and o["kind"] != "NetworkPolicy"]
    assert three.get("StatefulSet", "initech-couchdb")
    pvc = three.get("PersistentVolumeClaim", "initech-postgres-data")
    assert pvc["spec"]["storageClassName"] == "ibmc-vpc-block-10iops-tier"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_apps_wait_for_their_databases_and_are_reachable_per_tenant(three):
    apps = {t.owner["metadata"]["name"]: t for t in pod_templates(three.of_kind("Deployment")) if t.labels.get("kura.io/app")}
    assert set(apps) == {"acme-web", "acme-worker", "globex-web", "globex-worker", "initech-worker", "initech-reporter"}
    web = apps["acme-web"]
    (init,) = web.spec["initContainers"]
    assert init["command"] == ["/usr/local/bin/kura"]
    assert init["args"] == ["wait-for", "postgres", "postgres://postgres@acme-postgres.tenant-acme.svc:5432/postgres", "--timeout", "5m"]
    assert env_of(init)["KURA_POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "acme-postgres"
    assert [c["args"][1] for c in apps["acme-worker"].spec["initContainers"]] == ["postgres", "couchdb"]
    assert [c["args"][1] for c in apps["globex-worker"].spec["initContainers"]] == ["postgres"]
    for t in apps.values():
        assert t.spec["containers"][0].get("readinessProbe"), t.where
    assert apps["initech-reporter"].spec["containers"][0]["image"].startswith("icr.io/acme/reporter@sha256:")

    ingress = three.get("Ingress", "acme-web", "tenant-acme")
    assert ingress["spec"]["rules"][0]["host"] == "acme.shop.example.com"
    assert ingress["spec"]["tls"] == [{"hosts": ["acme.shop.example.com"], "secretName": "acme-web-tls"}]
    assert ingress["spec"]["ingressClassName"] == "public-iks-k8s-nginx"
    assert three.find("Ingress", "initech-web") is None

    config = three.get("ConfigMap", "initech-app-config")["data"]
    assert config["POSTGRES_HOST"] == "initech-postgres.tenant-initech.svc"
    assert config["FEATURE_INVOICES"] == "true"
    assert config["TENANT"] == "initech"


def test_service_accounts_have_no_api_access_unless_given_rules(three):
    for sa in three.of_kind("ServiceAccount"):
        name = sa["metadata"]["name"]
        if sa["metadata"]["namespace"] == chartlib.RELEASE_NAMESPACE:
            continue  # Fluent Bit's, below
        assert sa["automountServiceAccountToken"] is (name == "initech-reporter"), name
        assert {"name": "all-icr-io"} in sa["imagePullSecrets"], name
    for t in pod_templates(three.objects):
        if not is_fluent_bit(t):
            assert t.spec.get("automountServiceAccountToken") is (t.owner["metadata"]["name"] == "initech-reporter"), t.where
    (role,) = three.of_kind("Role")
    assert role["metadata"]["name"] == "initech-reporter"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]
    (binding,) = three.of_kind("RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "initech-reporter", "namespace": "tenant-initech"}]
    (cluster_role,) = three.of_kind("ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]}]


def test_registry_credentials_become_a_pull_secret_per_tenant():
    values = chartlib.merge(one_tenant_values(), {"registryCredentials": {"create": True, "password": "ibm-cloud-api-key"}})
    rendered = render(values)
    secret = rendered.get("Secret", "acme-registry", "tenant-acme")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    auths = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"]
    assert auths["icr.io"]["username"] == "iamapikey"
    for sa in rendered.of_kind("ServiceAccount"):
        assert {"name": "acme-registry"} in sa["imagePullSecrets"]


def test_no_secret_appears_outside_secrets():
    secrets = ["pg-Secret-value-1", "couch-Secret-value-2", "hmac-Secret-value-3", "loki-Secret-value-4"]
    values = chartlib.merge(
        values_file("three-tenants.yaml"),
        {
            "objectStorage": {"credentials": {"secretAccessKey": secrets[2]}},
            "tenantDefaults": {"postgres": {"auth": {"password": secrets[0]}}, "couchdb": {"auth": {"password": secrets[1]}}},
            "fluentBit": {"loki": {"auth": {"password": secrets[3]}}},
        },
    )
    rendered = render(values)
    text = json.dumps([o for o in rendered.objects if o["kind"] != "Secret"]) + rendered.notes
    assert [s for s in secrets if s in text] == []
    encoded = json.dumps([o for o in rendered.objects if o["kind"] == "Secret"])
    assert all(base64.b64encode(s.encode()).decode() in encoded for s in secrets)


def test_generated_passwords_are_random_and_read_back_on_upgrade():
    first, second = render(one_tenant_values()), render(one_tenant_values())
    password = lambda r: base64.b64decode(r.get("Secret", "acme-postgres")["data"]["postgres-password"]).decode()
    assert len(password(first)) == 32 and password(first) != password(second)
    # Offline there is no cluster to read from; on a real upgrade `lookup` returns the live
    # Secret, and kura.secretValue takes the value from there (checked here as text only).
    helpers = (chartlib.CHART / "templates" / "_helpers.tpl").read_text()
    assert helpers.count('lookup "v1" "Secret" $t.ns (include "kura.') == 2
    explicit = render(chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"postgres": {"auth": {"password": "given"}}}}}))
    assert password(explicit) == "given"


def test_couchdb_restarts_when_its_credentials_change():
    def render_with(**auth):
        return render(chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"couchdb": {"auth": auth}}}}))

    def checksum(rendered, name="acme-couchdb"):
        return rendered.get("Deployment", name)["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/credentials")

    first, second = render_with(password="first"), render_with(password="second")
    assert checksum(first) != checksum(second)
    # The hash is of exactly what the Secret holds (toJson: sorted keys, no spaces), generated
    # cookie secrets included: the same values the render put into the Secret.
    secret = first.get("Secret", "acme-couchdb")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["admin-password"] == "first" and len(data) == 3
    expected = hashlib.sha256(json.dumps([data], separators=(",", ":"), sort_keys=True).encode()).hexdigest()[:16]
    assert checksum(first) == expected
    # An existing Secret can only be read on a cluster; offline the hash stays put.
    assert checksum(render_with(existingSecret="acme-couch")) == checksum(render_with(existingSecret="acme-couch"))
    # PostgreSQL takes its password only at initdb: a restart would change nothing.
    assert checksum(first, "acme-postgres") is None


def test_data_outlives_the_release(one):
    keep = lambda o: o["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep"
    assert keep(one.get("Namespace", "tenant-acme"))
    for pvc in one.of_kind("PersistentVolumeClaim"):
        assert keep(pvc), pvc["metadata"]["name"]
    assert keep(one.get("Secret", "acme-postgres")) and keep(one.get("Secret", "acme-couchdb"))


def parse_quantity(q) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.match(r"^([0-9.]+)([A-Za-z]*)$", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_quota_fits_the_tenant_it_constrains(three):
    for quota in three.of_kind("ResourceQuota"):
        ns = quota["metadata"]["namespace"]
        hard = quota["spec"]["hard"]
        steady, jobs = {"cpu": 0.0, "memory": 0.0}, []
        for t in pod_templates(three.in_namespace(ns)):
            replicas = t.owner["spec"].get("replicas", 1) if t.owner["kind"] in ("Deployment", "StatefulSet") else 1
            limits = {r: sum(parse_quantity(c["resources"]["limits"][r]) for c in t.spec["containers"]) for r in ("cpu", "memory")}
            if t.owner["kind"] in ("CronJob", "Pod"):
                jobs.append(limits)
            else:
                for r in steady:
                    steady[r] += limits[r] * replicas
        for r in ("cpu", "memory"):
            # Everything running, plus the two biggest Jobs at once (a backup and a restore).
            peak = steady[r] + sum(sorted((j[r] for j in jobs), reverse=True)[:2])
            assert peak <= parse_quantity(hard[f"limits.{r}"]), (ns, r, peak)
        assert three.get("LimitRange", quota["metadata"]["name"].replace("-quota", "-limits"), ns)


def test_notes_on_upgrade_show_how_to_set_a_changed_postgres_password(one):
    notes = render(one_tenant_values(), is_upgrade=True).notes
    command = [line.strip() for line in notes.splitlines() if "ALTER ROLE" in line or "kubectl -n tenant-acme get secret" in line or "exec -i" in line]
    assert command == [
        "kubectl -n tenant-acme get secret acme-postgres -o jsonpath='{.data.postgres-password}' | base64 -d \\",
        """| sed "s/'/''/g; s/.*/ALTER ROLE CURRENT_USER PASSWORD '&';/" \\""",
        "| kubectl -n tenant-acme exec -i deployment/acme-postgres -c postgres -- psql -v ON_ERROR_STOP=1 -U postgres -d postgres",
    ]
    # The README shows the same command.
    readme = [line.strip() for line in (chartlib.CHART / "README.md").read_text().splitlines()]
    start = readme.index(command[0])
    assert readme[start : start + 3] == command
    assert "ALTER ROLE" not in one.notes  # a fresh install has no password to change


def test_notes_show_how_to_restore(one, many):
    assert "--from=cronjob/acme-restore" in one.notes
    assert "kubectl set env --local -f - KURA_RESTORE_SOURCE=postgres KURA_RESTORE_BACKUP=" in one.notes
    assert "--from=cronjob/acme-backup" in one.notes
    assert "and 180 more" in many.notes


def test_fluent_bit_ships_to_loki_and_archives_to_object_storage(three):
    (config,) = [c for c in three.of_kind("ConfigMap") if c["metadata"]["name"] == "kura-fluent-bit"]
    conf = config["data"]["fluent-bit.conf"]
    sections = re.split(r"\n(?=\s*\[)", conf)
    outputs = {re.search(r"Name\s+(\S+)", s).group(1): s for s in sections if "[OUTPUT]" in s}
    loki, s3 = outputs["loki"], outputs["s3"]
    assert re.search(r"Host\s+logs-prod-eu-west-0.grafana.net\n", loki)
    assert re.search(r"Port\s+443\n", loki) and re.search(r"tls\s+On\n", loki)
    assert re.search(r"Uri\s+/loki/api/v1/push\n", loki)
    assert re.search(r"Tenant_ID\s+acme-saas\n", loki)
    assert "tenant=$kubernetes['labels']['kura.io/tenant']" in loki
    assert re.search(r"Bucket\s+acme-saas-backups\n", s3)
    assert re.search(r"Endpoint\s+https://s3.direct.eu-de.cloud-object-storage.appdomain.cloud\n", s3)
    assert "[FILTER]" in conf and "kubernetes" in conf
    ds = three.get("DaemonSet", "kura-fluent-bit", chartlib.RELEASE_NAMESPACE)
    env = env_of(ds["spec"]["template"]["spec"]["containers"][0])
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kura-fluent-bit-object-storage"
    assert env["LOKI_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kura-fluent-bit-loki"
    (binding,) = three.of_kind("ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kura-fluent-bit", "namespace": chartlib.RELEASE_NAMESPACE}]


def test_hash_annotations_are_quoted_strings():
    # A truncated SHA-256 like "123456e789012345" or "8412339054117213" is a number to YAML, and
    # Kubernetes rejects a non-string annotation. With generated passwords in the hashed data
    # that happened at random (about one render of 200 tenants in four), so the templates must
    # quote every hash they print.
    offenders = []
    for path in chartlib.CHART.joinpath("templates").rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r":\s*\{\{[^}]*sha256sum[^}]*\}\}", line) and "| quote" not in line:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
