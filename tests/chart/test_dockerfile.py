"""The image the chart runs: what the chart assumes of it is what the Dockerfile builds.

No Docker here, so these read the Dockerfile; the build itself is exercised wherever the image is
built."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

import chartlib
from chartlib import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
VALUES = yaml.safe_load((chartlib.CHART / "values.yaml").read_text())


def arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M).group(1)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_multi_stage_build_with_the_locked_dependencies():
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", DOCKERFILE, re.M)
    assert [s[1] for s in stages] == ["build", "pgdg-key", ""]
    assert stages[0][0] == "rust:${RUST_VERSION}-bookworm"
    assert stages[-1][0] == "debian:bookworm-slim"
    assert "cargo build --release --locked" in DOCKERFILE


def test_postgres_client_is_at_least_the_charts_server():
    server = VALUES["tenantDefaults"]["postgres"]["image"]["tag"]
    assert int(arg("PG_MAJOR")) >= int(server.split(".")[0]), (arg("PG_MAJOR"), server)
    assert 'postgresql-client-${PG_MAJOR}' in DOCKERFILE
    assert "apt.postgresql.org" in DOCKERFILE
    assert "PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:" in DOCKERFILE


def test_runs_as_the_non_root_user_the_chart_expects():
    user = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    assert user == [("65532", "65532")]
    ids = VALUES["tenantDefaults"]["kuraPodSecurityContext"]
    assert (ids["runAsUser"], ids["runAsGroup"]) == (65532, 65532)
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/kura"\]$', DOCKERFILE, re.M)
    # kura writes nothing but what pg_dump may put in $HOME, which the chart mounts as emptyDir.
    assert "HOME=/tmp" in DOCKERFILE


def test_build_context_holds_what_the_build_copies():
    ignore = (REPO / ".dockerignore").read_text().split()
    for needed in ("!Cargo.toml", "!Cargo.lock", "!src/"):
        assert needed in ignore
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.M):
        for path in copied.split():
            assert (REPO / path).exists(), path


def test_rust_is_new_enough_for_the_lockfile():
    """Every locked crate's rust-version must be met by the builder (read from the local cargo
    registry, which the cargo tests have filled before this runs)."""
    rust = version(arg("RUST_VERSION"))
    manifest = (REPO / "Cargo.toml").read_text()
    declared = re.search(r'^rust-version = "([^"]+)"', manifest, re.M)
    if declared:
        assert rust >= version(declared.group(1))
    lock = (REPO / "Cargo.lock").read_text()
    packages = re.findall(r'\[\[package\]\]\nname = "([^"]+)"\nversion = "([^"]+)"\nsource = "registry', lock)
    registry = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "registry" / "src"
    found, needs = 0, {}
    for name, ver in packages:
        manifests = list(registry.glob(f"*/{name}-{ver}/Cargo.toml"))
        if not manifests:
            continue
        found += 1
        m = re.search(r'^rust-version = "([^"]+)"', manifests[0].read_text(), re.M)
        if m:
            needs[f"{name} {ver}"] = version(m.group(1))
    if found < len(packages):
        why = f"{len(packages) - found} locked crates are not in {registry} (no cargo build yet)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    # RUST_VERSION 1.95 means the newest 1.95.x: compare as many components as it names.
    too_new = {crate: need for crate, need in needs.items() if need[: len(rust)] > rust}
    assert too_new == {}, f"RUST_VERSION {arg('RUST_VERSION')} is older than these crates need"
