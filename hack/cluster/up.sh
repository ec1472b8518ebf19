#!/usr/bin/env bash
# Brings up a real two-node Kubernetes cluster on this machine, without
# docker (kubelet + containerd + runc per node, each node a network and mount
# namespace; etcd, kube-apiserver, controller-manager, scheduler, kube-proxy),
# installs the agent with `kubectl apply -k` of manifests/ (test image
# reference only) and the test ztunnel, and shows the connections it
# captured. It keeps running in the background; hack/cluster/down.sh
# removes it.
#
#   bash hack/cluster/up.sh [--nodes N]
#
# Needs root. Installs containerd, runc, mmdebstrap and the CNI plugins from
# Debian when missing; builds the control plane and kubelet the first time
# (~20 min on 2 cores, then cached) and the agent's Debian root filesystem
# (~1 min, cached).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $EUID -ne 0 ]]; then
	echo "up.sh: run as root (it creates network namespaces and runs containerd)" >&2
	exit 1
fi
need=()
for tool in containerd runc ctr mmdebstrap iptables ip nsenter; do
	command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
[[ -x /usr/lib/cni/ptp && -x /usr/lib/cni/host-local ]] || need+=(containernetworking-plugins)
if ((${#need[@]})); then
	echo "up.sh: installing packages for: ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq containerd runc mmdebstrap iptables iproute2 util-linux containernetworking-plugins >/dev/null
fi
export PATH="$PATH:/usr/local/go/bin"
bash hack/build-control-plane.sh >/dev/null
mkdir -p bin
go build -o bin/cluster ./test/realcluster/cmd/cluster
exec bin/cluster up --dir "${AR_CLUSTER_DIR:-/var/tmp/ambient-redirect-cluster}" "$@"
