// Package harness runs the real ambient-redirect binary in ptp-shaped node
// network namespaces against a real etcd + kube-apiserver, under the RBAC of
// manifests/. It plays kubelet (pod objects and status) and the CNI (pod
// network namespaces), and runs the test ztunnel. Used by the e2e tests and
// the node-scale benchmarks.
package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"github.com/ambient-redirect/ambient-redirect/controller"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// Binaries are the agent, its CNI plugin and the test ztunnel, built once
// per test binary.
type Binaries struct{ Agent, CNI, Ztunnel string }

// Build compiles the binaries into dir; repo is the module root.
func Build(repo, dir string) (Binaries, error) {
	b := Binaries{Agent: filepath.Join(dir, "ambient-redirect"), CNI: filepath.Join(dir, "ambient-redirect-cni"), Ztunnel: filepath.Join(dir, "test-ztunnel")}
	for bin, pkg := range map[string]string{b.Agent: "./cmd/ambient-redirect", b.CNI: "./cmd/ambient-redirect-cni", b.Ztunnel: "./test/ztunnel"} {
		// auto: stamp the VCS revision (version prints it) even where
		// GOFLAGS says -buildvcs=false, without failing outside a checkout.
		args := []string{"build", "-buildvcs=auto", "-o", bin}
		if os.Getenv("AR_RACE") == "1" {
			args = append(args, "-race") // agents then stop at the first data race
		}
		cmd := exec.Command("go", append(args, pkg)...)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			return b, fmt.Errorf("build %s: %v\n%s", pkg, err, out)
		}
	}
	return b, nil
}

// Addresses and names of the test cluster.
const (
	APIIP     = "172.18.0.1" // the API server, on the underlay bridge
	DebugAddr = "127.0.0.1:15099"
	EchoPort  = 8080
	AmbientNS = "apps" // labelled istio.io/dataplane-mode=ambient
	PlainNS   = "plain"
	ZtunnelNS = "istio-system"
)

// Env is a cluster of nodes, a control plane and a ztunnel per node.
type Env struct {
	T      testing.TB
	C      *netnstest.Cluster
	CP     *cluster.ControlPlane
	Client kubernetes.Interface
	// KC is the agent's kubeconfig (its ServiceAccount's token).
	KC string
	// NSDir is the agents' --netns-dir: links to this env's namespaces only.
	NSDir string
	Nodes []*Node
	Bins  Binaries
	// AgentEnv are extra VAR=value settings for agents started after it is set.
	AgentEnv []string
	// CNIPath is the runtime's CNI bin dirs that CNIPod looks each plugin's
	// type up in (as libcni does): by default the primary plugins' dir and
	// a dir holding the plugin binary under its type, as the agent's
	// installer leaves it; a test of --cni-install puts the agent's bin dir
	// first instead.
	CNIPath []string

	adminKC string // kube-proxy's kubeconfig, made on first use
}

// Node is a node with its agent (when running) and active ztunnel.
type Node struct {
	*netnstest.Node
	Agent *netnstest.Proc
	ZT    *Ztunnel
}

// Pod is a pod object and (unless hostNetwork) its network namespace.
type Pod struct {
	Node *Node
	Net  *netnstest.Pod
	Obj  *corev1.Pod
	IP   string
	// IP6 is its IPv6 address on dual-stack nodes ("" otherwise).
	IP6 string
}

func ctx() context.Context { return context.Background() }

