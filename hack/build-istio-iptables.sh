#!/usr/bin/env bash
# Builds Istio's own sidecar rules engine, istio-iptables, from the Go module
# proxy and caches it outside the repository (test/sidecar/istio runs it in a
# test pod's netns beside our agent, to compare behaviour).
#
#   hack/build-istio-iptables.sh        # prints the path of the binary
#
# Cache (override the directory with AR_ISTIO_IPTABLES_DIR):
#   ${XDG_CACHE_HOME:-$HOME/.cache}/ambient-redirect/istio-iptables-<ver>/istio-iptables
#
# The module proxy serves istio.io/istio only as untagged snapshots
# (pseudo-versions), so one is pinned here. Recent Istio has no
# tools/istio-iptables/main.go any more (the command lives in pilot-agent as
# `pilot-agent istio-iptables`, which drags in all of the agent); the scratch
# module below has the few-line main that file used to be, around the same
# tools/istio-iptables/pkg/cmd.GetCommand pilot-agent registers.
#
# Idempotent: when the binary exists and answers --help, it exits at once.
# Concurrent callers serialise on a flock in the cache directory.
set -euo pipefail

ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad

DIR="${AR_ISTIO_IPTABLES_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ambient-redirect/istio-iptables-${ISTIO_VERSION}}"
BIN="$DIR/istio-iptables"

log() {
	printf '%s build-istio-iptables: %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

have() {
	[[ -x "$BIN" ]] && "$BIN" --help >/dev/null 2>&1
}

if have; then
	printf '%s\n' "$BIN"
	exit 0
fi

mkdir -p "$DIR"
exec 9>"$DIR/.build.lock"
if ! flock -n 9; then
	log "another build holds $DIR/.build.lock; waiting"
	flock 9
fi
if have; then
	printf '%s\n' "$BIN"
	exit 0
fi

command -v go >/dev/null 2>&1 || {
	log "go not found in PATH"
	exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ar-istio-iptables.XXXXXX")"
cleanup() {
	chmod -R u+w "$WORK" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

export GOWORK=off
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GO111MODULE=on
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

start=$SECONDS
log "building istio-iptables from istio.io/istio@${ISTIO_VERSION}"
mod="$WORK/mod"
mkdir -p "$mod"
(
	cd "$mod"
	go mod init ambient-redirect.local/istio-iptables-build
	cat >main.go <<'EOF'
// Command istio-iptables: Istio's tools/istio-iptables/main.go as it was
// before the command moved into pilot-agent.
package main

import (
	"os"

	"istio.io/istio/pkg/log"
	"istio.io/istio/tools/istio-iptables/pkg/cmd"
)

func main() {
	// As pilot-agent: its root command carries the --log_* flags.
	opts := log.DefaultOptions()
	c := cmd.GetCommand(opts)
	opts.AttachCobraFlags(c)
	if err := c.Execute(); err != nil {
		os.Exit(1)
	}
}
EOF
	go get "istio.io/istio@${ISTIO_VERSION}"
	go mod tidy
	go build -trimpath -ldflags='-s -w' -o "$WORK/istio-iptables" .
)
"$WORK/istio-iptables" --help >/dev/null
cp "$WORK/istio-iptables" "$DIR/.istio-iptables.tmp.$$"
chmod 0755 "$DIR/.istio-iptables.tmp.$$"
mv -f "$DIR/.istio-iptables.tmp.$$" "$BIN"
log "done in $((SECONDS - start))s ($(du -h "$BIN" | cut -f1))"

printf '%s\n' "$BIN"
