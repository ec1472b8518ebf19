# syntax=docker/dockerfile:1
# The test ztunnel (test/ztunnel) as an image, for hack/kind/up.sh.
FROM --platform=$BUILDPLATFORM golang:1.26-bookworm AS build
ARG TARGETOS TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -o /out/test-ztunnel ./test/ztunnel

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/test-ztunnel /test-ztunnel
ENTRYPOINT ["/test-ztunnel"]
