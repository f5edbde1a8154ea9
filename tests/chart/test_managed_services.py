"""IBM Cloud IAM API keys for ICOS (objectStorage.credentials.apikey, .type) and databases managed
outside the chart (postgres.external, couchdb.external): the environment kura reads, the Secrets
it comes from, the CA files it is pointed at and their mounts, and the NetworkPolicies that let it
through. tests/chart/values/managed-services.yaml is the main render; the rest varies one tenant."""

from __future__ import annotations

import base64
import hashlib
import json

import helm_python as helm
import pytest

import chartlib
from chartlib import Endpoint, connection_allowed, pod_templates, render
from conftest import one_tenant_values, values_file

# tests/chart/values/managed-services.yaml
APIKEY = "kura-test-apikey-0123456789abcdefghijklmnopqrstuvwxyzAB"
INSTANCE = "crn:v1:bluemix:public:cloud-object-storage:global:a/0123456789abcdef0123456789abcdef:01234567-89ab-cdef-0123-456789abcdef::"
ACME_PG_HOST = "0a1b2c3d-4e5f-6789-abcd-ef0123456789.c1ogj3sd0tgtu0lqde00.databases.appdomain.cloud"
ACME_PG_ADDRESSES = ("166.9.48.21", "166.9.56.17")
ACME_COUCH_ADDRESS = "10.240.64.6"
INITECH_PG_ADDRESS = "10.240.64.5"
INITECH_IAM_ADDRESS = "104.96.1.1"  # inside initech's objectStorage.iamEgress

PRIVATE_IAM = "https://private.iam.cloud.ibm.com/identity/token"
PUBLIC_IAM = "https://iam.cloud.ibm.com/identity/token"
HMAC_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
APIKEY_ENV = {"IBM_API_KEY_ID", "IBM_AUTH_ENDPOINT"}
IBM_ENV = APIKEY_ENV | {"IBM_SERVICE_INSTANCE_ID"}
CA_MOUNT = {"name": "tls-ca", "mountPath": "/etc/kura/tls", "readOnly": True}
PG_CA = "/etc/kura/tls/postgres/ca.crt"
COUCH_CA = "/etc/kura/tls/couchdb/ca.crt"
# Every kura Job and the `helm test` pod of a tenant with status and a deep verify of both sources.
KURA_POD_OWNERS = {"backup", "restore", "status", "verify-postgres", "verify-couchdb", "test"}

EXTERNAL_PG = {
    "host": "pg.acme.example.com",
    "port": 31234,
    "caSecret": {"name": "acme-pg-ca"},
    "egress": {"cidrs": ["10.240.64.5/32"]},
}
EXTERNAL_COUCH = {"url": "https://couch.acme.example.com:6984", "caSecret": {"name": "acme-couch-ca"}, "egress": {"cidrs": ["10.240.64.6/32"]}}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env") or []}


def storage_containers(rendered, namespace: str):
    """(pod template, container) for every container of the namespace that talks to the object
    store: the ones with KURA_STORAGE."""
    for t in pod_templates(rendered.in_namespace(namespace)):
        for c in t.containers():
            if "KURA_STORAGE" in env_of(c):
                yield t, c


def owner_suffix(t, tenant: str) -> str:
    return t.owner["metadata"]["name"].removeprefix(f"{tenant}-")


def pod(rendered, name: str) -> Endpoint:
    (t,) = [t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == name]
    return Endpoint.pod(t.namespace, t.labels, {"kubernetes.io/metadata.name": t.namespace})


def with_tenant(tenant: dict, **values) -> dict:
    base = chartlib.merge(one_tenant_values(), values)
    return chartlib.merge(base, {"tenants": {"acme": tenant}})


def apikey_only(**credentials) -> dict:
    return {"objectStorage": {"credentials": {"apikey": APIKEY, **credentials}}, "tenants": {"acme": {}}}


def render_error(values: dict) -> str:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    return str(failure.value)


