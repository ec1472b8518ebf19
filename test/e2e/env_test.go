// Package e2e runs the real ambient-redirect binary in ptp-shaped node
// network namespaces against a real etcd + kube-apiserver, under the RBAC
// of manifests/, and proves its behaviour with real sockets through the
// test ztunnel. The harness plays kubelet (pod objects and status) and the
// CNI (pod network namespaces).
package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambient-redirect/ambient-redirect/controller"
	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

var agentBin, ztunnelBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		if os.Geteuid() != 0 {
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "ar-e2e-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		agentBin, ztunnelBin = filepath.Join(dir, "ambient-redirect"), filepath.Join(dir, "test-ztunnel")
		for bin, pkg := range map[string]string{agentBin: "./cmd/ambient-redirect", ztunnelBin: "./test/ztunnel"} {
			cmd := exec.Command("go", "build", "-o", bin, pkg)
			cmd.Dir = "../.."
			if out, err := cmd.CombinedOutput(); err != nil {
				fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, out)
				return 1
			}
		}
		return m.Run()
	}())
}

const (
	apiIP     = "172.18.0.1"
	debugAddr = "127.0.0.1:15099"
	echoPort  = 8080
	ambientNS = "apps"
	plainNS   = "plain"
	ztNS      = "istio-system"
)

type env struct {
	t      testing.TB
	c      *netnstest.Cluster
	cp     *cluster.ControlPlane
	client kubernetes.Interface
	kc     string
	nsDir  string
	nodes  []*enode
}

type enode struct {
	*netnstest.Node
	agent *netnstest.Proc
	zt    *ztunnel
}

type kpod struct {
	node *enode
	net  *netnstest.Pod
	obj  *corev1.Pod
	ip   string
}

func ctx() context.Context { return context.Background() }

