#!/usr/bin/env bash
# The agent's main job on this machine, no cluster needed (root, Go): two
# ptp-shaped nodes in network namespaces, a real etcd + kube-apiserver, a test
# ztunnel and an agent per node, ambient and non-ambient pods, and a live
# table of which ztunnel captured which connection.
#
#   bash hack/demo.sh          # runs until Ctrl-C, then removes everything it made
#   bash hack/demo.sh --once   # one round, print, remove everything (the test suite runs this)
#
# Everything lives in network namespaces it creates; the root network
# namespace is never changed. Binaries go to bin/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" -ne 0 ]]; then
	echo "hack/demo.sh: needs root (it creates network namespaces): sudo bash hack/demo.sh" >&2
	exit 1
fi
# Go's official tarball installs here; root's PATH often lacks it.
PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null 2>&1; then
	echo "hack/demo.sh: Go is missing (go.dev/dl)" >&2
	exit 1
fi
# The pods are wired by the real ptp + host-local CNI plugins, as kindnet does.
if ! command -v iptables >/dev/null 2>&1 || ! command -v ipset >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1 || [[ ! -x /usr/lib/cni/ptp ]]; then
	echo "[0/5] installing iproute2 iptables ipset containernetworking-plugins (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq && apt-get install -y -qq iproute2 iptables ipset containernetworking-plugins >/dev/null
fi

began=$SECONDS
echo "[1/5] building the agent, the test ztunnel and the demo into bin/ (expect seconds; ~2 min with a cold Go cache)"
go build -o bin/ambient-redirect ./cmd/ambient-redirect
go build -o bin/test-ztunnel ./test/ztunnel
go build -o bin/ar-demo ./test/demo
echo "      done in $((SECONDS - began))s"

began=$SECONDS
echo "[2/5] control plane: etcd, kube-apiserver and kube-proxy from the Go module proxy (hack/build-control-plane.sh; instant when cached, ~18 min the first time on 2 cores)"
AR_CONTROL_PLANE_DIR="$(bash hack/build-control-plane.sh)"
export AR_CONTROL_PLANE_DIR
echo "      done in $((SECONDS - began))s: $AR_CONTROL_PLANE_DIR"

exec "$PWD/bin/ar-demo" --repo "$PWD" --agent "$PWD/bin/ambient-redirect" --ztunnel "$PWD/bin/test-ztunnel" "$@"
