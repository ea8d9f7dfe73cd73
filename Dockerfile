# syntax=docker/dockerfile:1
# The `orderly` binary in a small image: built in a Rust image, run in Debian slim as a
# non-root user. Every command is a subcommand of the entrypoint:
#
#   docker build -t orderly .
#   docker run --rm orderly --help
#   docker run -e ORDERLY_AUTH__JWT_SECRET=... -e ORDERLY_SERVER__LISTEN=0.0.0.0:8080 orderly serve
#
# deploy/compose.yaml and deploy/k8s/ run it; docs/deploying.md describes the roles.

# The toolchain the project is developed and tested with; Debian bookworm, like the runtime
# stage below, so the binary links against the same glibc.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace (.dockerignore keeps target/ and the VCS out): Cargo needs every
# member's manifest, and the build is one `cargo build` of the service's binary alone.
COPY . .
# --locked: exactly the versions of Cargo.lock, or fail. The cache mounts keep the registry
# and the build directory between builds of this machine, so a change in src/ rebuilds only
# the service; the binary is copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin orderly \
    && install -D -m 0755 target/release/orderly /out/orderly

FROM debian:bookworm-slim AS runtime
# CA certificates, for TLS to MariaDB, Redis and NATS; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so volumes and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 orderly \
    && useradd --system --uid 10001 --gid orderly --home-dir /var/lib/orderly \
       --shell /usr/sbin/nologin orderly \
    && install -d -o orderly -g orderly /var/lib/orderly /var/lib/orderly/search /etc/orderly
COPY --from=build /out/orderly /usr/local/bin/orderly
USER 10001:10001
# Relative paths (search.data_dir = "data/search") resolve here, on a writable directory.
WORKDIR /var/lib/orderly
# The default server.listen (127.0.0.1:8080) is for a developer's machine: set
# listen = "0.0.0.0:8080" in the settings file (deploy/compose/orderly.toml and the
# Kubernetes ConfigMap do) or ORDERLY_SERVER__LISTEN. Not set here: an environment variable
# of the image would silently win over every settings file.
EXPOSE 8080
# What an orchestrator sends: orderly stops accepting, lets requests and writes in flight
# finish within server.shutdown_grace_ms (20 s), and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["orderly"]
CMD ["serve"]
