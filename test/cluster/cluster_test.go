//go:build linux

package cluster_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
)

const (
	apiIP    = "10.255.255.1" // only ever configured inside the test netns
	testNS   = "e2e"
	nodeName = "node-a"
	podName  = "web-0"
	podIP    = "10.244.0.5"
)

// requireRoot skips without root, except under CI=true where it fails: CI
// must run these tests.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("CI=true but not root: the control-plane tests need root (network namespaces)")
	}
	t.Skip("needs root (network namespaces)")
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// newNetns creates a private network namespace holding a veth pair
// with ip/32 on one end (and lo up). Only the new namespace is touched; it is deleted in
// t.Cleanup, registered before anything else so that it runs last.
func newNetns(t *testing.T, ip string) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	removeStaleNetns(t)
	name := netnsPrefix + hex.EncodeToString(b)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	// Both ends of the veth pair stay inside the namespace (the kernel may
	// lack the dummy driver); cp0 holds the address.
	run(t, "ip", "-n", name, "link", "add", "cp0", "type", "veth", "peer", "name", "cp1")
	run(t, "ip", "-n", name, "addr", "add", ip+"/32", "dev", "cp0")
	run(t, "ip", "-n", name, "link", "set", "cp1", "up")
	run(t, "ip", "-n", name, "link", "set", "cp0", "up")
	return name
}

// netnsPrefix names the namespaces these tests create.
const netnsPrefix = "cpt-"

