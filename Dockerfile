# syntax=docker/dockerfile:1

# Image for entitlement-worker.
#
# Two stages: the builder compiles the worker (and librdkafka, which the rdkafka crate builds
# from source with CMake), and the runtime stage carries only the binary and the shared
# libraries it links against, so the image is small and holds no compiler.

FROM rust:1.95-bookworm AS builder

# librdkafka is compiled from source by the rdkafka crate: CMake and a C toolchain to build
# it, OpenSSL, Cyrus SASL and zlib headers for the features it is built with, pkg-config to
# find them, and Python for librdkafka's build scripts.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends \
        cmake \
        build-essential \
        libssl-dev \
        libsasl2-dev \
        zlib1g-dev \
        pkg-config \
        python3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Only what the build needs. The crate embeds migrations/ and config/default.toml at compile
# time, so they must be present here, not in the runtime image; .cargo/config.toml sets the
# allocator's built-in defaults.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY migrations ./migrations
COPY config ./config
COPY schemas ./schemas

# The crate registry and git checkouts are cached between builds so that dependencies are
# not downloaded again. target/ is deliberately not cached: macros that embed a directory
# (such as the migrations) are not always rebuilt when a file is added to it, and a stale
# target/ could then ship an image with old migrations. Docker's layer cache still skips
# this step entirely when none of the inputs above changed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git/db \
    cargo build --release --locked --bin entitlement-worker


FROM debian:bookworm-slim AS runtime

# The shared libraries the binary links against (OpenSSL 3, Cyrus SASL, zlib), CA
# certificates for TLS to Kafka or PostgreSQL, and curl for the health check.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends \
        ca-certificates \
        libssl3 \
        libsasl2-2 \
        zlib1g \
        curl \
    && rm -rf /var/lib/apt/lists/*

# The worker needs no home directory and writes nothing to disk: all state lives in
# PostgreSQL and Kafka.
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin worker

COPY --from=builder /build/target/release/entitlement-worker /usr/local/bin/entitlement-worker

# Inside a container the metrics and health endpoint must listen on every interface, or
# neither Prometheus nor the port mapping can reach it (the built-in default is loopback).
ENV ENTITLEMENTS__METRICS__LISTEN=0.0.0.0:9464
EXPOSE 9464

# Numeric ids (those of `worker`, created above) so that Kubernetes' runAsNonRoot can verify
# the user without reading /etc/passwd.
USER 10001:10001

# /healthz answers 200 only while the worker is consuming. The start period leaves time to
# create the database, apply migrations and join the consumer group. The port is the one
# set in ENTITLEMENTS__METRICS__LISTEN above; change both together.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:9464/healthz || exit 1

# Exec form, so the worker is PID 1 and receives SIGTERM itself: it then finishes its batch,
# commits and exits 0.
ENTRYPOINT ["entitlement-worker"]
CMD ["run"]
