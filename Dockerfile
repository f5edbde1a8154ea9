# syntax=docker/dockerfile:1
#
# The kura image: the binary, CA certificates for ICOS, and a PostgreSQL client whose major
# version is at least the servers' (pg_dump refuses to dump a newer server). Runs as a non-root
# UID and writes nothing outside /tmp, so it works with a read-only root filesystem.
#
#   docker build -t icr.io/<namespace>/kura:0.1.0 .
#
# PG_MAJOR must be >= the major version of every PostgreSQL server kura backs up; the chart's
# default server image is checked against it by tests/chart.

ARG PG_MAJOR=17
# Not Cargo.toml's rust-version: the locked AWS SDK crates need 1.94.1 or newer, and --locked
# must not be traded for older crates. Debian bookworm, like the runtime, so glibc matches.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The cache mounts keep downloaded crates and compiled dependencies between builds without
# putting them in a layer; the binary is copied out because the target mount is not kept.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kura \
    && install -D -m 0755 target/release/kura /out/kura

# The key of apt.postgresql.org, accepted only with its published fingerprint. A stage of its
# own, so curl and gnupg never reach the runtime image.
FROM debian:bookworm-slim AS pgdg-key
ARG PGDG_FINGERPRINT=B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc -o /tmp/pgdg.asc \
    && gpg --show-keys --with-colons /tmp/pgdg.asc | grep -qx "fpr:::::::::${PGDG_FINGERPRINT}:" \
    && gpg --dearmor < /tmp/pgdg.asc > /pgdg.gpg

FROM debian:bookworm-slim
ARG PG_MAJOR
COPY --from=pgdg-key /pgdg.gpg /usr/share/keyrings/pgdg.gpg
# Debian's own client is PostgreSQL 15; PGDG has every current major for bookworm.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && echo "deb [signed-by=/usr/share/keyrings/pgdg.gpg] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 kura \
    && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kura
COPY --from=build /out/kura /usr/local/bin/kura

# The versioned directory first: /usr/bin/pg_dump is Debian's wrapper script, which picks a
# version by looking for local clusters, of which a client image has none.
ENV PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp
# 65532, the conventional non-root ID, numeric so that runAsNonRoot can verify it. It has a
# passwd entry because libpq looks the user up, but no shell and no home of its own.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kura"]
CMD ["--help"]
