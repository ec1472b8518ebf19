#!/usr/bin/env bash
# Builds a real etcd, kube-apiserver and kube-proxy from the Go module proxy
# for the e2e test harness (test/cluster) and caches them outside the
# repository.
#
#   hack/build-control-plane.sh        # prints the directory holding the binaries
#
# Cache directory (override with AR_CONTROL_PLANE_DIR):
#   ${XDG_CACHE_HOME:-$HOME/.cache}/ambient-redirect/control-plane/k8s-<ver>-etcd-<ver>
#
# Idempotent: when all binaries exist and answer --version, it exits at once.
# Concurrent callers serialise on a flock in the cache directory; the loser
# finds the binaries built and exits. A cold build takes ~10 min on 2 cores.
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

have() {
	[[ -x "$DIR/$1" ]] && "$DIR/$1" --version >/dev/null 2>&1
}

have_binaries() {
	have etcd && have kube-apiserver && have kube-proxy
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

# build_kubernetes NAME: build k8s.io/kubernetes/cmd/NAME (kube-apiserver,
# kube-proxy) in one scratch module, so the second shares the build cache.
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
		local v=k8s.io/component-base/version minor
		minor="${K8S_VERSION#v1.}"
		minor="${minor%%.*}"
		go build -trimpath \
			-ldflags="-s -w -X ${v}.gitVersion=${K8S_VERSION} -X ${v}.gitMajor=1 -X ${v}.gitMinor=${minor} -X ${v}.gitTreeState=clean" \
			-o "$WORK/bin/${name}" "k8s.io/kubernetes/cmd/${name}"
	)
	"$WORK/bin/${name}" --version >/dev/null
	install_binary "$WORK/bin/${name}" "${name}"
}

mkdir -p "$WORK/bin"
start=$SECONDS
if ! have etcd; then
	log "building etcd ${ETCD_VERSION}"
	build_etcd
fi
if ! have kube-apiserver; then
	log "building kube-apiserver ${K8S_VERSION} (takes ~10 min cold)"
	build_kubernetes kube-apiserver
fi
if ! have kube-proxy; then
	log "building kube-proxy ${K8S_VERSION} (~1 min after kube-apiserver)"
	build_kubernetes kube-proxy
fi
log "done in $((SECONDS - start))s: $("$DIR/etcd" --version | head -n1); $("$DIR/kube-apiserver" --version); $("$DIR/kube-proxy" --version)"

printf '%s\n' "$DIR"
