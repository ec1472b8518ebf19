#!/usr/bin/env bash
# Builds a real etcd, kube-apiserver and kube-proxy (the e2e harness,
# test/cluster) and kubelet, kube-controller-manager, kube-scheduler and
# kubectl (the real cluster, test/realcluster) from the Go module proxy and
# caches them outside the repository. The Kubernetes binaries are built one
# after the other in one scratch module, so they share the Go build cache.
#
#   hack/build-control-plane.sh        # prints the directory holding the binaries
#
# Cache directory (override with AR_CONTROL_PLANE_DIR):
#   ${XDG_CACHE_HOME:-$HOME/.cache}/ambient-redirect/control-plane/k8s-<ver>-etcd-<ver>
#
# Idempotent: when all binaries exist and answer --version, it exits at once;
# otherwise it builds only the missing ones. Concurrent callers serialise on a
# flock in the cache directory; the loser finds the binaries built and exits.
# A cold build takes ~20 min on 2 cores (kube-apiserver ~9, kubelet ~5).
set -euo pipefail

K8S_VERSION=v1.34.2
STAGING_VERSION=v0.34.2
ETCD_VERSION=v3.6.5

# k8s.io/kubernetes points these at ./staging via replace directives, which do
# not apply when it is used as a dependency; each needs its own replace.
STAGING_MODULES=(
	api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
	cloud-provider cluster-bootstrap code-generator component-base
	component-helpers controller-manager cri-api cri-client csi-translation-lib
	dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
	kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
	mount-utils pod-security-admission sample-apiserver sample-cli-plugin
	sample-controller
)

DIR="${AR_CONTROL_PLANE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ambient-redirect/control-plane/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}}"

log() {
	printf '%s build-control-plane: %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

# Kubernetes commands built from k8s.io/kubernetes/cmd/<name>, in this order
# (cheapest after kube-apiserver first; kubelet peaks at ~1.8 GB RSS).
KUBE_BINARIES=(kube-apiserver kube-proxy kube-scheduler kube-controller-manager kubectl kubelet)

have() {
	local args=(--version)
	[[ "$1" == kubectl ]] && args=(version --client)
	[[ -x "$DIR/$1" ]] && "$DIR/$1" "${args[@]}" >/dev/null 2>&1
}

have_binaries() {
	local b
	for b in etcd "${KUBE_BINARIES[@]}"; do
		have "$b" || return 1
	done
}

if have_binaries; then
	printf '%s\n' "$DIR"
	exit 0
fi

mkdir -p "$DIR"
exec 9>"$DIR/.build.lock"
if ! flock -n 9; then
	log "another build holds $DIR/.build.lock; waiting"
	flock 9
fi
# The holder of the lock may have built them while we waited.
if have_binaries; then
	printf '%s\n' "$DIR"
	exit 0
fi

command -v go >/dev/null 2>&1 || {
	log "go not found in PATH"
	exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ar-control-plane.XXXXXX")"
cleanup() {
	# Module cache files are read-only; make them removable first.
	chmod -R u+w "$WORK" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

# Sane, reproducible settings whatever the caller's environment says.
export GOWORK=off
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GO111MODULE=on
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

# install_binary SRC NAME: copy next to the final path, then rename, so that a
# reader never sees a half-written binary.
install_binary() {
	local src="$1" name="$2"
	cp "$src" "$DIR/.$name.tmp.$$"
	chmod 0755 "$DIR/.$name.tmp.$$"
	mv -f "$DIR/.$name.tmp.$$" "$DIR/$name"
}

build_etcd() {
	local mod="$WORK/etcd"
	mkdir -p "$mod"
	(
		cd "$mod"
		go mod init ambient-redirect.local/etcd-build
		go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
		go build -trimpath -ldflags='-s -w' -o "$WORK/bin/etcd" go.etcd.io/etcd/server/v3
	)
	"$WORK/bin/etcd" --version >/dev/null
	install_binary "$WORK/bin/etcd" etcd
}

# build_kubernetes NAME: build k8s.io/kubernetes/cmd/NAME in one scratch
# module, so every later one shares the build cache. The version is stamped
# as Kubernetes' own build does (component-base for the servers, client-go
# for kubectl's client version); without it they report v0.0.0-master.
build_kubernetes() {
	local name="$1" mod="$WORK/kubernetes" m
	if [[ ! -f "$mod/go.mod" ]]; then
		mkdir -p "$mod"
		(
			cd "$mod"
			go mod init ambient-redirect.local/kubernetes-build
			for m in "${STAGING_MODULES[@]}"; do
				go mod edit -replace "k8s.io/${m}=k8s.io/${m}@${STAGING_VERSION}"
			done
		)
	fi
	(
		cd "$mod"
		go get "k8s.io/kubernetes/cmd/${name}@${K8S_VERSION}"
		local minor ldflags=(-s -w) v
		minor="${K8S_VERSION#v1.}"
		minor="${minor%%.*}"
		for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
			ldflags+=(-X "${v}.gitVersion=${K8S_VERSION}" -X "${v}.gitMajor=1" -X "${v}.gitMinor=${minor}" -X "${v}.gitTreeState=clean")
		done
		go build -trimpath -ldflags="${ldflags[*]}" -o "$WORK/bin/${name}" "k8s.io/kubernetes/cmd/${name}"
	)
	if [[ "$name" == kubectl ]]; then
		"$WORK/bin/${name}" version --client >/dev/null
	else
		"$WORK/bin/${name}" --version >/dev/null
	fi
	install_binary "$WORK/bin/${name}" "${name}"
}

mkdir -p "$WORK/bin"
start=$SECONDS
if ! have etcd; then
	log "building etcd ${ETCD_VERSION}"
	build_etcd
fi
for b in "${KUBE_BINARIES[@]}"; do
	if ! have "$b"; then
		log "building $b ${K8S_VERSION} (kube-apiserver ~9 min cold, kubelet ~5, the others 1-2)"
		build_kubernetes "$b"
	fi
done
log "done in $((SECONDS - start))s: $("$DIR/etcd" --version | head -n1); $("$DIR/kubelet" --version); $("$DIR/kubectl" version --client | head -n1)"

printf '%s\n' "$DIR"