// removeStaleNetns deletes namespaces left by a test binary that died before
// its cleanups ran (e.g. a -timeout panic): ours by name, older than ten
// minutes (a run takes seconds) and holding no process.
func removeStaleNetns(t *testing.T) {
	entries, err := os.ReadDir(cluster.NetnsDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), netnsPrefix) {
			continue
		}
		info, err := e.Info()
		if err != nil || time.Since(info.ModTime()) < 10*time.Minute {
			continue
		}
		pids, err := exec.Command("ip", "netns", "pids", e.Name()).Output()
		if err != nil || len(strings.TrimSpace(string(pids))) > 0 {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", e.Name()).CombinedOutput(); err != nil {
			t.Logf("remove stale netns %s: %v: %s", e.Name(), err, out)
		} else {
			t.Logf("removed stale netns %s", e.Name())
		}
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestControlPlane(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("iproute2 is required: %v", err)
	}
	if _, err := cluster.BinDir(); err != nil {
		t.Fatal(err)
	}
	ns := newNetns(t, apiIP)
	began := time.Now()
	cp := cluster.Start(t, ns, apiIP)
	t.Logf("Start took %s", time.Since(began).Round(time.Millisecond))

	if got, want := cp.Host(), "https://"+apiIP+":6443"; got != want {
		t.Errorf("Host() = %q, want %q", got, want)
	}
	if !strings.Contains(string(cp.CAData()), "BEGIN CERTIFICATE") {
		t.Errorf("CAData() is not a PEM certificate")
	}
	admin := cp.AdminClient()

	t.Run("PodsAndStatus", func(t *testing.T) {
		ctx := ctxT(t)
		if _, err := admin.CoreV1().Namespaces().Create(ctx,
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNS}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create namespace: %v", err)
		}
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: podName, Namespace: testNS, Labels: map[string]string{"app": "web"}},
			Spec: corev1.PodSpec{
				NodeName:   nodeName,
				Containers: []corev1.Container{{Name: "c", Image: "x"}},
			},
		}
		created, err := admin.CoreV1().Pods(testNS).Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create pod: %v", err)
		}
		created.Status = corev1.PodStatus{
			Phase:  corev1.PodRunning,
			PodIP:  podIP,
			PodIPs: []corev1.PodIP{{IP: podIP}},
			Conditions: []corev1.PodCondition{{
				Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: metav1.Now(),
			}},
		}
		if _, err := admin.CoreV1().Pods(testNS).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("update pod status: %v", err)
		}
		// A pod on another node must not match the field selector.
		other := pod.DeepCopy()
		other.Name, other.Spec.NodeName = "elsewhere", "node-b"
		if _, err := admin.CoreV1().Pods(testNS).Create(ctx, other, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create second pod: %v", err)
		}
		list, err := admin.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("spec.nodeName", nodeName).String(),
		})
		if err != nil {
			t.Fatalf("list pods by node: %v", err)
		}
		if len(list.Items) != 1 || list.Items[0].Name != podName {
			t.Fatalf("pods on %s: got %d %v, want only %s", nodeName, len(list.Items), podNames(list.Items), podName)
		}
		got := list.Items[0]
		if got.Status.PodIP != podIP || got.Status.Phase != corev1.PodRunning {
			t.Fatalf("pod status: podIP %q phase %q, want %q Running", got.Status.PodIP, got.Status.Phase, podIP)
		}
	})

	t.Run("ServiceAccountRBAC", func(t *testing.T) {
		ctx := ctxT(t)
		const sa = "pod-reader"
		role := &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "e2e-pod-reader"},
			Rules: []rbacv1.PolicyRule{{
				APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"},
			}},
		}
		if _, err := admin.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create clusterrole: %v", err)
		}
		token := cp.ServiceAccountToken(t, testNS, sa)
		// Idempotent: a second call reuses the namespace and account.
		_ = cp.ServiceAccountToken(t, testNS, sa)
		binding := &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "e2e-pod-reader"},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: testNS}},
		}
		if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create clusterrolebinding: %v", err)
		}

		path := cp.Kubeconfig(t, token)
		cfg, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatalf("load kubeconfig %s: %v", path, err)
		}
		if cfg.Host != cp.Host() || cfg.BearerToken != token {
			t.Fatalf("kubeconfig: host %q token set %v", cfg.Host, cfg.BearerToken == token)
		}
		cfg.Dial = cluster.NetnsDialer(ns) // the test process is in the root netns
		sac, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		// The RBAC authorizer's cache sees the new binding shortly.
		var pods *corev1.PodList
		deadline := time.Now().Add(15 * time.Second)
		for {
			pods, err = sac.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
			if err == nil || !apierrors.IsForbidden(err) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("serviceaccount list pods: %v", err)
		}
		if len(pods.Items) == 0 {
			t.Fatalf("serviceaccount sees no pods")
		}
		_, err = sac.CoreV1().Secrets(testNS).List(ctx, metav1.ListOptions{})
		if !apierrors.IsForbidden(err) {
			t.Fatalf("serviceaccount list secrets: got %v, want 403 Forbidden", err)
		}
		if err := sac.CoreV1().Pods(testNS).Delete(ctx, podName, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
			t.Fatalf("serviceaccount delete pod: got %v, want 403 Forbidden", err)
		}

		// A process living inside the namespace (as the agent will) uses the
		// kubeconfig as is, without any dialer: re-run this test binary there.
		cmd := exec.Command("ip", "netns", "exec", ns, os.Args[0],
			"-test.run=^TestKubeconfigHelperProcess$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), helperEnv+"="+path)
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "helper: ok") {
			t.Fatalf("client inside netns %s with the kubeconfig: %v\n%s", ns, err, out)
		}
	})

	t.Run("ManifestsDryRun", func(t *testing.T) {
		ctx := ctxT(t)
		good := t.TempDir()
		writeFile(t, filepath.Join(good, "sa.yaml"), `
# leading comment and an empty document
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: dry-run-sa
  namespace: e2e
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: dry-run-cm
  namespace: e2e
data:
  k: v
`)
		// Shaped like the agent: privileged, host network.
		writeFile(t, filepath.Join(good, "daemonset.yaml"), `
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
  namespace: e2e
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      hostNetwork: true
      serviceAccountName: agent
      containers:
      - name: agent
        image: x
        securityContext:
          privileged: true
`)
		if err := cp.ApplyManifestsDryRun(t, good); err != nil {
			t.Fatalf("valid manifests: %v", err)
		}
		if _, err := admin.CoreV1().ServiceAccounts(testNS).Get(ctx, "dry-run-sa", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Fatalf("dry run persisted the ServiceAccount (get: %v)", err)
		}

		bad := t.TempDir()
		writeFile(t, filepath.Join(bad, "ok.yaml"), `
apiVersion: v1
kind: ServiceAccount
metadata:
  name: fine-sa
  namespace: e2e
`)
		writeFile(t, filepath.Join(bad, "deploy.yaml"), `
apiVersion: apps/v1
kind: Deployment
metadata:
  name: no-selector
  namespace: e2e
spec:
  template:
    metadata:
      labels: {app: x}
    spec:
      containers:
      - name: c
        image: x
---
apiVersion: example.invalid/v1
kind: Gadget
metadata:
  name: unknown-kind
`)
		err := cp.ApplyManifestsDryRun(t, bad)
		if err == nil {
			t.Fatal("invalid manifests: got nil error")
		}
		msg := err.Error()
		for _, want := range []string{"Deployment e2e/no-selector", "selector", "Gadget unknown-kind"} {
			if !strings.Contains(msg, want) {
				t.Errorf("error does not mention %q:\n%s", want, msg)
			}
		}
		if strings.Contains(msg, "fine-sa") {
			t.Errorf("error blames the valid object:\n%s", msg)
		}
		t.Logf("expected error:\n%s", msg)

		if err := cp.ApplyManifestsDryRun(t, t.TempDir()); err == nil {
			t.Error("empty dir: got nil error")
		}
	})

	t.Run("ApplyManifests", func(t *testing.T) {
		ctx := ctxT(t)
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "rbac.yaml"), `
apiVersion: v1
kind: ServiceAccount
metadata:
  name: agent
  namespace: agent-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: e2e-agent
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: e2e-agent
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: e2e-agent}
subjects:
- {kind: ServiceAccount, name: agent, namespace: agent-system}
`)
		// Namespace in a later file: ApplyManifests still creates it first.
		writeFile(t, filepath.Join(dir, "z-namespace.yaml"), `
apiVersion: v1
kind: Namespace
metadata:
  name: agent-system
`)
		if err := cp.ApplyManifests(t, dir); err != nil {
			t.Fatalf("apply: %v", err)
		}
		// Again: every object exists, so this exercises the update path.
		if err := cp.ApplyManifests(t, dir); err != nil {
			t.Fatalf("re-apply: %v", err)
		}
		// Existing objects pass a dry run too.
		if err := cp.ApplyManifestsDryRun(t, dir); err != nil {
			t.Fatalf("dry run of applied objects: %v", err)
		}
		if _, err := admin.CoreV1().ServiceAccounts("agent-system").Get(ctx, "agent", metav1.GetOptions{}); err != nil {
			t.Fatalf("applied ServiceAccount: %v", err)
		}
		if _, err := admin.RbacV1().ClusterRoleBindings().Get(ctx, "e2e-agent", metav1.GetOptions{}); err != nil {
			t.Fatalf("applied ClusterRoleBinding: %v", err)
		}
	})

	t.Run("DialerLeavesNoThreadInNetns", func(t *testing.T) {
		dial := cp.Dialer()
		var wg sync.WaitGroup
		errs := make(chan error, 40)
		for i := 0; i < 40; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, err := dial(ctx, "tcp", apiIP+":6443")
				if err != nil {
					errs <- err
					return
				}
				c.Close()
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		// Every thread of this process must be back in the main thread's
		// network namespace.
		want, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", os.Getpid()))
		if err != nil {
			t.Fatal(err)
		}
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			t.Fatal(err)
		}
		for _, task := range tasks {
			got, err := os.Readlink("/proc/self/task/" + task.Name() + "/ns/net")
			if err == nil && got != want {
				t.Errorf("thread %s is in %s, want %s", task.Name(), got, want)
			}
		}
	})

	t.Run("APIServerRestartKeepsState", func(t *testing.T) {
		began := time.Now()
		cp.StopAPIServer(t)
		t.Logf("StopAPIServer took %s", time.Since(began).Round(time.Millisecond))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := admin.CoreV1().Pods(testNS).Get(ctx, podName, metav1.GetOptions{})
		cancel()
		if err == nil {
			t.Fatal("get pod succeeded while the apiserver is stopped")
		}
		cp.StopAPIServer(t) // no-op when already stopped

		cp.StartAPIServer(t)
		ctx = ctxT(t)
		pod, err := admin.CoreV1().Pods(testNS).Get(ctx, podName, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get pod after restart: %v", err)
		}
		if pod.Spec.NodeName != nodeName || pod.Status.PodIP != podIP {
			t.Fatalf("pod after restart: node %q podIP %q", pod.Spec.NodeName, pod.Status.PodIP)
		}
		// Tokens stay valid across the restart (same signing key).
		sa := cp.ServiceAccountToken(t, testNS, "pod-reader")
		sac, err := kubernetes.NewForConfig(cp.TokenConfig(sa))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sac.CoreV1().Pods(testNS).List(ctx, metav1.ListOptions{}); err != nil {
			t.Fatalf("serviceaccount list pods after restart: %v", err)
		}
	})
}

// helperEnv carries a kubeconfig path to TestKubeconfigHelperProcess.
const helperEnv = "AR_CLUSTER_TEST_HELPER_KUBECONFIG"

// TestKubeconfigHelperProcess is not a test on its own: TestControlPlane runs
// the test binary inside the control plane's netns with helperEnv set, to
// prove that a plain in-namespace client works from the kubeconfig alone.
func TestKubeconfigHelperProcess(t *testing.T) {
	path := os.Getenv(helperEnv)
	if path == "" {
		t.Skip("helper process for TestControlPlane")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	pods, err := c.CoreV1().Pods(testNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list pods: %v", err)
	}
	if _, err := c.CoreV1().Secrets(testNS).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("list secrets: got %v, want 403 Forbidden", err)
	}
	fmt.Printf("helper: ok, %d pods visible\n", len(pods.Items))
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func podNames(pods []corev1.Pod) []string {
	var names []string
	for _, p := range pods {
		names = append(names, p.Namespace+"/"+p.Name)
	}
	return names
}
