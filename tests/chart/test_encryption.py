"""age encryption (tenant `encryption.*`): public keys reach the Jobs that write or check backups,
the secret key only the Jobs that decrypt, and only from a Secret the operator created."""

from __future__ import annotations

import json

import helm_python as helm
import pytest

import chartlib
from chartlib import container, pod_templates, render
from conftest import one_tenant_values, values_file

IDENTITY_FILE = "/etc/kura/age/identity.txt"
ENCRYPTION_ENV = {"KURA_ENCRYPT_TO", "KURA_ENCRYPT_TO_FILE", "KURA_IDENTITY_FILE"}
# tests/chart/values/encryption.yaml
DEFAULT_RECIPIENTS = [
    "age18zvuu58q77k0nue6yl43xh5w2dj7axzhcs64uradxvcqra6ez3aqen7fcj",
    "age1md2jc4gkrqrzlmkt5encevrlwkh48plt5rlrtxs4uyt6t7vweu7qkxv4gt",
]
INITECH_RECIPIENTS = [
    "age1ke0kr3q22xq97mvw08zd2csmt64m4n00k3nmjzxzv3szedjzr5dqky0prs",
    "age1md2jc4gkrqrzlmkt5encevrlwkh48plt5rlrtxs4uyt6t7vweu7qkxv4gt",
]
# What a secret key looks like (age-keygen's format; not a key anyone uses).
SECRET_KEY = "AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSX5AXVK"


def templates_by_name(rendered) -> dict:
    return {t.owner["metadata"]["name"]: t for t in pod_templates(rendered.objects)}


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def kura_env(rendered, name: str) -> dict[str, dict]:
    return env_of(container(templates_by_name(rendered)[name], "kura"))


def mentions(template, text: str) -> bool:
    return text in json.dumps(template.spec)


def with_encryption(encryption: dict, **tenant) -> dict:
    return chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"encryption": encryption, **tenant}}})


def test_recipients_reach_the_backup_status_and_verify_jobs_without_the_identity(encrypted):
    pods = templates_by_name(encrypted)
    for name in ("acme-backup", "acme-status", "acme-verify-postgres", "globex-backup", "globex-status", "globex-verify-postgres"):
        env = env_of(container(pods[name], "kura"))
        assert env["KURA_ENCRYPT_TO"]["value"] == ",".join(DEFAULT_RECIPIENTS), name
        assert env["KURA_ENCRYPT_TO"]["value"].split(",") == DEFAULT_RECIPIENTS
    initech = kura_env(encrypted, "initech-backup")
    assert initech["KURA_ENCRYPT_TO"]["value"] == ",".join(INITECH_RECIPIENTS)
    # Writing and checking backups needs no secret key: no volume, mount or env names the Secret.
    for name in ("acme-backup", "acme-status", "globex-backup", "globex-status", "globex-verify-postgres", "initech-backup"):
        t = pods[name]
        assert "KURA_IDENTITY_FILE" not in env_of(container(t, "kura")), name
        assert [v["name"] for v in t.spec["volumes"]] == ["tmp"], name
        assert [m["mountPath"] for m in container(t, "kura")["volumeMounts"]] == ["/tmp"], name
        assert not mentions(t, "kura-age-identity") and not mentions(t, "initech-age"), name
    # Nor do the apps, the databases or the `helm test` pod.
    for name, t in pods.items():
        if t.labels.get("app.kubernetes.io/component") in ("backup", "status", "verify", "restore"):
            continue
        assert not (ENCRYPTION_ENV & {e["name"] for c in t.containers() for e in c.get("env", [])}), name
        assert not mentions(t, "kura-age-identity") and not mentions(t, "initech-age"), name
    # Restoring reads backups; it gets the secret key, not the recipients.
    assert "KURA_ENCRYPT_TO" not in kura_env(encrypted, "acme-restore")


