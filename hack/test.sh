#!/usr/bin/env bash
# The project's test command (see README): static checks, then every test.
# Network-namespace and e2e tests need root; as root they always run.
set -euo pipefail
cd "$(dirname "$0")/.."

unformatted=$(git ls-files -z '*.go' | xargs -0 gofmt -l)
if [[ -n "$unformatted" ]]; then
	echo "gofmt needed:" "$unformatted" >&2
	exit 1
fi
go vet ./...
if [[ -x "$(go env GOPATH)/bin/golangci-lint" ]]; then
	"$(go env GOPATH)/bin/golangci-lint" run ./...
else
	echo "golangci-lint not installed; skipping (hack/lint.sh installs it)"
fi
shellcheck .ci/run hack/*.sh hack/kind/*.sh hack/cluster/*.sh

# -p 1: the root test packages measure latencies; running them side by side
# on a 2-core machine only adds noise.
go test -count=1 -p 1 -timeout 60m "$@" ./...

# The real-kernel dataplane suite and the e2e suite once more on the
# nftables backend (the run above uses the default, iptables on these
# nodes): paths, transitions, pinning, drift, lifecycle, the agent binary.
AR_BACKEND=nftables go test -count=1 -p 1 -timeout 40m "$@" ./test/integration/ ./test/e2e/
