"""The chart and the kura binary cannot drift apart unnoticed.

Each test takes a container exactly as the chart renders it — command, args, env, with Secrets
and ConfigMaps resolved from the same render and $(VAR) expanded the way the kubelet does — and
runs the real kura binary with it. The only changes are the ones a cluster makes: the database
hosts and the object-storage endpoint point at the test services on 127.0.0.1, and the image's
/usr/local/bin/kura is the freshly built binary. Everything else (user names, database names,
sources, tenant, bucket layout, retention, flags) is what the chart renders.

PostgreSQL is a throwaway cluster of its own, initialised with the password the chart generated:
a restore of `latest` restores every database of the backup, which needs a server holding only
what this test put there. CouchDB and S3 are the shared test services (scripts/services).

Inputs (exported by `eval "$(scripts/services start)"`): KURA_BIN, KURA_TEST_S3_ENDPOINT,
KURA_TEST_COUCH_URL, KURA_TEST_PG_BIN. Missing ones skip these tests, except in CI (CI=true),
where they fail.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

import chartlib
from chartlib import argv, container, pod_templates, render, resolve_env

TENANT = "contract"
NAMESPACE = f"tenant-{TENANT}"
IMAGE_BINARY = "/usr/local/bin/kura"
RUN_TIMEOUT = 300


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: a missing service or binary is a failure)")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin_dir() -> Path | None:
    if os.environ.get("KURA_TEST_PG_BIN"):
        return Path(os.environ["KURA_TEST_PG_BIN"])
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return candidates[-1] if candidates else None


# --- the services -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kura_bin() -> str:
    path = os.environ.get("KURA_BIN") or str(Path.home() / ".cache/kura-test/target/debug/kura")
    require(os.access(path, os.X_OK), f"no kura binary at {path} (set KURA_BIN)")
    return path


@pytest.fixture(scope="module")
def s3():
    endpoint = os.environ.get("KURA_TEST_S3_ENDPOINT")
    require(bool(endpoint), "KURA_TEST_S3_ENDPOINT is not set (scripts/services start)")
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="kura-chart-test",
        aws_secret_access_key="kura-chart-test-secret",
    )
    bucket = f"kura-chart-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return endpoint, client, bucket


@pytest.fixture(scope="module")
def couch():
    url = os.environ.get("KURA_TEST_COUCH_URL")
    require(bool(url), "KURA_TEST_COUCH_URL is not set (scripts/services start)")
    parsed = urllib.parse.urlsplit(url)
    base = f"{parsed.scheme}://{parsed.hostname}:{parsed.port}"
    auth = "Basic " + base64.b64encode(f"{parsed.username}:{urllib.parse.unquote(parsed.password)}".encode()).decode()

    def call(method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": auth, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    database = f"kura_chart_{uuid.uuid4().hex[:10]}"
    call("PUT", f"/{database}")
    call("PUT", f"/{database}/order-1", {"total": 42, "items": ["tea"]})
    yield {"host": parsed.hostname, "port": parsed.port, "user": parsed.username,
           "password": urllib.parse.unquote(parsed.password), "database": database, "call": call}
    try:
        call("DELETE", f"/{database}")
    except urllib.error.URLError:
        pass


class ScratchPostgres:
    """A PostgreSQL cluster of the test's own, password-protected like the chart's."""

    def __init__(self, password: str):
        bindir = pg_bin_dir()
        require(bindir is not None and (bindir / "initdb").exists(), "no PostgreSQL server binaries (KURA_TEST_PG_BIN)")
        self.bin = bindir
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="kura-chart-pg."))
        self.dir.chmod(0o755)
        self.port = free_port()
        (self.dir / "pwfile").write_text(password + "\n")
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.dir / "pwfile", "postgres")
        self._as_server(
            [self.bin / "initdb", "-D", self.dir / "data", "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={self.dir / 'pwfile'}", "--encoding=UTF8", "--locale=C.UTF-8"]
        )
        self._as_server(
            [self.bin / "pg_ctl", "-D", self.dir / "data", "-l", self.dir / "server.log", "-w", "-t", "60",
             "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]
        )

    def _as_server(self, command: list) -> None:
        command = [str(c) for c in command]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--"] + command
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-v", "ON_ERROR_STOP=1", "-At", "-c", statement],
            env={"PATH": os.environ["PATH"], "PGPASSWORD": self.password},
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def stop(self) -> None:
        try:
            self._as_server([self.bin / "pg_ctl", "-D", self.dir / "data", "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the chart, rendered for the test ---------------------------------------------------------


def contract_values(s3, couch) -> dict:
    _, _, bucket = s3
    return {
        "objectStorage": {
            "bucket": bucket,
            "prefix": "chart-contract",
            # moto answers on 127.0.0.1, where no virtual-hosted bucket names resolve.
            "pathStyle": True,
            "region": "us-east-1",
            "credentials": {"accessKeyId": "kura-chart-test", "secretAccessKey": "kura-chart-test-secret"},
        },
        "tenants": {
            TENANT: {
                # The shared CouchDB has its admin password already; PostgreSQL gets the one the
                # chart generates.
                "couchdb": {"auth": {"password": couch["password"]}},
                "status": {"enabled": True},
                "verify": {"enabled": True},
                "apps": {"web": {"image": {"repository": "icr.io/acme/web", "tag": "1.0.0"}, "ports": {"http": 8080},
                                 "waitFor": ["postgres", "couchdb"]}},
            }
        },
    }


@pytest.fixture(scope="module")
def rendered(s3, couch):
    return render(contract_values(s3, couch))


@pytest.fixture(scope="module")
def postgres(rendered):
    secret = rendered.get("Secret", f"{TENANT}-postgres", NAMESPACE)
    server = ScratchPostgres(base64.b64decode(secret["data"]["postgres-password"]).decode())
    server.sql("CREATE DATABASE shop")
    # A role besides the superuser, which only a restore with --globals brings to a fresh server.
    server.sql("CREATE ROLE shop_reader LOGIN")
    server.sql("CREATE TABLE orders (id int PRIMARY KEY, total numeric); INSERT INTO orders VALUES (1, 9.5), (2, 20)", "shop")
    yield server
    server.stop()


def rewrite_url(url: str, host: str, port: int) -> str:
    """A Service URL of the tenant's namespace → the test service. Others (an operator's
    KURA_RESTORE_TO) stay as they are."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname.endswith(f".{NAMESPACE}.svc"):
        return url
    assert parsed.password is None, f"the chart put a password into {url}"
    userinfo = f"{parsed.username}@" if parsed.username else ""
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{userinfo}{host}:{port}"))