def test_restore_template_mounts_the_identity_secret(encrypted):
    restore = templates_by_name(encrypted)["acme-restore"]
    c = container(restore, "kura")
    env = env_of(c)
    assert env["KURA_IDENTITY_FILE"] == {"name": "KURA_IDENTITY_FILE", "value": IDENTITY_FILE}
    volumes = {v["name"]: v for v in restore.spec["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] != "tmp"]
    assert mount == {"name": mount["name"], "mountPath": "/etc/kura/age", "readOnly": True}
    secret = volumes[mount["name"]]["secret"]
    assert secret == {
        "secretName": "kura-age-identity",
        "defaultMode": 0o400,
        "items": [{"key": "identity.txt", "path": "identity.txt"}],
    }
    assert f"{mount['mountPath']}/{secret['items'][0]['path']}" == IDENTITY_FILE
    # The restore still takes its source and backup from the env `kubectl set env` changes.
    assert c["args"] == ["restore", "$(KURA_RESTORE_SOURCE)", "$(KURA_RESTORE_BACKUP)"]
    # Another key of the Secret, for another tenant.
    initech = templates_by_name(encrypted)["initech-restore"]
    (volume,) = [v for v in initech.spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "initech-age"
    assert volume["secret"]["items"] == [{"key": "age-identity", "path": "identity.txt"}]
    assert kura_env(encrypted, "initech-restore")["KURA_IDENTITY_FILE"]["value"] == IDENTITY_FILE


def test_the_chart_never_creates_the_identity_secret(encrypted):
    names = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in encrypted.of_kind("Secret")}
    assert ("tenant-acme", "kura-age-identity") not in names
    assert ("tenant-initech", "initech-age") not in names
    # No Secret the chart renders holds anything that looks like an age secret key.
    assert "AGE-SECRET-KEY" not in json.dumps(encrypted.objects)


def test_only_the_deep_verify_gets_the_identity(encrypted):
    pods = templates_by_name(encrypted)
    for name in ("acme-verify-postgres", "acme-verify-couchdb", "initech-verify-postgres"):
        c = container(pods[name], "kura")
        assert c["args"][-1] == "--deep", name
        assert env_of(c)["KURA_IDENTITY_FILE"]["value"] == IDENTITY_FILE, name
        assert {"name": "age-identity", "mountPath": "/etc/kura/age", "readOnly": True} in c["volumeMounts"], name
    shallow = container(pods["globex-verify-postgres"], "kura")
    assert "--deep" not in shallow["args"]
    assert "KURA_IDENTITY_FILE" not in env_of(shallow)


def test_restore_template_renders_without_an_identity_secret(encrypted):
    # globex has recipients but no identitySecret: an operator may give a Job a key of their own.
    restore = templates_by_name(encrypted)["globex-restore"]
    c = container(restore, "kura")
    assert not (ENCRYPTION_ENV & set(env_of(c)))
    assert [v["name"] for v in restore.spec["volumes"]] == ["tmp"]
    # NOTES says so, naming the tenant.
    notes = " ".join(encrypted.notes.split())
    assert "The restore template of globex has no key" in notes
    assert "acme" not in notes.split("The restore template of", 1)[1].split("has no key")[0]


def test_an_identity_without_recipients_still_reaches_the_restore():
    # Backups encrypted before the recipients were removed still need the key to be restored.
    rendered = render(with_encryption({"identitySecret": "kura-age-identity"}))
    assert kura_env(rendered, "acme-restore")["KURA_IDENTITY_FILE"]["value"] == IDENTITY_FILE
    assert not (ENCRYPTION_ENV & set(kura_env(rendered, "acme-backup")))


def test_without_encryption_values_nothing_changes(one, encrypted):
    def no_encryption(rendered, namespaces=None):
        for t in pod_templates(rendered.objects):
            if namespaces and t.namespace not in namespaces:
                continue
            for c in t.containers():
                assert not (ENCRYPTION_ENV & set(env_of(c))), t.where
                assert [m["mountPath"] for m in c.get("volumeMounts", []) if m["mountPath"].startswith("/etc/kura")] == [], t.where
            assert not [v for v in t.spec.get("volumes", []) if "secret" in v], t.where

    no_encryption(one)
    for name in ("acme-backup", "acme-restore"):
        assert [v["name"] for v in templates_by_name(one)[name].spec["volumes"]] == ["tmp"]
    assert "Backups are not encrypted" in one.notes
    # A tenant that empties the default recipients is back to unencrypted.
    no_encryption(encrypted, {"tenant-umbrella"})
    # The defaults stated explicitly render exactly what no encryption values render.
    # (Fixed passwords and no CouchDB, whose cookie secrets are always generated: nothing random.)
    fixed = chartlib.merge(one_tenant_values(), {"tenants": {"acme": {"postgres": {"auth": {"password": "p"}}, "couchdb": {"enabled": False}}}})
    stated = chartlib.merge(fixed, {"tenantDefaults": {"encryption": {"recipients": [], "identitySecret": "", "identityKey": "identity.txt"}}})
    assert render(stated).objects == render(fixed).objects


def test_deep_verify_without_an_identity_is_refused():
    values = with_encryption({"recipients": DEFAULT_RECIPIENTS}, verify={"enabled": True})
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    assert "encryption.identitySecret" in str(failure.value) and "verify.deep" in str(failure.value)
    # A shallow verify needs no key.
    shallow = render(with_encryption({"recipients": DEFAULT_RECIPIENTS}, verify={"enabled": True, "deep": False}))
    assert kura_env(shallow, "acme-verify-postgres")["KURA_ENCRYPT_TO"]["value"] == ",".join(DEFAULT_RECIPIENTS)


def test_tenants_override_the_default_encryption(encrypted):
    # Lists replace: initech's recipients are its own, not the default ones plus its own.
    assert kura_env(encrypted, "initech-backup")["KURA_ENCRYPT_TO"]["value"].split(",") == INITECH_RECIPIENTS
    assert "KURA_ENCRYPT_TO" not in kura_env(encrypted, "umbrella-backup")
    # An identitySecret of one tenant is mounted in no other namespace.
    for t in pod_templates(encrypted.objects):
        if mentions(t, "kura-age-identity"):
            assert t.namespace == "tenant-acme", t.where


def test_notes_show_how_to_make_the_keys_and_the_secret(one, encrypted):
    for notes in (one.notes, encrypted.notes):
        assert "age-keygen -o identity.txt" in notes
        assert "escrow" in notes and "offline" in notes
        assert "tenantDefaults.encryption.recipients=" in notes
        assert "kubectl -n tenant-acme create secret generic kura-age-identity --from-file=identity.txt" in notes
    assert "Backups of 3 tenant(s) are encrypted" in encrypted.notes


def schema_error(values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    return str(failure.value)


@pytest.mark.parametrize(
    "recipient",
    [
        SECRET_KEY,
        SECRET_KEY.lower(),  # still not a public key
        "AGE18ZVUU58Q77K0NUE6YL43XH5W2DJ7AXZHCS64URADXVCQRA6EZ3AQEN7FCJ",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhSWmJoSExBdHVuTWdwd3lUdmxYcUhwYmdkNlc2a2o kura",
        " age18zvuu58q77k0nue6yl43xh5w2dj7axzhcs64uradxvcqra6ez3aqen7fcj",
        "age1",
        "",
    ],
    ids=["secret-key", "secret-key-lowercase", "uppercase", "ssh-key", "whitespace", "empty-key", "empty"],
)
@pytest.mark.parametrize("where", ["tenant", "defaults"])
def test_schema_rejects_a_recipient_that_is_not_a_public_key(recipient, where):
    encryption = {"encryption": {"recipients": [DEFAULT_RECIPIENTS[0], recipient]}}
    values = {"tenantDefaults": encryption} if where == "defaults" else {"tenants": {"acme": encryption}}
    assert "recipients" in schema_error(chartlib.merge(one_tenant_values(), values))


@pytest.mark.parametrize(
    "encryption, where",
    [
        ({"recipients": DEFAULT_RECIPIENTS[0]}, "recipients"),  # a string, not a list
        ({"identitySecret": "Kura_Age"}, "identitySecret"),
        ({"identityKey": "../identity.txt"}, "identityKey"),
        ({"identityKey": ""}, "identityKey"),
        ({"identity": SECRET_KEY}, "identity"),  # no key of the chart holds a secret key
    ],
    ids=["not-a-list", "secret-name", "key-path", "empty-key", "unknown-key"],
)
def test_schema_rejects_bad_encryption_values(encryption, where):
    assert where in schema_error(with_encryption(encryption))