// New builds nodes, a control plane on the underlay bridge, the agent's
// RBAC from manifests/, and a ztunnel per node. Agents are not started.
func New(t testing.TB, nodes int, bins Binaries) *Env {
	t.Helper()
	netnstest.RequireRoot(t)
	c := netnstest.NewCluster(t, nodes)
	netnstest.Exec(t, c.UnderlayNS, "ip", "addr", "add", APIIP+"/16", "dev", netnstest.UnderlayBridge)
	cp := cluster.Start(t, c.UnderlayNS, APIIP)
	e := &Env{T: t, C: c, CP: cp, Client: cp.AdminClient(), NSDir: t.TempDir(), Bins: bins}
	e.CNIPath = []string{netnstest.CNIPath}
	if bins.CNI != "" {
		e.CNIPath = []string{installedPlugin(t, bins.CNI), netnstest.CNIPath}
	}
	for _, ns := range c.Namespaces() {
		e.Link(ns)
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
	e.KC = cp.Kubeconfig(t, cp.ServiceAccountToken(t, "kube-system", "ambient-redirect"))
	for _, name := range []string{AmbientNS, PlainNS, ZtunnelNS, "other"} {
		if _, err := e.Client.CoreV1().Namespaces().Create(ctx(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	e.LabelNamespace(t, AmbientNS, true)
	for _, n := range c.Nodes {
		en := &Node{Node: n}
		e.Nodes = append(e.Nodes, en)
	}
	for _, en := range e.Nodes {
		en.ZT = e.StartZtunnel(t, en, "ztunnel-"+en.Name)
	}
	return e
}

// Link exposes a namespace in the agents' --netns-dir.
func (e *Env) Link(ns string) {
	if err := os.Symlink(netnstest.NsPath(ns), filepath.Join(e.NSDir, ns)); err != nil && !os.IsExist(err) {
		e.T.Fatal(err)
	}
}

func (e *Env) LabelNamespace(t testing.TB, name string, ambient bool) {
	t.Helper()
	ns, err := e.Client.CoreV1().Namespaces().Get(ctx(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	if ambient {
		ns.Labels[selection.DataplaneModeLabel] = selection.DataplaneModeAmbient
	} else {
		delete(ns.Labels, selection.DataplaneModeLabel)
	}
	if _, err := e.Client.CoreV1().Namespaces().Update(ctx(), ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (e *Env) StartAgent(t testing.TB, n *Node, extra ...string) {
	t.Helper()
	e.LaunchAgent(t, n, extra...)
	Eventually(t, 30*time.Second, func() error {
		code, body, err := e.Get(n, "/readyz")
		if err != nil || code != 200 {
			return fmt.Errorf("readyz %d %s %v\n%s", code, body, err, n.Agent.Log())
		}
		return nil
	})
}

// LaunchAgent starts the agent on n (resync 2s unless extra overrides it)
// without waiting for it.
func (e *Env) LaunchAgent(t testing.TB, n *Node, extra ...string) {
	t.Helper()
	args := append([]string{e.Bins.Agent, "run", "--node-name", n.Name, "--kubeconfig", e.KC, "--netns-dir", e.NSDir,
		"--resync-period", "2s", "--debug-addr", DebugAddr}, extra...)
	if b := os.Getenv("AR_BACKEND"); b != "" && !slices.Contains(extra, "--backend") {
		args = append(args, "--backend", b) // the suite on another backend
	}
	env := e.AgentEnv
	if os.Getenv("AR_RACE") == "1" {
		env = append(env, "GORACE=halt_on_error=1 exitcode=66")
	}
	if len(env) > 0 {
		args = append(append([]string{"env"}, env...), args...)
	}
	n.Agent = netnstest.Start(t, n.NS, args...)
}

func (e *Env) StopAgent(n *Node) {
	if n.Agent != nil {
		n.Agent.Stop()
		n.Agent = nil
	}
}

// Get fetches a debug URL of a node's agent from inside the node netns.
func (e *Env) Get(n *Node, path string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return netnstest.Dial(n.NS, network, addr, 2*time.Second)
		},
	}}
	resp, err := c.Get("http://" + DebugAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (e *Env) State(t testing.TB, n *Node) controller.DebugState {
	t.Helper()
	code, body, err := e.Get(n, "/debug/state")
	if err != nil || code != 200 {
		t.Fatalf("/debug/state: %d %v %s", code, err, body)
	}
	var st controller.DebugState
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/debug/state: %v\n%s", err, body)
	}
	return st
}

// KernelWrites sums ambient_redirect_kernel_writes_total from /metrics.
func (e *Env) KernelWrites(t testing.TB, n *Node) int {
	return int(e.Metric(t, n, "ambient_redirect_kernel_writes_total"))
}

// Metric sums every series of the named metric in the agent's /metrics
// (one sample for an unlabelled metric).
func (e *Env) Metric(t testing.TB, n *Node, name string) float64 {
	t.Helper()
	return e.Metrics(t, n, name)[0]
}

// Metrics is Metric of each name, all from one read of /metrics (values
// that must agree with each other, such as a histogram's count and
// buckets). A name may also be a series, name{labels}.
func (e *Env) Metrics(t testing.TB, n *Node, names ...string) []float64 {
	t.Helper()
	code, body, err := e.Get(n, "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("/metrics: %d %v", code, err)
	}
	totals := make([]float64, len(names))
	for _, l := range strings.Split(body, "\n") {
		for i, name := range names {
			if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") {
				if v, err := strconv.ParseFloat(l[strings.LastIndex(l, " ")+1:], 64); err == nil {
					totals[i] += v
				}
			}
		}
	}
	return totals
}

type PodOpt func(*corev1.Pod)

func WithLabels(kv ...string) PodOpt {
	return func(p *corev1.Pod) {
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Labels[kv[i]] = kv[i+1]
		}
	}
}

func WithAnnotations(kv ...string) PodOpt {
	return func(p *corev1.Pod) {
		if p.Annotations == nil {
			p.Annotations = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Annotations[kv[i]] = kv[i+1]
		}
	}
}

func HostNetwork(p *corev1.Pod) { p.Spec.HostNetwork = true }

// RunPod plays CNI and kubelet: a pod netns (unless HostNetwork), the pod
// object bound to the node, then its status with IP, Running and Ready.
func (e *Env) RunPod(t testing.TB, n *Node, namespace, name string, opts ...PodOpt) *Pod {
	t.Helper()
	p := podObject(n, namespace, name, opts)
	kp := &Pod{Node: n}
	if p.Spec.HostNetwork {
		kp.IP = n.IP.String()
	} else {
		e.attach(kp, n.AddPod(t, netnsName(namespace, name)))
	}
	created, err := e.Client.CoreV1().Pods(namespace).Create(ctx(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	created.Status = runningStatus(kp)
	kp.Obj, err = e.Client.CoreV1().Pods(namespace).UpdateStatus(ctx(), created, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if kp.Net != nil {
		for _, ip := range kp.Net.IPs {
			netnstest.EchoServer(t, kp.Net.NS, net.JoinHostPort(ip.String(), fmt.Sprint(EchoPort)))
		}
	}
	return kp
}

// CNIPod plays the kubelet with the agent's CNI plugin chained after ptp:
// the pod object (no status yet), then CNI ADD through ptp and the plugin
// (conf is the plugin's conflist entry). It returns as soon as ADD does, or
// ADD's error; WriteStatus then plays the status write.
func (e *Env) CNIPod(t testing.TB, n *Node, namespace, name string, conf map[string]any, opts ...PodOpt) (*Pod, error) {
	t.Helper()
	created, err := e.Client.CoreV1().Pods(namespace).Create(ctx(), podObject(n, namespace, name, opts), metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) { // the kubelet retrying a sandbox
		created, err = e.Client.CoreV1().Pods(namespace).Get(ctx(), name, metav1.GetOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
	kp := &Pod{Node: n, Obj: created}
	conf = maps.Clone(conf)
	if conf["type"] == nil {
		conf["type"] = "ambient-redirect" // the documented type
	}
	args := fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", namespace, name, created.UID)
	pn, err := n.AddPodE(netnsName(namespace, name), netnstest.WithChain(netnstest.Chain{Path: e.CNIPath, Conf: conf, Args: args}))
	if err != nil {
		return kp, err
	}
	e.attach(kp, pn)
	return kp, nil
}

// installedPlugin is a CNI bin dir holding the plugin binary under the
// documented type, as `run --cni-install` installs it.
func installedPlugin(t testing.TB, plugin string) string {
	dir := t.TempDir()
	b, err := os.ReadFile(plugin)
	if err != nil {
		t.Fatalf("plugin binary: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ambient-redirect"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// WriteStatus writes a CNIPod's status (addresses, Running, Ready).
func (e *Env) WriteStatus(t testing.TB, kp *Pod) {
	t.Helper()
	status := runningStatus(kp)
	pods, name := e.Client.CoreV1().Pods(kp.Obj.Namespace), kp.Obj.Name
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error { // the agent annotates it meanwhile
		cur, err := pods.Get(ctx(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Status = status
		if cur, err = pods.UpdateStatus(ctx(), cur, metav1.UpdateOptions{}); err == nil {
			kp.Obj = cur
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// podObject is a pod bound to n, before any status.
func podObject(n *Node, namespace, name string, opts []PodOpt) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec:       corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

// netnsName names a pod's network namespace ("istio-system" shortened).
func netnsName(namespace, name string) string {
	return strings.ReplaceAll(namespace+"-"+name, "istio-system", "is")
}

// attach gives kp its network namespace and addresses.
func (e *Env) attach(kp *Pod, pn *netnstest.Pod) {
	kp.Net, kp.IP = pn, pn.IP.String()
	if pn.IP6 != nil && !pn.IP6.Equal(pn.IP) {
		kp.IP6 = pn.IP6.String()
	}
	e.Link(pn.NS)
}

// runningStatus is the status the kubelet writes once kp runs and is Ready.
func runningStatus(kp *Pod) corev1.PodStatus {
	now := metav1.Now()
	return corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: kp.IP, PodIPs: podIPs(kp), StartTime: &now,
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}},
	}
}

// podIPs are a pod's status.podIPs, primary (IPv4) first.
func podIPs(p *Pod) []corev1.PodIP {
	out := []corev1.PodIP{{IP: p.IP}}
	if p.IP6 != "" {
		out = append(out, corev1.PodIP{IP: p.IP6})
	}
	return out
}

func (e *Env) DeletePod(t testing.TB, p *Pod) {
	t.Helper()
	zero := int64(0)
	if err := e.Client.CoreV1().Pods(p.Obj.Namespace).Delete(ctx(), p.Obj.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	if p.Net != nil {
		p.Net.Delete(t)
	}
}

func (e *Env) Annotation(t testing.TB, p *Pod) string {
	t.Helper()
	obj, err := e.Client.CoreV1().Pods(p.Obj.Namespace).Get(ctx(), p.Obj.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return obj.Annotations[selection.RedirectionAnno]
}

// Members lists the members of the node's IPv4 pod set: the ipset, or
// the set of the agent's nftables table with the nftables backend.
func Members(t testing.TB, n *Node) map[string]bool {
	t.Helper()
	m := map[string]bool{}
	if out, err := netnstest.ExecErr(n.NS, "nft", "-j", "list", "set", "inet", dataplane.NFTTable, "ztunnel-pods-ips"); err == nil {
		var doc struct {
			Nftables []struct {
				Set *struct {
					Elem []json.RawMessage `json:"elem"`
				} `json:"set"`
			} `json:"nftables"`
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			t.Fatalf("nft -j list set: %v", err)
		}
		for _, o := range doc.Nftables {
			if o.Set == nil {
				continue
			}
			for _, e := range o.Set.Elem {
				var ip string
				var withComment struct {
					Elem struct {
						Val string `json:"val"`
					} `json:"elem"`
				}
				if json.Unmarshal(e, &ip) != nil && json.Unmarshal(e, &withComment) == nil {
					ip = withComment.Elem.Val
				}
				m[ip] = true
			}
		}
		return m
	}
	out, err := netnstest.ExecErr(n.NS, "ipset", "list", "ztunnel-pods-ips")
	if err != nil {
		return m
	}
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

// DelMember removes ip from the node's IPv4 pod set behind the agent's
// back (drift), whichever backend holds it.
func DelMember(t testing.TB, n *Node, ip string) {
	t.Helper()
	if _, err := netnstest.ExecErr(n.NS, "nft", "list", "table", "inet", dataplane.NFTTable); err == nil {
		netnstest.Exec(t, n.NS, "nft", "delete", "element", "inet", dataplane.NFTTable, "ztunnel-pods-ips", "{", ip, "}")
		return
	}
	netnstest.Exec(t, n.NS, "ipset", "del", "ztunnel-pods-ips", ip)
}

func HasRoute(t testing.TB, n *Node, ip string) bool {
	t.Helper()
	bits := "/32"
	if strings.Contains(ip, ":") {
		bits = "/128"
	}
	out, _ := netnstest.ExecErr(n.NS, "ip", "route", "show", "table", "100", ip+bits)
	return strings.TrimSpace(out) != ""
}

func Eventually(t testing.TB, timeout time.Duration, f func() error) {
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
type Ztunnel struct {
	Pod         *Pod
	Proc        *netnstest.Proc
	RecordsPath string
}

func (e *Env) StartZtunnel(t testing.TB, n *Node, name string) *Ztunnel {
	t.Helper()
	var cidrs []string
	for _, o := range e.C.Nodes {
		if o.Name != n.Name {
			for _, c := range o.PodCIDRs {
				cidrs = append(cidrs, c.String())
			}
		}
	}
	z := &Ztunnel{}
	z.Pod = e.RunPod(t, n, ZtunnelNS, name, WithLabels("app", "ztunnel"))
	dir := t.TempDir()
	z.RecordsPath = filepath.Join(dir, "records.jsonl")
	ready := filepath.Join(dir, "ready")
	z.Proc = netnstest.Start(t, z.Pod.Net.NS, e.Bins.Ztunnel, "--record-file", z.RecordsPath, "--ready-file", ready, "--hbone-cidrs", strings.Join(cidrs, ","))
	Eventually(t, 10*time.Second, func() error {
		_, err := os.Stat(ready)
		return err
	})
	return z
}

// Records are the connections z accepted so far.
func (z *Ztunnel) Records(t testing.TB) []record.Record {
	out, err := record.Read(z.RecordsPath)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Count is how many connections from client IP to dst z recorded at listener.
func (z *Ztunnel) Count(t testing.TB, listener int, client, dst string) int {
	n := 0
	for _, r := range z.Records(t) {
		if h, _, err := net.SplitHostPort(r.Client); err == nil && r.Listener == listener && h == client && r.OrigDst == dst {
			n++
		}
	}
	return n
}

func Hostport(ip string, port int) string { return net.JoinHostPort(ip, fmt.Sprint(port)) }

// RoundTrip sends bytes from a pod to dst and wants them echoed back.
func RoundTrip(from *Pod, dst string) error {
	p := []byte(strings.Repeat("ambient-redirect e2e ", 500))
	got, err := netnstest.RoundTrip(from.Net.NS, dst, p, 3*time.Second)
	if err != nil {
		return err
	}
	if string(got) != string(p) {
		return fmt.Errorf("echo mismatch: %d bytes back, want %d", len(got), len(p))
	}
	return nil
}

// pairs are the (from, to) address pairs of every family both pods have.
func pairs(from, to *Pod) [][2]string {
	out := [][2]string{{from.IP, to.IP}}
	if from.IP6 != "" && to.IP6 != "" {
		out = append(out, [2]string{from.IP6, to.IP6})
	}
	return out
}

// Captured proves from -> to:echo round-trips and is seen by z at listener,
// in every family both pods have.
func Captured(t testing.TB, z *Ztunnel, listener int, from, to *Pod) error {
	for _, p := range pairs(from, to) {
		src, dst := p[0], Hostport(p[1], EchoPort)
		before := z.Count(t, listener, src, dst)
		if err := RoundTrip(from, dst); err != nil {
			return err
		}
		deadline := time.Now().Add(time.Second)
		for z.Count(t, listener, src, dst) == before {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s -> %s not recorded at %d", src, dst, listener)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// Direct proves from -> to:echo round-trips and no ztunnel of zs saw it, in
// every family both pods have.
func Direct(t testing.TB, from, to *Pod, zs ...*Ztunnel) error {
	for _, p := range pairs(from, to) {
		src, dst := p[0], Hostport(p[1], EchoPort)
		total := func() int {
			n := 0
			for _, z := range zs {
				for _, l := range []int{15001, 15006, 15008} {
					n += z.Count(t, l, src, dst)
				}
			}
			return n
		}
		before := total()
		if err := RoundTrip(from, dst); err != nil {
			return err
		}
		time.Sleep(50 * time.Millisecond)
		if total() != before {
			return fmt.Errorf("%s -> %s was captured", src, dst)
		}
	}
	return nil
}

// RunPodObject creates a pod object for an existing netns pod.
func (e *Env) RunPodObject(t testing.TB, n *Node, namespace, name, ip string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{Name: "c", Image: "x"}}}}
	created, err := e.Client.CoreV1().Pods(namespace).Create(ctx(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
	out, err := e.Client.CoreV1().Pods(namespace).UpdateStatus(ctx(), created, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// LaunchKubeProxy registers n as a Node object (InternalIP, PodCIDR) and
// launches a real kube-proxy in iptables mode in n's netns, with an admin
// kubeconfig, without waiting for its first sync. It is stopped and its
// rules removed (kube-proxy --cleanup) in t.Cleanup.
func (e *Env) LaunchKubeProxy(t testing.TB, n *Node) *cluster.KubeProxy {
	t.Helper()
	return e.LaunchKubeProxyMode(t, n, "iptables")
}

// LaunchKubeProxyMode is LaunchKubeProxy in mode ("iptables" or "nftables").
func (e *Env) LaunchKubeProxyMode(t testing.TB, n *Node, mode string) *cluster.KubeProxy {
	t.Helper()
	e.CP.EnsureNode(t, n.Name, n.IP.String(), n.PodCIDR.String())
	if e.adminKC == "" {
		e.adminKC = e.CP.AdminKubeconfig(e.T) // outlives the subtest that made it
	}
	return e.CP.LaunchKubeProxyMode(t, n.NS, n.Name, e.adminKC, mode)
}

// CreateService creates a ClusterIP Service vip:port (vip inside
// cluster.ServiceClusterIPRange) in namespace and its EndpointSlice with
// the pods' echo servers (EchoPort) as ready endpoints.
func (e *Env) CreateService(t testing.TB, namespace, name, vip string, port int, pods ...*Pod) {
	t.Helper()
	var ips []string
	for _, p := range pods {
		ips = append(ips, p.IP)
	}
	e.CP.CreateClusterIPService(t, namespace, name, vip, port, EchoPort, ips...)
}

// ChainRules is `iptables -t table -S chain` in n's netns (the netns's
// default iptables, which kube-proxy uses too), without the policy line.
func ChainRules(t testing.TB, n *Node, table, chain string) []string {
	t.Helper()
	out := netnstest.Exec(t, n.NS, "iptables", "-w", "-t", table, "-S", chain)
	var rules []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") {
			rules = append(rules, l)
		}
	}
	return rules
}

// IsOurJump reports whether an `iptables -S` rule is one of the agent's
// jumps into its own chains.
func IsOurJump(rule string) bool {
	return strings.Contains(rule, "--comment "+iptables.JumpComment+" ") && strings.Contains(rule, " -j ztunnel-")
}

// JumpPositions maps "table/CHAIN" to the 1-based position of the agent's
// jump in that chain, for every chain of n's default iptables holding one.
func JumpPositions(t testing.TB, n *Node) map[string]int {
	t.Helper()
	out := netnstest.Exec(t, n.NS, "iptables-save")
	pos := map[string]int{}
	count := map[string]int{}
	table := ""
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, "-A "):
			f := strings.Fields(l)
			key := table + "/" + f[1]
			count[key]++
			if _, seen := pos[key]; !seen && IsOurJump(l) {
				pos[key] = count[key]
			}
		}
	}
	return pos
}