def schema_error(values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    return str(failure.value)


# --- IAM API key -------------------------------------------------------------------------------


def test_api_key_value_reaches_every_kura_container_from_the_secret(managed):
    found = set()
    for t, c in storage_containers(managed, "tenant-acme"):
        env = env_of(c)
        where = f"{t.where}/{c['name']}"
        assert env["IBM_API_KEY_ID"] == {
            "name": "IBM_API_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "acme-object-storage", "key": "apikey"}},
        }, where
        assert env["IBM_AUTH_ENDPOINT"]["value"] == PRIVATE_IAM, where
        assert env["IBM_SERVICE_INSTANCE_ID"]["value"] == INSTANCE, where
        assert not HMAC_ENV & set(env), where
        ref = env["IBM_API_KEY_ID"]["valueFrom"]["secretKeyRef"]
        assert base64.b64decode(managed.get("Secret", ref["name"], "tenant-acme")["data"][ref["key"]]).decode() == APIKEY, where
        found.add(owner_suffix(t, "acme"))
    assert found == KURA_POD_OWNERS
    secret = managed.get("Secret", "acme-object-storage", "tenant-acme")
    assert secret["data"] == {"apikey": base64.b64encode(APIKEY.encode()).decode()}
    # The apps and their wait-for initContainers never see object-storage credentials.
    for t in pod_templates(managed.in_namespace("tenant-acme")):
        if t.labels.get("app.kubernetes.io/component") == "app":
            for c in t.containers():
                assert not (IBM_ENV | HMAC_ENV) & set(env_of(c)), t.where


@pytest.mark.parametrize(
    "kind, expected",
    [(None, HMAC_ENV), ("hmac", HMAC_ENV), ("apikey", APIKEY_ENV), ("both", HMAC_ENV | APIKEY_ENV)],
    ids=["default", "hmac", "apikey", "both"],
)
def test_existing_secret_type_says_which_keys_are_wired(kind, expected):
    credentials = {"existingSecret": "acme-icos", "apikeyKey": "ibm-api-key"}
    if kind:
        credentials["type"] = kind
    rendered = render({"objectStorage": {"credentials": credentials}, "tenants": {"acme": {}}})
    containers = list(storage_containers(rendered, "tenant-acme"))
    assert {owner_suffix(t, "acme") for t, _ in containers} == {"backup", "restore", "test"}
    for t, c in containers:
        env = env_of(c)
        assert (HMAC_ENV | IBM_ENV) & set(env) == expected, t.where
        refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in expected if name != "IBM_AUTH_ENDPOINT"}
        keys = {"AWS_ACCESS_KEY_ID": "access-key-id", "AWS_SECRET_ACCESS_KEY": "secret-access-key", "IBM_API_KEY_ID": "ibm-api-key"}
        assert refs == {name: {"name": "acme-icos", "key": keys[name]} for name in refs}, t.where
        if "IBM_AUTH_ENDPOINT" in expected:
            assert env["IBM_AUTH_ENDPOINT"]["value"] == PRIVATE_IAM
    # The chart cannot know what the Secret holds and creates none of its own.
    assert rendered.find("Secret", "acme-object-storage") is None


