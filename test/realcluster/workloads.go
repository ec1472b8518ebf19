//go:build linux

package realcluster

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-redirect/ambient-redirect/selection/kube"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/realcluster/image"
)

// Ports of the test app.
const (
	AppHTTPPort = 8080
	AppEchoPort = 9000
)

// Apply pipes manifest to `kubectl apply -f -`.
func (c *Cluster) Apply(t testing.TB, manifest string) {
	t.Helper()
	kc := filepath.Join(c.Opts.Dir, "kubeconfig")
	if _, err := c.Kubectl("version", "--client"); err != nil { // writes kc
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", c.CPNetns, filepath.Join(c.BinDir, cluster.KubectlBinary), "--kubeconfig="+kc, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("realcluster: kubectl apply: %v\n%s\n---\n%s", err, out, manifest)
	}
}

// Namespace returns a Namespace manifest, labelled ambient when ambient.
func Namespace(name string, ambient bool) string {
	labels := ""
	if ambient {
		labels = "\n  labels:\n    istio.io/dataplane-mode: ambient"
	}
	return fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s%s\n---\n", name, labels)
}

// AppDeployment returns a Deployment of the test app with one replica per
// node (required anti-affinity), the kubelet's HTTP liveness and readiness
// probes and an exec startup probe, and extra arguments for `app serve`.
func AppDeployment(ns, name string, replicas int, args ...string) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: %[2]s
  namespace: %[1]s
spec:
  replicas: %[3]d
  selector:
    matchLabels:
      app: %[2]s
  template:
    metadata:
      labels:
        app: %[2]s
    spec:
      terminationGracePeriodSeconds: 1
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  app: %[2]s
      containers:
        - name: app
          image: %[4]s
          imagePullPolicy: IfNotPresent
          args: [%[5]s]
          startupProbe:
            exec:
              command: ["/app", "probe"]
            periodSeconds: 1
            failureThreshold: 30
          livenessProbe:
            httpGet:
              path: /healthz
              port: %[6]d
            periodSeconds: 2
            failureThreshold: 2
          readinessProbe:
            httpGet:
              path: /healthz
              port: %[6]d
            periodSeconds: 1
---
`, ns, name, replicas, image.App+":v1", serveArgs(args), AppHTTPPort)
}

// Service returns a ClusterIP Service for the app's echo port.
func Service(ns, name string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Service
metadata:
  name: %[2]s
  namespace: %[1]s
spec:
  selector:
    app: %[2]s
  ports:
    - name: echo
      port: %[3]d
      targetPort: %[3]d
---
`, ns, name, AppEchoPort)
}

// AppPod returns a Pod of the test app pinned to node (no probes but an
// HTTP readiness probe), with extra arguments for `app serve`.
func AppPod(ns, name, node string, args ...string) string {
	return appPod(ns, name, node, "", "", args)
}

// SidecarAppPod is a pod with Istio's CNI-mode sidecar injection: the
// status annotation, no istio-init, the proxy (the sidecar test proxy as
// uid/gid 1337) as a native sidecar that starts before the app, and the
// app with args.
func SidecarAppPod(ns, name, node string, args ...string) string {
	annotations := `
  annotations:
    sidecar.istio.io/status: '{"containers":["istio-proxy"]}'`
	initContainers := fmt.Sprintf(`
  initContainers:
    - name: istio-proxy
      image: %s
      imagePullPolicy: IfNotPresent
      restartPolicy: Always
      args: ["--record-file", "/dev/stderr"]
      securityContext:
        runAsUser: 1337
        runAsGroup: 1337
      startupProbe:
        tcpSocket:
          port: 15006
        periodSeconds: 1`, image.SidecarProxy+":v1")
	return appPod(ns, name, node, annotations, initContainers, args)
}

// appPod is the app's Pod pinned to node, with YAML added to its metadata
// (annotations) and to its spec before the containers (initContainers).
func appPod(ns, name, node, annotations, initContainers string, args []string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %[2]s
  namespace: %[1]s
  labels:
    app: %[2]s%[7]s
spec:
  nodeName: %[3]s
  terminationGracePeriodSeconds: 1%[8]s
  containers:
    - name: app
      image: %[4]s
      imagePullPolicy: IfNotPresent
      args: [%[5]s]
      readinessProbe:
        httpGet:
          path: /healthz
          port: %[6]d
        periodSeconds: 1
---
`, ns, name, node, image.App+":v1", serveArgs(args), AppHTTPPort, annotations, initContainers)
}

// serveArgs are `app serve` and args as a YAML flow list.
func serveArgs(args []string) string {
	quoted := []string{`"serve"`}
	for _, a := range args {
		quoted = append(quoted, fmt.Sprintf("%q", a))
	}
	return strings.Join(quoted, ", ")
}

// WaitReady waits until the app Deployment ns/name has replicas Ready pods
// and returns them; on timeout it dumps the namespace's pods and fails.
func (c *Cluster) WaitReady(t testing.TB, ns, name string, replicas int) []corev1.Pod {
	t.Helper()
	var pods []corev1.Pod
	err := Poll(120*time.Second, func() error {
		pods = nil
		for _, p := range c.PodsOf(t, ns, "app="+name) {
			if kube.PodReady(&p) {
				pods = append(pods, p)
			}
		}
		if len(pods) != replicas {
			return fmt.Errorf("%s/%s: %d of %d pods Ready", ns, name, len(pods), replicas)
		}
		return nil
	})
	if err != nil {
		c.DumpPods(t, ns)
		t.Fatal(err)
	}
	return pods
}
