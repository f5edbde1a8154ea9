"""The image the chart runs: what the chart assumes of it is what the Dockerfile builds.

No Docker here, so these read the Dockerfile; the build itself is exercised wherever the image is
built."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

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


def locked_rust_versions(cargo_home: str | None = None, offline: bool = False) -> dict[str, tuple[int, ...]]:
    """rust-version of every package in Cargo.lock, for every platform, from `cargo metadata`:
    it reads the manifests cargo fetched for the lockfile, which is exactly what a fresh
    machine has after `cargo fetch --locked` (a registry filled by `cargo build` lacks the
    crates of other platforms, which the old check wrongly needed)."""
    env = dict(os.environ)
    if cargo_home:
        env["CARGO_HOME"] = cargo_home
    command = ["cargo", "metadata", "--locked", "--format-version", "1",
               "--manifest-path", str(REPO / "Cargo.toml")]
    if offline:
        command.append("--offline")
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    packages = json.loads(out.stdout)["packages"]
    return {f"{p['name']} {p['version']}": version(p["rust_version"])
            for p in packages if p.get("rust_version")}


def too_new_for(rust: tuple[int, ...], needs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    # RUST_VERSION 1.95 means the newest 1.95.x: compare as many components as it names.
    return {crate: need for crate, need in needs.items() if need[: len(rust)] > rust}


def test_rust_is_new_enough_for_the_lockfile():
    """Every locked crate's rust-version must be met by the builder."""
    rust = version(arg("RUST_VERSION"))
    manifest = (REPO / "Cargo.toml").read_text()
    declared = re.search(r'^rust-version = "([^"]+)"', manifest, re.M)
    if declared:
        assert rust >= version(declared.group(1))
    needs = locked_rust_versions()
    assert len(needs) > 100, "cargo metadata reported too few packages"
    assert too_new_for(rust, needs) == {}, f"RUST_VERSION {arg('RUST_VERSION')} is older than these crates need"


def test_toolchain_check_needs_only_what_cargo_fetch_brings(tmp_path):
    """From an empty CARGO_HOME, `cargo fetch --locked` is all the check needs (it then runs
    offline), and it sees the same crates as on this machine."""
    home = tmp_path / "cargo-home"
    fetched = subprocess.run(["cargo", "fetch", "--locked", "--manifest-path", str(REPO / "Cargo.toml")],
                             env={**os.environ, "CARGO_HOME": str(home)}, capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    assert locked_rust_versions(str(home), offline=True) == locked_rust_versions()


def test_the_check_catches_a_toolchain_that_is_too_old():
    needs = locked_rust_versions()
    assert too_new_for((1, 60), needs), "every crate claims to build on Rust 1.60"
    assert too_new_for(version(arg("RUST_VERSION")), needs) == {}
