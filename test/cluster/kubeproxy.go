//go:build linux

package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// kube-proxy's health and metrics ports, bound to 127.0.0.1 of the node
// netns it runs in (so one per node netns never collides).
const (
	KubeProxyHealthzPort = 10256
	KubeProxyMetricsPort = 10249
	// KubeProxyClusterCIDR is --cluster-cidr: the pod range of the test
	// nodes (10.244.<node>.0/24).
	KubeProxyClusterCIDR = "10.244.0.0/16"
)

// KubeProxy is a real kube-proxy (iptables mode) run inside a node network
// namespace. It uses that namespace's default `iptables` (nft on Debian 12).
// Its methods are safe for concurrent use.
type KubeProxy struct {
	ns, node string
	mode     string // --proxy-mode
	argv     []string
	logPath  string

	mu sync.Mutex
	p  *proc
}

// LaunchKubeProxy starts kube-proxy in iptables mode inside the network
// namespace ns as node (--hostname-override) with kubeconfig, and returns
// without waiting for its first sync (see WaitHealthy). The caller makes sure
// the Node object exists (EnsureNode): without node IPs kube-proxy waits 30 s
// at start. t.Cleanup stops it and runs `kube-proxy --cleanup`, so its rules
// go even when the test fails. Fails t on error.
func (cp *ControlPlane) LaunchKubeProxy(t testing.TB, ns, node, kubeconfig string) *KubeProxy {
	t.Helper()
	return cp.LaunchKubeProxyMode(t, ns, node, kubeconfig, "iptables")
}

// LaunchKubeProxyMode is LaunchKubeProxy in mode ("iptables" or
// "nftables").
func (cp *ControlPlane) LaunchKubeProxyMode(t testing.TB, ns, node, kubeconfig, mode string) *KubeProxy {
	t.Helper()
	loopback := func(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
	kp := &KubeProxy{
		ns:   ns,
		node: node,
		mode: mode,
		argv: []string{
			filepath.Join(cp.binDir, KubeProxyBinary),
			"--kubeconfig=" + kubeconfig,
			"--hostname-override=" + node,
			"--proxy-mode=" + mode,
			"--cluster-cidr=" + KubeProxyClusterCIDR,
			// The global conntrack limit is not writable from a netns.
			"--conntrack-max-per-core=0",
			"--healthz-bind-address=" + loopback(KubeProxyHealthzPort),
			"--metrics-bind-address=" + loopback(KubeProxyMetricsPort),
			"--v=2",
		},
		logPath: filepath.Join(t.TempDir(), "kube-proxy-"+node+".log"),
	}
	t.Cleanup(func() {
		if err := kp.stop(); err != nil {
			t.Errorf("cluster: stop kube-proxy: %v", err)
		}
		if out, err := kp.cleanup(); err != nil {
			t.Errorf("cluster: kube-proxy --cleanup in %s: %v\n%s", ns, err, out)
		}
		if t.Failed() {
			t.Logf("cluster: kube-proxy log %s (tail):\n%s", kp.logPath, logTail(kp.logPath, logTailLines))
		}
	})
	kp.Start(t)
	return kp
}

// Start starts kube-proxy again with the same flags (its log is appended
// to) without waiting. It fails t if it is already running.
func (kp *KubeProxy) Start(t testing.TB) {
	t.Helper()
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if kp.p != nil && !kp.p.exited() {
		t.Fatalf("cluster: kube-proxy is already running (pid %d)", kp.p.cmd.Process.Pid)
	}
	p, err := startProc("kube-proxy", kp.ns, kp.logPath, kp.argv)
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	kp.p = p
}

// Stop sends SIGTERM (SIGKILL after 15 s) to the kube-proxy this KubeProxy
// started and waits for it to exit. Like a restarting kube-proxy pod it
// leaves its rules in place. A no-op if it is not running.
func (kp *KubeProxy) Stop(t testing.TB) {
	t.Helper()
	if err := kp.stop(); err != nil {
		t.Fatalf("cluster: stop kube-proxy: %v", err)
	}
}

func (kp *KubeProxy) stop() error {
	kp.mu.Lock()
	p := kp.p
	kp.mu.Unlock()
	return p.stop(stopGrace)
}

// Cleanup runs `kube-proxy --cleanup` in the namespace: it removes every
// chain and jump kube-proxy programmed (iptables, ipvs and nftables), as a
// mode switch or a fresh node would. kube-proxy must be stopped.
func (kp *KubeProxy) Cleanup(t testing.TB) {
	t.Helper()
	if out, err := kp.cleanup(); err != nil {
		t.Fatalf("cluster: kube-proxy --cleanup in %s: %v\n%s", kp.ns, err, out)
	}
}

func (kp *KubeProxy) cleanup() (string, error) {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if kp.p != nil && !kp.p.exited() {
		return "", errors.New("kube-proxy is still running")
	}
	cmd := exec.Command("ip", "netns", "exec", kp.ns, kp.argv[0], "--cleanup", "--proxy-mode="+kp.mode, "--v=2")
	cmd.Env = childEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Running reports whether kube-proxy is running, and its PID.
func (kp *KubeProxy) Running() (pid int, ok bool) {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if kp.p == nil || kp.p.exited() {
		return 0, false
	}
	return kp.p.cmd.Process.Pid, true
}

// LogPath is kube-proxy's log file (every run appends to it).
func (kp *KubeProxy) LogPath() string { return kp.logPath }

// Log returns the last lines of kube-proxy's log.
func (kp *KubeProxy) Log() string { return logTail(kp.logPath, logTailLines) }

// WaitHealthy waits until kube-proxy's /healthz answers 200, i.e. it has
// programmed its rules at least once, and fails t if it exits or timeout
// passes first.
func (kp *KubeProxy) WaitHealthy(t testing.TB, timeout time.Duration) {
	t.Helper()
	kp.mu.Lock()
	p := kp.p
	kp.mu.Unlock()
	if p == nil {
		t.Fatal("cluster: kube-proxy was never started")
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: NetnsDialer(kp.ns), Proxy: nil}}
	url := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(KubeProxyHealthzPort)) + "/healthz"
	err := poll(timeout, p, func() error {
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", resp.Status, body)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("cluster: kube-proxy in %s not healthy: %v\n--- %s (tail) ---\n%s", kp.ns, err, kp.logPath, kp.Log())
	}
}

// AdminKubeconfig is Kubeconfig with the static admin token (group
// system:masters), for components whose RBAC is not under test.
func (cp *ControlPlane) AdminKubeconfig(t testing.TB) string {
	t.Helper()
	return cp.Kubeconfig(t, cp.adminToken)
}

// EnsureNode creates the Node object name with InternalIP ip and podCIDR
// (there is no kubelet to register it); an existing Node is left alone.
func (cp *ControlPlane) EnsureNode(t testing.TB, name, ip, podCIDR string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelHostname: name}},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
	}
	created, err := cp.admin.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{FieldManager: FieldManager})
	if apierrors.IsAlreadyExists(err) {
		return
	}
	if err != nil {
		t.Fatalf("cluster: create node %s: %v", name, err)
	}
	created.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: ip},
		{Type: corev1.NodeHostName, Address: name},
	}
	created.Status.Conditions = []corev1.NodeCondition{{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue,
		LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
	}}
	if _, err := cp.admin.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{FieldManager: FieldManager}); err != nil {
		t.Fatalf("cluster: node %s status: %v", name, err)
	}
}

