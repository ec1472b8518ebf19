# syntax=docker/dockerfile:1
# Multi-stage: a static Go build, then a small Debian runtime that carries the
# iptables (nft and legacy) and ipset tools the agent calls for its fixed rules.
FROM --platform=$BUILDPLATFORM golang:1.26-bookworm AS build
ARG TARGETOS TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/ambient-redirect ./cmd/ambient-redirect-cni

FROM debian:bookworm-slim
# iptables brings iptables-nft-* and iptables-legacy-*; ipset is for operators
# (the agent itself manages sets through netlink).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ambient-redirect /out/ambient-redirect-cni /usr/local/bin/
# Runs as root with NET_ADMIN (netlink, iptables, ipset), SYS_ADMIN (setns
# into the ztunnel pod's network namespace) and NET_RAW (iptables): the
# DaemonSet grants exactly these instead of privileged.
USER 0
ENTRYPOINT ["/usr/local/bin/ambient-redirect"]
CMD ["run"]