def test_existing_secrets_of_the_managed_values(managed):
    # globex: type both, the default key names; initech: type apikey, its own key, public IAM.
    for _, c in storage_containers(managed, "tenant-globex"):
        env = env_of(c)
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "globex-icos", "key": "access-key-id"}
        assert env["IBM_API_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "globex-icos", "key": "apikey"}
    for _, c in storage_containers(managed, "tenant-initech"):
        env = env_of(c)
        assert not HMAC_ENV & set(env)
        assert env["IBM_API_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "initech-icos", "key": "ibm-api-key"}
        assert env["IBM_AUTH_ENDPOINT"]["value"] == PUBLIC_IAM
    assert managed.find("Secret", "globex-object-storage") is None
    assert managed.find("Secret", "initech-object-storage") is None


def test_hmac_keys_and_an_api_key_together(managed):
    # umbrella: its own HMAC keys plus the default API key. One Secret holds all three; kura gets
    # both kinds and uses the HMAC keys (its own rule, documented in values.yaml and the README).
    secret = managed.get("Secret", "umbrella-object-storage", "tenant-umbrella")
    assert set(secret["data"]) == {"access-key-id", "secret-access-key", "apikey"}
    for t, c in storage_containers(managed, "tenant-umbrella"):
        env = env_of(c)
        assert HMAC_ENV | IBM_ENV <= set(env), t.where
        assert {env[n]["valueFrom"]["secretKeyRef"]["name"] for n in ("AWS_ACCESS_KEY_ID", "IBM_API_KEY_ID")} == {"umbrella-object-storage"}
    for doc in (chartlib.CHART / "README.md", chartlib.CHART / "values.yaml"):
        text = " ".join(w for w in doc.read_text().split() if w != "#")
        assert "HMAC keys win when both are configured; kura logs which one it uses" in text, doc.name


def test_hmac_only_renders_no_ibm_variables(one):
    for t, c in storage_containers(one, "tenant-acme"):
        assert not IBM_ENV & set(env_of(c)), t.where
        assert HMAC_ENV <= set(env_of(c)), t.where
    assert set(one.get("Secret", "acme-object-storage")["data"]) == {"access-key-id", "secret-access-key"}


def test_service_instance_id_is_plain_env_only_when_set():
    rendered = render(apikey_only())
    for t, c in storage_containers(rendered, "tenant-acme"):
        assert "IBM_SERVICE_INSTANCE_ID" not in env_of(c), t.where
        assert APIKEY_ENV <= set(env_of(c)), t.where


def test_the_api_key_appears_only_in_the_secret(managed):
    tenant_key = "tenant-own-Apikey-value-9876543210"
    values = chartlib.merge(values_file("managed-services.yaml"), {"tenants": {"acme": {"objectStorage": {"credentials": {"apikey": tenant_key}}}}})
    for rendered, keys in ((managed, [APIKEY]), (render(values), [APIKEY, tenant_key])):
        text = json.dumps([o for o in rendered.objects if o["kind"] != "Secret"]) + rendered.notes
        assert [k for k in keys if k in text] == []
        # No ConfigMap and no env value anywhere: the key only ever travels by secretKeyRef.
        for t in pod_templates(rendered.objects):
            for c in t.containers():
                assert not [e for e in c.get("env") or [] if any(k in str(e.get("value", "")) for k in keys)], t.where
        secrets = json.dumps(rendered.of_kind("Secret"))
        assert all(base64.b64encode(k.encode()).decode() in secrets for k in keys)
    # The tenant's own key went to its Secret, the default one to the other tenants'.
    own = render(values).get("Secret", "acme-object-storage", "tenant-acme")
    assert base64.b64decode(own["data"]["apikey"]).decode() == tenant_key


def test_iam_egress_only_with_an_api_key(managed, one):
    def storage_rules(rendered, tenant):
        return rendered.get("NetworkPolicy", f"{tenant}-object-storage-clients")["spec"]["egress"]

    iam = {"cidrs": ["104.96.0.0/16"], "ports": [443]}
    # HMAC only: the ICOS rule alone, whatever iamEgress says.
    assert len(storage_rules(one, "acme")) == 1
    hmac_only = render(chartlib.merge(one_tenant_values(), {"objectStorage": {"iamEgress": iam}}))
    assert len(storage_rules(hmac_only, "acme")) == 1
    assert not connection_allowed(hmac_only.of_kind("NetworkPolicy"), pod(hmac_only, "acme-backup"), Endpoint.address(INITECH_IAM_ADDRESS), 443)
    # With an API key: a second rule to iamEgress, for the pods that talk to the object store.
    for rendered, tenant in ((render(chartlib.merge(apikey_only(), {"objectStorage": {"iamEgress": iam}})), "acme"), (managed, "initech")):
        rules = storage_rules(rendered, tenant)
        assert rules[1] == {"to": [{"ipBlock": {"cidr": "104.96.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
        policies = rendered.of_kind("NetworkPolicy")
        address = Endpoint.address(INITECH_IAM_ADDRESS)
        for job in ("backup", "restore", "test"):
            assert connection_allowed(policies, pod(rendered, f"{tenant}-{job}"), address, 443), job
            assert not connection_allowed(policies, pod(rendered, f"{tenant}-{job}"), address, 80), job
    assert not connection_allowed(managed.of_kind("NetworkPolicy"), pod(managed, "initech-web"), Endpoint.address(INITECH_IAM_ADDRESS), 443)
    # The defaults: IBM's private service networks, where private.iam.cloud.ibm.com lives.
    defaults = storage_rules(render(apikey_only()), "acme")[1]
    assert defaults == {"to": [{"ipBlock": {"cidr": "166.8.0.0/14"}}, {"ipBlock": {"cidr": "161.26.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    # An empty list would make a rule without peers, open to every address: refused.
    assert "objectStorage.iamEgress" in render_error(chartlib.merge(apikey_only(), {"objectStorage": {"iamEgress": {"cidrs": []}}}))
    assert render(chartlib.merge(apikey_only(), {"objectStorage": {"iamEgress": {"cidrs": []}}, "networkPolicy": {"enabled": False}})).of_kind("NetworkPolicy") == []


def fluent_bit(**credentials) -> dict:
    return {
        "objectStorage": {"credentials": credentials},
        "fluentBit": {"enabled": True, "loki": {"url": "https://loki.example.com/loki/api/v1/push"}},
    }


def test_fluent_bit_archive_refuses_an_api_key_only():
    for credentials in ({"apikey": APIKEY}, {"existingSecret": "icos", "type": "apikey"}):
        message = render_error(fluent_bit(**credentials))
        assert "fluentBit.archive" in message and "cannot use an IBM Cloud API key" in message, credentials
        assert APIKEY not in message
    # Without the archive, Fluent Bit needs no object-storage credentials at all.
    off = chartlib.merge(fluent_bit(apikey=APIKEY), {"fluentBit": {"archive": {"enabled": False}}})
    ds = render(off).get("DaemonSet", "kura-fluent-bit")
    assert not HMAC_ENV & set(env_of(ds["spec"]["template"]["spec"]["containers"][0]))


def test_fluent_bit_archive_takes_the_hmac_keys_of_mixed_credentials():
    # An existing Secret with both: the HMAC keys from it, the API key not wired.
    rendered = render(fluent_bit(existingSecret="icos", type="both"))
    env = env_of(rendered.get("DaemonSet", "kura-fluent-bit")["spec"]["template"]["spec"]["containers"][0])
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "icos", "key": "access-key-id"}
    assert not IBM_ENV & set(env)
    # Values with both: Fluent Bit's own Secret holds only the HMAC keys.
    rendered = render(fluent_bit(accessKeyId="a", secretAccessKey="s", apikey=APIKEY))
    assert set(rendered.get("Secret", "kura-fluent-bit-object-storage")["data"]) == {"access-key-id", "secret-access-key"}


def test_credentials_are_required_in_some_form():
    message = render_error({"tenants": {"acme": {}}})
    assert "objectStorage.credentials" in message and "apikey" in message and "existingSecret" in message
    # An API key alone, or HMAC keys alone, is enough.
    assert render(apikey_only()).find("CronJob", "acme-backup")
    assert render(one_tenant_values()).find("CronJob", "acme-backup")


# --- databases managed outside the chart --------------------------------------------------------


def test_external_databases_have_nothing_in_the_cluster(managed):
    ns = managed.in_namespace("tenant-acme")
    for o in ns:
        name = o["metadata"]["name"]
        if o["kind"] in ("Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret"):
            assert "postgres" not in name and "couchdb" not in name, (o["kind"], name)
    assert managed.find("ServiceAccount", "acme-databases") is None
    # No ingress policy for a server pod that does not exist; the clients' egress stays.
    assert managed.find("NetworkPolicy", "acme-postgres") is None and managed.find("NetworkPolicy", "acme-couchdb") is None
    assert managed.get("NetworkPolicy", "acme-postgres-clients") and managed.get("NetworkPolicy", "acme-couchdb-clients")
    # initech: external PostgreSQL, in-cluster CouchDB.
    kinds = {(o["kind"], o["metadata"]["name"]) for o in managed.in_namespace("tenant-initech")}
    assert ("Deployment", "initech-couchdb") in kinds and ("ServiceAccount", "initech-databases") in kinds
    assert not {k for k in kinds if k[1].startswith("initech-postgres") and k[0] in ("Deployment", "Service", "PersistentVolumeClaim")}


def test_external_postgres_url_has_sslmode_and_the_mounted_ca(managed):
    url = f"postgres://admin@{ACME_PG_HOST}:31234/ibmclouddb?sslmode=verify-full&sslrootcert={PG_CA}"
    found = set()
    for t in pod_templates(managed.in_namespace("tenant-acme")):
        for c in t.containers():
            env = env_of(c)
            if "KURA_POSTGRES_URL" in env:
                assert env["KURA_POSTGRES_URL"]["value"] == url, t.where
                assert env["KURA_POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "acme-icd-postgres", "key": "password"}
                found.add(owner_suffix(t, "acme"))
    assert found == KURA_POD_OWNERS
    web = next(t for t in pod_templates(managed.objects) if t.owner["metadata"]["name"] == "acme-web")
    (wait,) = [c for c in web.spec["initContainers"] if c["name"] == "wait-for-postgres"]
    assert wait["args"][:3] == ["wait-for", "postgres", url]
    # initech: sslmode alone without a CA, and the password it was given (never a generated one).
    backup = env_of(chartlib.container(next(t for t in pod_templates(managed.objects) if t.owner["metadata"]["name"] == "initech-backup"), "kura"))
    assert backup["KURA_POSTGRES_URL"]["value"] == f"postgres://postgres@{INITECH_PG_ADDRESS}:5432/postgres?sslmode=require"
    secret = managed.get("Secret", "initech-postgres", "tenant-initech")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {"postgres-password": "initech-db-password"}


def test_external_couchdb_url_and_ca_file(managed):
    found = set()
    for t in pod_templates(managed.in_namespace("tenant-acme")):
        for c in t.containers():
            env = env_of(c)
            if "KURA_COUCHDB_URL" in env:
                assert env["KURA_COUCHDB_URL"]["value"] == "https://admin@couchdb.acme.example.com:6984", t.where
                assert env["KURA_COUCHDB_CA_FILE"]["value"] == COUCH_CA, t.where
                found.add(owner_suffix(t, "acme"))
    assert found == KURA_POD_OWNERS
    web = next(t for t in pod_templates(managed.objects) if t.owner["metadata"]["name"] == "acme-web")
    (wait,) = [c for c in web.spec["initContainers"] if c["name"] == "wait-for-couchdb"]
    assert wait["args"][:3] == ["wait-for", "couchdb", "https://admin@couchdb.acme.example.com:6984"]
    assert env_of(wait)["KURA_COUCHDB_CA_FILE"]["value"] == COUCH_CA
    # In-cluster CouchDB: plain http to the Service, no CA.
    for t in pod_templates(managed.in_namespace("tenant-initech")):
        for c in t.containers():
            assert "KURA_COUCHDB_CA_FILE" not in env_of(c), t.where


def references_ca(c: dict) -> list[str]:
    text = json.dumps([c.get("env", []), c.get("args", [])])
    return [path for path in (PG_CA, COUCH_CA) if path in text]


def test_every_ca_path_the_chart_names_is_mounted(managed):
    containers = 0
    for t in pod_templates(managed.objects):
        volumes = {v["name"]: v for v in t.spec.get("volumes", [])}
        for c in t.containers():
            paths = references_ca(c)
            app = t.labels.get("app.kubernetes.io/component") == "app" and c["name"] == t.labels.get("kura.io/app")
            if not paths and not app:
                assert CA_MOUNT not in c.get("volumeMounts", []), f"{t.where}/{c['name']}"
                continue
            if t.namespace != "tenant-acme":
                assert not paths and "tls-ca" not in volumes, f"{t.where}/{c['name']}"
                continue
            containers += 1
            assert CA_MOUNT in c["volumeMounts"], f"{t.where}/{c['name']}"
            projected = volumes["tls-ca"]["projected"]
            assert projected["defaultMode"] == 0o444
            files = {
                f"{CA_MOUNT['mountPath']}/{item['path']}": (s["secret"]["name"], item["key"])
                for s in projected["sources"]
                for item in s["secret"]["items"]
            }
            assert files == {PG_CA: ("acme-icd-postgres-ca", "ca.crt"), COUCH_CA: ("acme-couchdb-ca", "ca.pem")}
            assert set(paths) <= set(files)
    # backup, restore, status, 2 verify, the test pod's 2 wait-for and its kura, and the web app's
    # 2 wait-for and the app container itself.
    assert containers == 11
    # The app gets the CA files' paths in its ConfigMap with the external host and sslmode.
    config = managed.get("ConfigMap", "acme-app-config")["data"]
    assert config["POSTGRES_HOST"] == ACME_PG_HOST and config["POSTGRES_PORT"] == "31234"
    assert config["POSTGRES_SSLMODE"] == "verify-full" and config["POSTGRES_SSLROOTCERT"] == PG_CA
    assert config["COUCHDB_URL"] == "https://couchdb.acme.example.com:6984" and config["COUCHDB_CA_FILE"] == COUCH_CA
    assert config["POSTGRES_USER"] == "admin"
    initech = managed.get("ConfigMap", "initech-app-config")["data"]
    assert initech["POSTGRES_HOST"] == INITECH_PG_ADDRESS and initech["POSTGRES_SSLMODE"] == "require"
    assert "POSTGRES_SSLROOTCERT" not in initech
    assert initech["COUCHDB_URL"] == "http://initech-couchdb.tenant-initech.svc:5984"


def test_external_databases_egress(managed):
    policies = managed.of_kind("NetworkPolicy")
    allowed = lambda src, ip, port: connection_allowed(policies, pod(managed, src), Endpoint.address(ip), port)
    for address in ACME_PG_ADDRESSES:
        for client in ("acme-backup", "acme-restore", "acme-verify-postgres", "acme-test", "acme-web"):
            assert allowed(client, address, 31234), (client, address)
            assert not allowed(client, address, 5432), (client, address)
        assert not allowed("acme-status", address, 31234)  # status reads only the bucket
    for client in ("acme-backup", "acme-restore", "acme-verify-couchdb", "acme-web"):
        assert allowed(client, ACME_COUCH_ADDRESS, 6984), client
    assert not allowed("acme-backup", "10.240.64.7", 6984)
    assert not allowed("acme-verify-postgres", ACME_COUCH_ADDRESS, 6984)
    assert allowed("initech-backup", INITECH_PG_ADDRESS, 5432)
    # Another tenant's external server stays out of reach.
    assert not allowed("initech-backup", ACME_PG_ADDRESSES[0], 31234)
    assert not allowed("globex-backup", INITECH_PG_ADDRESS, 5432)


def test_app_config_checksum_follows_the_external_server():
    def checksum(tenant):
        rendered = render(with_tenant({"apps": {"web": {"image": {"repository": "icr.io/acme/web", "tag": "1"}, "ports": {"http": 8080}}}, **tenant}))
        return rendered.get("Deployment", "acme-web")["spec"]["template"]["metadata"]["annotations"]["checksum/app-config"]

    # In-cluster: the same hash as before external servers existed, so an upgrade restarts no app.
    assert checksum({}) == hashlib.sha256(b"[{},5432,5984]").hexdigest()[:16]
    first = checksum({"postgres": {"auth": {"password": "p"}, "external": EXTERNAL_PG}})
    moved = checksum({"postgres": {"auth": {"password": "p"}, "external": {**EXTERNAL_PG, "host": "pg2.acme.example.com"}}})
    assert len({checksum({}), first, moved}) == 3


@pytest.mark.parametrize(
    "url, kura_url, port",
    [
        ("https://couch.example.com", "https://admin@couch.example.com", 443),
        ("http://couch.example.com/", "http://admin@couch.example.com", 80),
        ("https://proxy.example.com:8443/couchdb/", "https://admin@proxy.example.com:8443/couchdb", 8443),
    ],
    ids=["https-default-port", "http-default-port", "port-and-path"],
)
def test_external_couchdb_url_forms(url, kura_url, port):
    rendered = render(with_tenant({"couchdb": {"auth": {"password": "c"}, "external": {"url": url, "egress": {"cidrs": ["10.0.0.9/32"]}}}}))
    env = env_of(chartlib.container(next(t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == "acme-backup"), "kura"))
    assert env["KURA_COUCHDB_URL"]["value"] == kura_url
    assert "KURA_COUCHDB_CA_FILE" not in env
    (rule,) = rendered.get("NetworkPolicy", "acme-couchdb-clients")["spec"]["egress"]
    assert rule == {"to": [{"ipBlock": {"cidr": "10.0.0.9/32"}}], "ports": [{"port": port, "protocol": "TCP"}]}
    # No CA: no volume anywhere; the Secret holds the given password alone (no cookie secrets).
    assert not [v for t in pod_templates(rendered.objects) for v in t.spec.get("volumes", []) if v["name"] == "tls-ca"]
    assert set(rendered.get("Secret", "acme-couchdb")["data"]) == {"admin-password"}


def test_external_postgres_defaults():
    rendered = render(with_tenant({"postgres": {"auth": {"existingSecret": "pg"}, "external": {"host": "pg.example.com", "caSecret": {"name": "pg-ca"}, "egress": {"cidrs": ["10.0.0.8/32"]}}}}))
    env = env_of(chartlib.container(next(t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == "acme-backup"), "kura"))
    assert env["KURA_POSTGRES_URL"]["value"] == f"postgres://postgres@pg.example.com:5432/postgres?sslmode=verify-full&sslrootcert={PG_CA}"
    (rule,) = rendered.get("NetworkPolicy", "acme-postgres-clients")["spec"]["egress"]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    (volume,) = [v for v in rendered.get("CronJob", "acme-backup")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls-ca"]
    assert volume["projected"]["sources"] == [{"secret": {"name": "pg-ca", "items": [{"key": "ca.crt", "path": "postgres/ca.crt"}]}}]
    assert rendered.find("Secret", "acme-postgres") is None
    # The in-cluster CouchDB next to it is untouched.
    assert rendered.get("Deployment", "acme-couchdb")


@pytest.mark.parametrize(
    "tenant, message",
    [
        ({"postgres": {"auth": {"password": "p"}, "external": {**EXTERNAL_PG, "egress": {"cidrs": []}}}}, "postgres.external.egress.cidrs is required"),
        ({"postgres": {"auth": {"password": "p"}, "external": without(EXTERNAL_PG, "egress")}}, "nslookup pg.acme.example.com"),
        ({"couchdb": {"auth": {"password": "c"}, "external": without(EXTERNAL_COUCH, "egress")}}, "couchdb.external.egress.cidrs is required"),
        ({"postgres": {"external": EXTERNAL_PG}}, "postgres.external needs the server's password"),
        ({"couchdb": {"external": EXTERNAL_COUCH}}, "couchdb.external needs the server's password"),
        ({"postgres": {"auth": {"password": "p"}, "external": without(EXTERNAL_PG, "caSecret")}}, "postgres.external.caSecret"),
        ({"postgres": {"auth": {"password": "p"}, "external": {**without(EXTERNAL_PG, "caSecret"), "sslmode": "verify-ca"}}}, "sslmode verify-ca"),
        ({"couchdb": {"auth": {"password": "c"}, "external": {**EXTERNAL_COUCH, "url": "http://couch.acme.example.com:5984"}}}, "caSecret is for an https URL"),
    ],
    ids=["pg-empty-cidrs", "pg-no-egress", "couch-no-egress", "pg-no-password", "couch-no-password", "verify-full-without-ca", "verify-ca-without-ca", "ca-over-http"],
)
def test_templates_refuse_incomplete_external_databases(tenant, message):
    assert message in render_error(with_tenant(tenant))


def test_without_network_policies_no_cidrs_are_needed():
    tenant = {
        "postgres": {"auth": {"password": "p"}, "external": without(EXTERNAL_PG, "egress")},
        "couchdb": {"auth": {"password": "c"}, "external": without(EXTERNAL_COUCH, "egress")},
    }
    rendered = render(with_tenant(tenant, networkPolicy={"enabled": False}))
    assert rendered.of_kind("NetworkPolicy") == []
    assert rendered.find("CronJob", "acme-backup")


def test_notes_name_the_tenants_with_external_databases(managed, one):
    assert "External databases (acme, initech)" in managed.notes
    assert "External databases" not in one.notes
    # The ALTER ROLE hint is for servers the chart runs: globex here, never acme.
    upgrade = render(values_file("managed-services.yaml"), is_upgrade=True).notes
    assert "exec -i deployment/globex-postgres" in upgrade and "acme-postgres" not in upgrade


@pytest.mark.parametrize(
    "values, where",
    [
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "sslmode": "verify_full"}}}), "sslmode"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "sslmode": "VERIFY-FULL"}}}), "sslmode"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "port": 0}}}), "port"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "port": 65536}}}), "port"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "port": "5432"}}}), "port"),
        (with_tenant({"postgres": {"external": without(EXTERNAL_PG, "host")}}), "host"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "host": "pg.acme.example.com:5432"}}}), "host"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "host": "postgres://pg.acme.example.com"}}}), "host"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "hostname": "pg"}}}), "hostname"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "caSecret": {"key": "ca.crt"}}}}), "name"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "caSecret": {"name": "Acme_CA"}}}}), "caSecret"),
        (with_tenant({"postgres": {"external": {**EXTERNAL_PG, "egress": {"cidrs": ["10.240.64.5"]}}}}), "cidrs"),
        (with_tenant({"couchdb": {"external": {**EXTERNAL_COUCH, "url": "couch.acme.example.com:6984"}}}), "url"),
        (with_tenant({"couchdb": {"external": {**EXTERNAL_COUCH, "url": "ftp://couch.acme.example.com"}}}), "url"),
        (with_tenant({"couchdb": {"external": {**EXTERNAL_COUCH, "url": "https://admin:secret@couch.acme.example.com"}}}), "url"),
        (with_tenant({"couchdb": {"external": {"caSecret": {"name": "ca"}}}}), "url"),
        ({"objectStorage": {"credentials": {"existingSecret": "icos", "type": "iam"}}}, "type"),
        ({"objectStorage": {"iamEndpoint": "http://iam.cloud.ibm.com/identity/token"}}, "iamEndpoint"),
        ({"objectStorage": {"iamEgress": {"ports": [0]}}}, "iamEgress"),
        ({"tenants": {"acme": {"objectStorage": {"credentials": {"apiKey": APIKEY}}}}}, "apiKey"),
    ],
    ids=[
        "sslmode-underscore", "sslmode-case", "port-zero", "port-too-big", "port-string", "no-host", "host-with-port",
        "host-url", "unknown-key", "ca-without-name", "ca-bad-name", "cidr-without-prefix", "url-without-scheme",
        "url-scheme", "url-with-password", "no-url", "credentials-type", "iam-over-http", "iam-port", "misspelled-apikey",
    ],
)
def test_schema_rejects_bad_managed_service_values(values, where):
    message = schema_error(values)
    assert where in message
    if where == "apiKey":
        assert APIKEY not in message  # the error names the key, never echoes the value