// newEnv builds nodes, a control plane on the underlay bridge, the agent's
// RBAC from manifests/, and a ztunnel per node. Agents are not started.
func newEnv(t *testing.T, nodes int) *env {
	t.Helper()
	netnstest.RequireRoot(t)
	c := netnstest.NewCluster(t, nodes)
	netnstest.Exec(t, c.UnderlayNS, "ip", "addr", "add", apiIP+"/16", "dev", netnstest.UnderlayBridge)
	cp := cluster.Start(t, c.UnderlayNS, apiIP)
	e := &env{t: t, c: c, cp: cp, client: cp.AdminClient(), nsDir: t.TempDir()}
	for _, ns := range c.Namespaces() {
		e.link(ns)
	}
	// The agent runs under exactly the RBAC of manifests/.
	dir := t.TempDir()
	for _, f := range []string{"serviceaccount.yaml", "rbac.yaml"} {
		b, err := os.ReadFile(filepath.Join("../../manifests", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := cp.ApplyManifests(t, dir); err != nil {
		t.Fatalf("apply manifests: %v", err)
	}
	e.kc = cp.Kubeconfig(t, cp.ServiceAccountToken(t, "kube-system", "ambient-redirect"))
	for _, name := range []string{ambientNS, plainNS, ztNS, "other"} {
		if _, err := e.client.CoreV1().Namespaces().Create(ctx(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	e.labelNamespace(t, ambientNS, true)
	for _, n := range c.Nodes {
		en := &enode{Node: n}
		e.nodes = append(e.nodes, en)
	}
	for _, en := range e.nodes {
		en.zt = e.startZtunnel(t, en, "ztunnel-"+en.Name)
	}
	return e
}

// link exposes a namespace in the agents' --netns-dir.
func (e *env) link(ns string) {
	if err := os.Symlink(netnstest.NsPath(ns), filepath.Join(e.nsDir, ns)); err != nil && !os.IsExist(err) {
		e.t.Fatal(err)
	}
}

func (e *env) labelNamespace(t testing.TB, name string, ambient bool) {
	t.Helper()
	ns, err := e.client.CoreV1().Namespaces().Get(ctx(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	if ambient {
		ns.Labels[controller.DataplaneModeLabel] = controller.DataplaneModeAmbient
	} else {
		delete(ns.Labels, controller.DataplaneModeLabel)
	}
	if _, err := e.client.CoreV1().Namespaces().Update(ctx(), ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (e *env) startAgent(t testing.TB, n *enode, extra ...string) {
	t.Helper()
	args := append([]string{agentBin, "run", "--node-name", n.Name, "--kubeconfig", e.kc, "--netns-dir", e.nsDir,
		"--resync-period", "2s", "--debug-addr", debugAddr}, extra...)
	n.agent = netnstest.Start(t, n.NS, args...)
	eventually(t, 30*time.Second, func() error {
		code, body, err := e.get(n, "/readyz")
		if err != nil || code != 200 {
			return fmt.Errorf("readyz %d %s %v\n%s", code, body, err, n.agent.Log())
		}
		return nil
	})
}

func (e *env) stopAgent(n *enode) {
	if n.agent != nil {
		n.agent.Stop()
		n.agent = nil
	}
}

// get fetches a debug URL of a node's agent from inside the node netns.
func (e *env) get(n *enode, path string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return netnstest.Dial(n.NS, network, addr, 2*time.Second)
		},
	}}
	resp, err := c.Get("http://" + debugAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (e *env) state(t testing.TB, n *enode) controller.DebugState {
	t.Helper()
	code, body, err := e.get(n, "/debug/state")
	if err != nil || code != 200 {
		t.Fatalf("/debug/state: %d %v %s", code, err, body)
	}
	var st controller.DebugState
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/debug/state: %v\n%s", err, body)
	}
	return st
}

// kernelWrites sums ambient_redirect_kernel_writes_total from /metrics.
func (e *env) kernelWrites(t testing.TB, n *enode) int {
	t.Helper()
	code, body, err := e.get(n, "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("/metrics: %d %v", code, err)
	}
	total := 0.0
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "ambient_redirect_kernel_writes_total{") {
			var v float64
			fmt.Sscanf(l[strings.LastIndex(l, " ")+1:], "%g", &v)
			total += v
		}
	}
	return int(total)
}

type podOpt func(*corev1.Pod)

func withLabels(kv ...string) podOpt {
	return func(p *corev1.Pod) {
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Labels[kv[i]] = kv[i+1]
		}
	}
}

func withAnnotations(kv ...string) podOpt {
	return func(p *corev1.Pod) {
		if p.Annotations == nil {
			p.Annotations = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Annotations[kv[i]] = kv[i+1]
		}
	}
}

func hostNetwork(p *corev1.Pod) { p.Spec.HostNetwork = true }

// runPod plays CNI and kubelet: a pod netns (unless hostNetwork), the pod
// object bound to the node, then its status with IP, Running and Ready.
func (e *env) runPod(t testing.TB, n *enode, namespace, name string, opts ...podOpt) *kpod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec:       corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}
	for _, o := range opts {
		o(p)
	}
	kp := &kpod{node: n}
	if p.Spec.HostNetwork {
		kp.ip = n.IP.String()
	} else {
		kp.net = n.AddPod(t, strings.ReplaceAll(namespace+"-"+name, "istio-system", "is"))
		kp.ip = kp.net.IP.String()
		e.link(kp.net.NS)
	}
	created, err := e.client.CoreV1().Pods(namespace).Create(ctx(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := metav1.Now()
	created.Status = corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: kp.ip, PodIPs: []corev1.PodIP{{IP: kp.ip}}, StartTime: &now,
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}},
	}
	kp.obj, err = e.client.CoreV1().Pods(namespace).UpdateStatus(ctx(), created, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if kp.net != nil {
		netnstest.EchoServer(t, kp.net.NS, net.JoinHostPort(kp.ip, fmt.Sprint(echoPort)))
	}
	return kp
}

func (e *env) deletePod(t testing.TB, p *kpod) {
	t.Helper()
	zero := int64(0)
	if err := e.client.CoreV1().Pods(p.obj.Namespace).Delete(ctx(), p.obj.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	if p.net != nil {
		p.net.Delete(t)
	}
}

func (e *env) annotation(t testing.TB, p *kpod) string {
	t.Helper()
	obj, err := e.client.CoreV1().Pods(p.obj.Namespace).Get(ctx(), p.obj.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return obj.Annotations[controller.RedirectionAnno]
}

// members lists the node's ipset members.
func members(t testing.TB, n *enode) map[string]bool {
	t.Helper()
	out, err := netnstest.ExecErr(n.NS, "ipset", "list", "ztunnel-pods-ips")
	if err != nil {
		return map[string]bool{}
	}
	m := map[string]bool{}
	inMembers := false
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "Members:") {
			inMembers = true
			continue
		}
		if inMembers && strings.TrimSpace(l) != "" {
			m[strings.Fields(l)[0]] = true
		}
	}
	return m
}

func hasRoute(t testing.TB, n *enode, ip string) bool {
	t.Helper()
	out, _ := netnstest.ExecErr(n.NS, "ip", "route", "show", "table", "100", ip+"/32")
	return strings.TrimSpace(out) != ""
}

func eventually(t testing.TB, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %v", timeout, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// ztunnel is a running test ztunnel and its pod.
type ztunnel struct {
	pod     *kpod
	proc    *netnstest.Proc
	records string
}

func (e *env) startZtunnel(t testing.TB, n *enode, name string) *ztunnel {
	t.Helper()
	var cidrs []string
	for _, o := range e.c.Nodes {
		if o.Name != n.Name {
			cidrs = append(cidrs, o.PodCIDR.String())
		}
	}
	z := &ztunnel{}
	z.pod = e.runPod(t, n, ztNS, name, withLabels("app", "ztunnel"))
	dir := t.TempDir()
	z.records = filepath.Join(dir, "records.jsonl")
	ready := filepath.Join(dir, "ready")
	z.proc = netnstest.Start(t, z.pod.net.NS, ztunnelBin, "--record-file", z.records, "--ready-file", ready, "--hbone-cidrs", strings.Join(cidrs, ","))
	eventually(t, 10*time.Second, func() error {
		_, err := os.Stat(ready)
		return err
	})
	return z
}

type record struct {
	Listener     int    `json:"listener"`
	Client       string `json:"client"`
	OrigDst      string `json:"orig_dst"`
	Target       string `json:"target"`
	HeaderClient string `json:"header_client"`
	DialError    string `json:"dial_error"`
}

func (z *ztunnel) records_(t testing.TB) []record {
	f, err := os.Open(z.records)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []record
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r record
		if json.Unmarshal(sc.Bytes(), &r) == nil {
			out = append(out, r)
		}
	}
	return out
}

// count is how many connections from client IP to dst z recorded at listener.
func (z *ztunnel) count(t testing.TB, listener int, client, dst string) int {
	n := 0
	for _, r := range z.records_(t) {
		if r.Listener == listener && strings.HasPrefix(r.Client, client+":") && r.OrigDst == dst {
			n++
		}
	}
	return n
}

func hostport(ip string, port int) string { return net.JoinHostPort(ip, fmt.Sprint(port)) }

// roundTrip sends bytes from a pod to dst and wants them echoed back.
func roundTrip(from *kpod, dst string) error {
	p := []byte(strings.Repeat("ambient-redirect e2e ", 500))
	got, err := netnstest.RoundTrip(from.net.NS, dst, p, 3*time.Second)
	if err != nil {
		return err
	}
	if string(got) != string(p) {
		return fmt.Errorf("echo mismatch: %d bytes back, want %d", len(got), len(p))
	}
	return nil
}

// captured proves from -> to:echo round-trips and is seen by z at listener.
func captured(t testing.TB, z *ztunnel, listener int, from, to *kpod) error {
	dst := hostport(to.ip, echoPort)
	before := z.count(t, listener, from.ip, dst)
	if err := roundTrip(from, dst); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Second)
	for z.count(t, listener, from.ip, dst) == before {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s -> %s not recorded at %d", from.ip, dst, listener)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// direct proves from -> to:echo round-trips and no ztunnel of zs saw it.
func direct(t testing.TB, from, to *kpod, zs ...*ztunnel) error {
	dst := hostport(to.ip, echoPort)
	total := func() int {
		n := 0
		for _, z := range zs {
			for _, l := range []int{15001, 15006, 15008} {
				n += z.count(t, l, from.ip, dst)
			}
		}
		return n
	}
	before := total()
	if err := roundTrip(from, dst); err != nil {
		return err
	}
	time.Sleep(50 * time.Millisecond)
	if total() != before {
		return fmt.Errorf("%s -> %s was captured", from.ip, dst)
	}
	return nil
}
