#!/usr/bin/env bash
# Installs the pinned golangci-lint (if missing) and runs the small linter set
# of .golangci.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
version=v2.6.2
bin="$(go env GOPATH)/bin/golangci-lint"
if ! "$bin" version 2>/dev/null | grep -q "${version#v}"; then
	go install "github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$version"
fi
"$bin" run ./...