def run_container(kura_bin, rendered, c: dict, s3, couch, postgres, set_env: dict | None = None):
    """Run a rendered container with the kura binary, as the kubelet would start it."""
    endpoint, _, _ = s3
    c = json.loads(json.dumps(c))
    # `kubectl set env` on a Job created from the template: changes values in place.
    for name, value in (set_env or {}).items():
        entries = [e for e in c["env"] if e["name"] == name]
        if entries:
            entries[0].clear()
            entries[0].update({"name": name, "value": value})
        else:
            c["env"].append({"name": name, "value": value})
    env = resolve_env(c, rendered, NAMESPACE)
    targets = {"postgres": ("127.0.0.1", postgres.port), "http": (couch["host"], couch["port"])}
    for name in ("KURA_POSTGRES_URL", "KURA_COUCHDB_URL", "KURA_RESTORE_TO"):
        if name in env:
            env[name] = rewrite_url(env[name], *targets[urllib.parse.urlsplit(env[name]).scheme])
    if "KURA_S3_ENDPOINT" in env:
        env["KURA_S3_ENDPOINT"] = endpoint
    command = argv(c, env)
    assert command[0] == IMAGE_BINARY
    command[0] = kura_bin
    command = [rewrite_url(a, *targets[a.split("://")[0]]) if a.startswith(("postgres://", "http://")) else a for a in command]
    secrets = [v for k, v in env.items() if "PASSWORD" in k or "SECRET" in k]
    assert not [a for a in command if any(s and s in a for s in secrets)], "a secret is on the command line"
    env["PATH"] = os.environ["PATH"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT), command


def template_named(rendered, name: str):
    return next(t for t in pod_templates(rendered.objects) if t.owner["metadata"]["name"] == name)


def explain(result, command) -> str:
    return f"{' '.join(command)}\nexit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"


def backup_ids(client, bucket: str, source: str) -> list[str]:
    prefix = f"chart-contract/{TENANT}/{source}/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return sorted(k[len(prefix):].split("/")[0] for k in keys if k.endswith("/manifest.json"))


@pytest.fixture(scope="module")
def backed_up(kura_bin, rendered, s3, couch, postgres):
    """The backup CronJob's container, run once: every later test needs its backup."""
    c = container(template_named(rendered, f"{TENANT}-backup"), "kura")
    result, command = run_container(kura_bin, rendered, c, s3, couch, postgres)
    assert result.returncode == 0, explain(result, command)
    return result


