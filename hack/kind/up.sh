#!/usr/bin/env bash
# Creates (or reuses) a kind cluster, builds and loads the agent and the test
# ztunnel images, installs the agent from manifests/, deploys the demo and
# checks that a client request is captured by ztunnel.
#
#   hack/kind/up.sh            # create/reuse, deploy, check
#   hack/kind/up.sh delete     # delete the cluster
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=ambient-redirect
TAG=dev

if [[ "${1:-}" == "delete" ]]; then
	kind delete cluster --name "$CLUSTER"
	exit 0
fi

for tool in kind kubectl docker; do
	command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
	kind create cluster --config hack/kind/kind.yaml
fi

docker build -t "ambient-redirect:$TAG" .
docker build -t "test-ztunnel:$TAG" -f hack/kind/ztunnel.Dockerfile .
kind load docker-image --name "$CLUSTER" "ambient-redirect:$TAG" "test-ztunnel:$TAG"

kubectl apply -k manifests/
kubectl -n kube-system rollout status ds/ambient-redirect --timeout=120s
kubectl apply -f hack/kind/demo.yaml
kubectl -n istio-system rollout status ds/ztunnel --timeout=120s
kubectl -n demo wait --for=condition=Ready pod/server pod/client --timeout=120s

server_ip=$(kubectl -n demo get pod server -o jsonpath='{.status.podIP}')
client_ip=$(kubectl -n demo get pod client -o jsonpath='{.status.podIP}')
kubectl -n demo exec client -- /agnhost connect "$server_ip:8080" --timeout=5s

# The request must have gone through a ztunnel's outbound listener.
if kubectl -n istio-system logs ds/ztunnel --all-containers --prefix 2>/dev/null |
	grep '"listener":15001' | grep -q "\"client\":\"$client_ip:"; then
	echo "OK: client $client_ip -> server $server_ip:8080 was captured by ztunnel"
else
	echo "FAIL: no ztunnel record of $client_ip -> $server_ip:8080" >&2
	kubectl -n kube-system logs ds/ambient-redirect --all-containers --prefix --tail=50 >&2 || true
	exit 1
fi
kubectl -n demo get pod client -o jsonpath='{.metadata.annotations}'; echo
