#!/usr/bin/env bash
# Node-scale benchmarks of the real agent against a real kube-apiserver:
# prints a table and writes BENCHMARKS.md. Needs root (network namespaces).
#
#   hack/bench.sh                                  # full run (~15 min)
#   hack/bench.sh -bench-runs 1 -bench-churn 10s   # quick look
#   hack/bench.sh -bench-backends nftables         # one backend, in full
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/build-control-plane.sh >/dev/null
AR_BENCH=1 go test -count=1 -timeout 60m -run TestNodeScale -v ./test/bench \
	-args -bench-out "$PWD/BENCHMARKS.md" "$@"