def test_backup_cronjob_makes_a_complete_backup(backed_up, s3):
    _, client, bucket = s3
    for source in ("postgres", "couchdb"):
        ids = backup_ids(client, bucket, source)
        assert len(ids) == 1, (source, ids)
        manifest = json.loads(
            client.get_object(Bucket=bucket, Key=f"chart-contract/{TENANT}/{source}/{ids[0]}/manifest.json")["Body"].read()
        )
        assert manifest, source
    # JSON log lines on stdout, for Fluent Bit.
    lines = [l for l in backed_up.stdout.splitlines() if l.strip()]
    assert lines and all(json.loads(l) for l in lines)


def test_restore_template_restores_the_chosen_backup(kura_bin, rendered, backed_up, s3, couch, postgres):
    _, client, bucket = s3
    (backup_id,) = backup_ids(client, bucket, "postgres")
    postgres.sql("DROP DATABASE shop")
    c = container(template_named(rendered, f"{TENANT}-restore"), "kura")
    # What the README tells an operator to do: pick the id with `kubectl set env`.
    result, command = run_container(kura_bin, rendered, c, s3, couch, postgres, {"KURA_RESTORE_BACKUP": backup_id})
    assert result.returncode == 0, explain(result, command)
    assert command[1:] == ["restore", "postgres", backup_id]
    assert postgres.sql("SELECT count(*), sum(total) FROM orders", "shop") == "2|29.5"


def test_restore_template_restores_into_another_server(kura_bin, rendered, backed_up, s3, couch, postgres):
    # The README's recipe: KURA_RESTORE_TO with the password filled in by Kubernetes.
    _, client, bucket = s3
    (backup_id,) = backup_ids(client, bucket, "postgres")
    other = ScratchPostgres(postgres.password)
    try:
        target = "postgres://postgres:$(KURA_POSTGRES_PASSWORD)@127.0.0.1:%d/postgres" % other.port
        c = container(template_named(rendered, f"{TENANT}-restore"), "kura")
        result, command = run_container(
            kura_bin, rendered, c, s3, couch, postgres, {"KURA_RESTORE_BACKUP": backup_id, "KURA_RESTORE_TO": target}
        )
        assert result.returncode == 0, explain(result, command)
        assert other.sql("SELECT count(*) FROM orders", "shop") == "2"
        assert postgres.password not in result.stdout + result.stderr
    finally:
        other.stop()


def test_restore_template_with_globals_restores_the_roles_into_a_fresh_server(kura_bin, rendered, backed_up, s3, couch, postgres):
    # Disaster recovery: restore.globals, into a new server that has only its superuser.
    _, client, bucket = s3
    (backup_id,) = backup_ids(client, bucket, "postgres")
    with_globals = render(chartlib.merge(contract_values(s3, couch), {"tenants": {TENANT: {"restore": {"globals": True}}}}))
    c = container(template_named(with_globals, f"{TENANT}-restore"), "kura")
    fresh = ScratchPostgres(postgres.password)
    try:
        role = "SELECT count(*) FROM pg_roles WHERE rolname = 'shop_reader'"
        assert fresh.sql(role) == "0"
        target = "postgres://postgres:$(KURA_POSTGRES_PASSWORD)@127.0.0.1:%d/postgres" % fresh.port
        # Secrets resolved from the first render: its generated password is the servers'.
        result, command = run_container(
            kura_bin, rendered, c, s3, couch, postgres, {"KURA_RESTORE_BACKUP": backup_id, "KURA_RESTORE_TO": target}
        )
        assert result.returncode == 0, explain(result, command)
        assert command[1:] == ["restore", "postgres", backup_id, "--globals"]
        assert fresh.sql(role) == "1"
        assert fresh.sql("SELECT count(*) FROM orders", "shop") == "2"
    finally:
        fresh.stop()


