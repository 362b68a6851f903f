# Images for grpc-web-proxy, the demo User service and the demo web page, one target each:
#
#   docker build --target proxy        -t grpc-web-proxy .
#   docker build --target user-service -t grpc-web-user-service .
#   docker build --target web          -t grpc-web-demo .
#
# `docker compose build` builds all three with the names docker-compose.yml uses. A plain
# `docker build .` builds the last target, the proxy.
#
# Without Docker Hub or GitHub (no swift image, no `swift package resolve`), the two binaries can be
# built on the host instead and packaged as they are: the runtime stages are the same either way.
# The host's C library must be that of RUNTIME_IMAGE, and this path needs BuildKit
# (DOCKER_BUILDKIT=1, or buildx), which builds only the stages the target uses:
#
#   swift build -c release --static-swift-stdlib --product grpc-web-proxy
#   swift build -c release --static-swift-stdlib --product user-service
#   cp .build/release/grpc-web-proxy .build/release/user-service deploy/prebuilt/
#   strip deploy/prebuilt/grpc-web-proxy deploy/prebuilt/user-service
#   DOCKER_BUILDKIT=1 docker build --build-arg BINARIES=prebuilt \
#     --build-arg RUNTIME_IMAGE=debian:bookworm --target proxy -t grpc-web-proxy .

# The build and the runtime use the same Ubuntu release, 24.04 "noble", named in the tag rather
# than left to the plain `swift:6.3`, whose distribution is whichever one Swift makes the default.
# The binaries carry the Swift runtime and Foundation (--static-swift-stdlib) but link glibc,
# libstdc++, zlib and nghttp2 from the system, so the runtime image must be the same release as the build.
ARG SWIFT_IMAGE=swift:6.3-noble
ARG RUNTIME_IMAGE=ubuntu:noble
ARG WEB_IMAGE=nginx:alpine
# Where the binaries come from: `build` (the build stage below) or `prebuilt` (deploy/prebuilt/).
ARG BINARIES=build

# ---------------------------------------------------------------------------------------------
# Build: both executables, release mode, Swift standard library and Foundation linked statically.
FROM ${SWIFT_IMAGE} AS build
WORKDIR /src

# Dependencies first, in a layer of their own, so that changing a source file does not fetch
# them again. Package.resolved is not in git: when a local one is present it pins the versions,
# otherwise they are resolved here.
# nghttp2's headers: the upstream side's HTTP/2 codec.
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get -q update \
 && apt-get -q install -y --no-install-recommends libnghttp2-dev \
 && rm -rf /var/lib/apt/lists/*
COPY Package.swift Package.resolved* ./
RUN swift package resolve

# The manifest names the test targets too, so their folders must exist for it to load.
COPY Sources ./Sources
COPY Tests ./Tests
RUN swift build -c release --static-swift-stdlib --product grpc-web-proxy \
 && swift build -c release --static-swift-stdlib --product user-service \
 && bin="$(swift build -c release --static-swift-stdlib --show-bin-path)" \
 && mkdir -p /staging \
 && cp "$bin/grpc-web-proxy" "$bin/user-service" /staging/ \
 && strip /staging/grpc-web-proxy /staging/user-service

# ---------------------------------------------------------------------------------------------
# Or binaries built outside Docker, copied from deploy/prebuilt/ (kept out of git; see the top).
FROM scratch AS prebuilt
COPY deploy/prebuilt/ /staging/

# The stage the runtime images copy the binaries from: `build` unless BINARIES says otherwise.
FROM ${BINARIES} AS binaries

# ---------------------------------------------------------------------------------------------
# Runtime base: plain Ubuntu with the few system libraries the binaries link, and a fixed
# non-root user (numeric, so Kubernetes' runAsNonRoot can check it).
FROM ${RUNTIME_IMAGE} AS runtime
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get -q update \
 && apt-get -q install -y --no-install-recommends libstdc++6 zlib1g libnghttp2-14 ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 grpcweb \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin grpcweb

# ---------------------------------------------------------------------------------------------
# The demo.User service (also demo.Echo and grpc.health.v1) on plaintext HTTP/2, port 50051.
# On SIGTERM it reports NOT_SERVING and finishes its calls.
FROM runtime AS user-service
COPY --from=binaries /staging/user-service /usr/local/bin/user-service
USER 10001:10001
EXPOSE 50051
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/user-service", "--probe", "127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/user-service"]
CMD ["--host", "0.0.0.0", "--port", "50051"]

# ---------------------------------------------------------------------------------------------
# The demo page: static files on port 8000, .js served as text/javascript (deploy/web/nginx.conf).
FROM ${WEB_IMAGE} AS web
RUN rm -rf /usr/share/nginx/html/*
COPY deploy/web/nginx.conf /etc/nginx/conf.d/default.conf
COPY web-demo/ /usr/share/nginx/html/
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD wget -q --spider http://127.0.0.1:8000/ || exit 1

# ---------------------------------------------------------------------------------------------
# The proxy: browsers' gRPC-Web on 8080, admin (/ready) on 9901. The configuration for the
# Docker stack is built in at /etc/grpc-web-proxy/envoy.yaml; the stack mounts its own copy there
# as a config, Kubernetes as a ConfigMap. On SIGTERM it drains (--drain-time-s, 5 s by default)
# and exits 0.
FROM runtime AS proxy
COPY --from=binaries /staging/grpc-web-proxy /usr/local/bin/grpc-web-proxy
COPY deploy/stack/envoy.yaml /etc/grpc-web-proxy/envoy.yaml
COPY web-demo/ /usr/share/grpc-web-proxy/web-demo/
USER 10001:10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/grpc-web-proxy", "--probe-ready", "127.0.0.1:9901"]
ENTRYPOINT ["/usr/local/bin/grpc-web-proxy"]
CMD ["--config-path", "/etc/grpc-web-proxy/envoy.yaml"]