// CreateClusterIPService creates a ClusterIP Service (one TCP port named
// "tcp", clusterIP inside ServiceClusterIPRange) and, as there is no
// controller-manager, its EndpointSlice with one ready endpoint per IP on
// targetPort. Fails t on error.
func (cp *ControlPlane) CreateClusterIPService(t testing.TB, namespace, name, clusterIP string, port, targetPort int, endpointIPs ...string) {
	t.Helper()
	cp.CreateClusterIPServiceProtocols(t, namespace, name, clusterIP, port, targetPort, []corev1.Protocol{corev1.ProtocolTCP}, endpointIPs...)
}

// CreateClusterIPServiceProtocols is CreateClusterIPService with the port
// served over each of protocols.
func (cp *ControlPlane) CreateClusterIPServiceProtocols(t testing.TB, namespace, name, clusterIP string, port, targetPort int, protocols []corev1.Protocol, endpointIPs ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  clusterIP,
			ClusterIPs: []string{clusterIP},
		},
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name + "-e2e", Labels: map[string]string{
			discoveryv1.LabelServiceName: name,
			discoveryv1.LabelManagedBy:   FieldManager,
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	tp := int32(targetPort)
	for _, proto := range protocols {
		portName := strings.ToLower(string(proto))
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
			Name: portName, Protocol: proto, Port: int32(port), TargetPort: intstr.FromInt32(tp),
		})
		slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: &portName, Protocol: &proto, Port: &tp})
	}
	if _, err := cp.admin.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
		t.Fatalf("cluster: create service %s/%s: %v", namespace, name, err)
	}
	ready := true
	for _, ip := range endpointIPs {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{ip},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		})
	}
	if _, err := cp.admin.DiscoveryV1().EndpointSlices(namespace).Create(ctx, slice, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
		t.Fatalf("cluster: create endpointslice for %s/%s: %v", namespace, name, err)
	}
}
