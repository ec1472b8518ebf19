#!/usr/bin/env bash
# Removes the cluster hack/cluster/up.sh started: stops every process it
# started, and removes its namespaces, mounts, cgroups and files, and puts
# back the global sysctls the kubelet changed. Also cleans up after an up.sh
# that was killed half-way.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $EUID -ne 0 ]]; then
	echo "down.sh: run as root" >&2
	exit 1
fi
export PATH="$PATH:/usr/local/go/bin"
if [[ ! -x bin/cluster ]]; then
	mkdir -p bin
	go build -o bin/cluster ./test/realcluster/cmd/cluster
fi
exec bin/cluster down --dir "${AR_CLUSTER_DIR:-/var/tmp/ambient-redirect-cluster}"