def test_restore_template_refuses_a_database_that_holds_data(kura_bin, rendered, backed_up, s3, couch, postgres):
    c = container(template_named(rendered, f"{TENANT}-restore"), "kura")
    result, command = run_container(kura_bin, rendered, c, s3, couch, postgres, {"KURA_RESTORE_SOURCE": "couchdb"})
    # 7 = restore target not empty; the template's podFailurePolicy fails the Job at once on it.
    assert result.returncode == 7, explain(result, command)
    rules = template_named(rendered, f"{TENANT}-restore").owner["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert 7 in rules[0]["onExitCodes"]["values"]


def test_status_cronjob_passes_after_a_backup(kura_bin, rendered, backed_up, s3, couch, postgres):
    c = container(template_named(rendered, f"{TENANT}-status"), "kura")
    result, command = run_container(kura_bin, rendered, c, s3, couch, postgres)
    assert result.returncode == 0, explain(result, command)


def test_verify_cronjob_verifies_the_latest_backup(kura_bin, rendered, backed_up, s3, couch, postgres):
    c = container(template_named(rendered, f"{TENANT}-verify-postgres"), "kura")
    result, command = run_container(kura_bin, rendered, c, s3, couch, postgres)
    assert result.returncode == 0, explain(result, command)


def test_app_init_containers_wait_for_the_databases(kura_bin, rendered, s3, couch, postgres):
    app = template_named(rendered, f"{TENANT}-web")
    assert [c["name"] for c in app.spec["initContainers"]] == ["wait-for-postgres", "wait-for-couchdb"]
    for c in app.spec["initContainers"]:
        started = time.monotonic()
        result, command = run_container(kura_bin, rendered, c, s3, couch, postgres)
        assert result.returncode == 0, explain(result, command)
        assert time.monotonic() - started < 60


def test_helm_test_pod_passes(kura_bin, rendered, backed_up, s3, couch, postgres):
    pod = template_named(rendered, f"{TENANT}-test")
    for c in pod.containers():
        result, command = run_container(kura_bin, rendered, c, s3, couch, postgres)
        assert result.returncode == 0, explain(result, command)


def test_encrypted_backup_and_a_restore_from_the_template(kura_bin, rendered, s3, couch, postgres, tmp_path):
    """With `encryption.recipients` the backup Job writes age-encrypted parts holding only the
    public key; the restore template reads them with the operator's Secret, mounted where the
    chart says, and nothing else."""
    require(shutil.which("age-keygen") is not None, "age-keygen is not installed")
    keyfile = tmp_path / "operator.txt"
    subprocess.run(["age-keygen", "-o", str(keyfile)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(keyfile)], check=True, capture_output=True, text=True).stdout.strip()
    values = contract_values(s3, couch)
    values["objectStorage"]["prefix"] = "chart-contract-enc"
    tenant = values["tenants"][TENANT]
    # The same server as the other tests: its password, not a newly generated one.
    tenant["postgres"] = {"auth": {"password": postgres.password}}
    tenant["encryption"] = {"recipients": [public], "identitySecret": "kura-age-identity"}
    encrypted = render(values)

    backup = container(template_named(encrypted, f"{TENANT}-backup"), "kura")
    assert not any(e["name"] == "KURA_IDENTITY_FILE" for e in backup["env"]), "the backup job holds no key"
    result, command = run_container(kura_bin, encrypted, backup, s3, couch, postgres)
    assert result.returncode == 0, explain(result, command)
    _, client, bucket = s3
    prefix = f"chart-contract-enc/{TENANT}/postgres/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    (manifest_key,) = [k for k in keys if k.endswith("/manifest.json")]
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    assert manifest["parts"] and all(p["encryption"]["recipients"] == [public] for p in manifest["parts"])
    backup_id = manifest["backup_id"]

    # The kubelet's part: the operator's Secret, mounted where the template says.
    template = template_named(encrypted, f"{TENANT}-restore")
    restore = container(template, "kura")
    identity_env = next(e["value"] for e in restore["env"] if e["name"] == "KURA_IDENTITY_FILE")
    mount = next(m for m in restore["volumeMounts"] if identity_env.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    volume = next(v for v in template.spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "kura-age-identity"
    assert encrypted.find("Secret", "kura-age-identity", NAMESPACE) is None, "the chart never holds the key"
    item = volume["secret"]["items"][0]
    mounted = tmp_path / "mount"
    mounted.mkdir()
    (mounted / item["path"]).write_bytes(keyfile.read_bytes())
    local_identity = str(mounted / os.path.relpath(identity_env, mount["mountPath"]))

    postgres.sql("DROP DATABASE IF EXISTS shop")
    result, command = run_container(
        kura_bin, encrypted, restore, s3, couch, postgres,
        {"KURA_RESTORE_BACKUP": backup_id, "KURA_IDENTITY_FILE": local_identity},
    )
    assert result.returncode == 0, explain(result, command)
    assert postgres.sql("SELECT count(*), sum(total) FROM orders", "shop") == "2|29.5"
    secret = keyfile.read_text()
    assert "AGE-SECRET-KEY-1" not in result.stdout + result.stderr
    assert all(line not in result.stdout + result.stderr for line in secret.splitlines() if line.startswith("AGE-SECRET"))
