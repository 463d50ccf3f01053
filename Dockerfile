# caudal as a container: `docker build -t caudal .`, then
#   docker run -v $PWD/caudal.toml:/etc/caudal/caudal.toml:ro \
#              -v caudal-data:/var/lib/caudal -p 9464:9464 caudal
# Give the state, buffer_dir and runs_dir absolute paths in /var/lib/caudal
# (docs/operations.md): the config's directory is read-only.

# ---- build: the release binary, with every default feature ----------------
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libpq-dev cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p caudal \
 && strip target/release/caudal

# ---- runtime: Debian slim, the binary's shared libraries, a non-root user --
FROM debian:bookworm-slim
# Exactly the packages the binary needs beyond the base image (libpq5 for
# PostgreSQL change data capture; ca-certificates for TLS to partners,
# RabbitMQ, NATS and object storage). crates/caudal/tests/packaging.rs
# runs the binary in a Debian root holding only these.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libpq5 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/caudal --create-home caudal
COPY --from=build /src/target/release/caudal /usr/local/bin/caudal
USER caudal
WORKDIR /var/lib/caudal
ENV CAUDAL_CONFIG=/etc/caudal/caudal.toml
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/caudal"]
CMD ["run"]
