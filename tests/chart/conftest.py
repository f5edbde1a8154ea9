"""Renders shared by the chart tests: each is rendered once per session."""

from __future__ import annotations

import pytest
import yaml

import chartlib
from chartlib import STORAGE_CREDENTIALS, Rendered, render

VALUES_DIR = chartlib.REPO / "tests" / "chart" / "values"

# 200 customers with realistic, uneven names.
WORDS = ["acme", "globex", "initech", "umbrella", "stark", "wayne", "tyrell", "cyberdyne", "hooli", "vandelay"]
MANY_TENANTS = [f"{WORDS[i % len(WORDS)]}-{i:03d}" for i in range(200)]
# 40 characters: the longest customer name the original setup had, rounded up.
LONG_TENANT = "northwind-traders-international-holding"[:39] + "s"
assert len(LONG_TENANT) == 40


def values_file(name: str) -> dict:
    return yaml.safe_load((VALUES_DIR / name).read_text())


def one_tenant_values() -> dict:
    return {"objectStorage": STORAGE_CREDENTIALS, "tenants": {"acme": {}}}


def many_tenant_values(names=MANY_TENANTS) -> dict:
    return {"objectStorage": STORAGE_CREDENTIALS, "tenants": {name: {} for name in names}}


@pytest.fixture(scope="session")
def defaults() -> Rendered:
    return render({})


@pytest.fixture(scope="session")
def one() -> Rendered:
    return render(one_tenant_values())


@pytest.fixture(scope="session")
def three() -> Rendered:
    return render(values_file("three-tenants.yaml"))


@pytest.fixture(scope="session")
def encrypted() -> Rendered:
    return render(values_file("encryption.yaml"))


@pytest.fixture(scope="session")
def managed() -> Rendered:
    return render(values_file("managed-services.yaml"))


@pytest.fixture(scope="session")
def monitored() -> Rendered:
    return render(values_file("monitoring.yaml"))


@pytest.fixture(scope="session")
def many() -> Rendered:
    return render(many_tenant_values())


@pytest.fixture(scope="session")
def long_name() -> Rendered:
    values = chartlib.merge(
        values_file("three-tenants.yaml"),
        {"tenants": {LONG_TENANT: {"status": {"enabled": True}, "verify": {"enabled": True, "sources": ["postgres", "couchdb"]}}}},
    )
    return render(values)


@pytest.fixture(scope="session", params=["one", "three", "long_name", "encrypted", "managed", "monitored", "many"])
def tenant_render(request) -> Rendered:
    return request.getfixturevalue(request.param)
