//go:build linux

package realcluster_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/ambient-redirect/ambient-redirect/selection/kube"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/realcluster"
	"github.com/ambient-redirect/ambient-redirect/test/realcluster/app/results"
)

// testDir is the suite's work directory: a run killed half-way leaves its
// state.json there and the next run tears that down first.
const testDir = "/var/tmp/ambient-redirect-realcluster-test"

var (
	c *realcluster.Cluster
	// startErr is why the cluster is not there (tests skip or fail with it).
	startErr string
	// installed is set once TestInstall installed the agent.
	installed bool
	// before are the nodes' conflists as the kubelet's containerd read them
	// before the install.
	before = map[string][]byte{}
)

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 || testing.Short() || !runsClusterTest() {
		startErr = "needs root and no -short"
		os.Exit(m.Run())
	}
	repo, err := filepath.Abs("../..")
	if err != nil {
		panic(err)
	}
	r := realcluster.NewRunner("realcluster", filepath.Join(testDir, "tmp"), os.Stderr)
	// One teardown, whoever gets there first (the end of the tests or an
	// interrupt); the other waits for it to finish before exiting.
	var once sync.Once
	teardown := func() { once.Do(r.RunCleanups) }
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "realcluster: interrupted; tearing the cluster down")
		teardown()
		os.Exit(1)
	}()
	began := time.Now()
	if err := r.Run(func(t testing.TB) {
		c = realcluster.Start(t, realcluster.Options{Dir: testDir, Prefix: "art", Repo: repo, AgentTags: []string{"v1", "v2"},
			// Both kube-proxy modes: the agent (--backend auto) picks its
			// backend from what it finds on each node.
			KubeProxyModes: []string{"iptables", "nftables"}})
		c.InstallZtunnel(t)
	}); err != nil {
		c = nil
		startErr = err.Error()
	}
	fmt.Fprintf(os.Stderr, "realcluster: cluster with ztunnels up in %s\n", time.Since(began).Round(time.Millisecond))
	code := m.Run()
	teardown()
	if r.Failed() && code == 0 {
		code = 1
	}
	os.Exit(code)
}

// clusterTests are the tests that need the cluster, in the order they run.
var clusterTests = []string{"TestInstall", "TestCapture", "TestProbes", "TestLeastPrivilege", "TestUninstall",
	"TestZtunnelRollout", "TestAgentRollout", "TestNodeRestart", "TestSidecarPod"}

// runsClusterTest reports whether -test.run selects one of clusterTests
// (a -run of unit tests only does not start a cluster).
func runsClusterTest() bool {
	f := flag.Lookup("test.run")
	if f == nil || f.Value.String() == "" {
		return true
	}
	re, err := regexp.Compile(strings.Split(f.Value.String(), "/")[0])
	if err != nil {
		return true
	}
	for _, n := range clusterTests {
		if re.MatchString(n) {
			return true
		}
	}
	return false
}

func need(t *testing.T, agent bool) {
	t.Helper()
	if c == nil {
		if startErr == "needs root and no -short" {
			t.Skip(startErr)
		}
		t.Fatalf("no cluster: %s", startErr)
	}
	if agent && !installed {
		t.Fatal("the agent is not installed (TestInstall failed)")
	}
}

func ctx() context.Context { return context.Background() }

// TestInstall applies the overlay of manifests/ with kubectl -k: the agent
// DaemonSet must be Ready on every node within 60 s, its plugin appended to
// the conflist containerd reads, and no other file of the node changed.
func TestInstall(t *testing.T) {
	need(t, false)
	snap := map[string]map[string]string{}
	for _, n := range c.Nodes {
		b, err := os.ReadFile(filepath.Join(n.CNIConfDir, n.ConflistName))
		if err != nil {
			t.Fatal(err)
		}
		before[n.Name] = b
		snap[n.Name] = snapshot(t, n)
	}
	dumps = takeDumps(t)
	began := time.Now()
	c.InstallAgent(t)
	took := c.WaitDaemonSet(t, realcluster.AgentNamespace, realcluster.AgentDaemonSet, 60*time.Second)
	t.Logf("agent DaemonSet Ready on %d nodes %s after kubectl apply -k", len(c.Nodes), took.Round(time.Millisecond))
	if took > 60*time.Second {
		t.Errorf("DaemonSet Ready after %s, want <= 60s", took)
	}
	for _, n := range c.Nodes {
		// The conflist: the original plugins, then ours.
		var err error
		if err = realcluster.Poll(10*time.Second, func() error { return checkConflist(n, before[n.Name]) }); err != nil {
			t.Errorf("%s: %v", n.Name, err)
		}
		after := snapshot(t, n)
		for p, d := range after {
			switch {
			case p == "cni-conf/"+n.ConflistName, p == "cni-conf/ambient-redirect-kubeconfig", p == "cni-bin/ambient-redirect":
				continue
			case snap[n.Name][p] != d:
				t.Errorf("%s: %s changed by the install (%q -> %q)", n.Name, p, snap[n.Name][p], d)
			}
		}
		for p := range snap[n.Name] {
			if _, ok := after[p]; !ok {
				t.Errorf("%s: %s removed by the install", n.Name, p)
			}
		}
		if _, ok := after["cni-bin/ambient-redirect"]; !ok {
			t.Errorf("%s: no plugin binary ambient-redirect (its conflist type) in /opt/cni/bin: %v", n.Name, keys(after))
		}
		if code, body, err := n.AgentDebug("/readyz"); err != nil || code != 200 {
			t.Errorf("%s: agent /readyz: %d %s %v", n.Name, code, body, err)
		}
	}
	installed = !t.Failed()
	_ = began
}

// snapshot maps the files of the node's CNI dirs (as the node sees
// /etc/cni/net.d and /opt/cni/bin) to their digests.
func snapshot(t *testing.T, n *realcluster.Node) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, d := range []string{"cni-conf", "cni-bin"} {
		ents, err := os.ReadDir(filepath.Join(n.Dir, d))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			out[d+"/"+e.Name()] = realcluster.FileDigest(filepath.Join(n.Dir, d, e.Name()))
		}
	}
	return out
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// checkConflist checks that the node's conflist is orig with one plugin
// of type ambient-redirect appended.
func checkConflist(n *realcluster.Node, orig []byte) error {
	b, err := os.ReadFile(filepath.Join(n.CNIConfDir, n.ConflistName))
	if err != nil {
		return err
	}
	var o, cur map[string]any
	if err := json.Unmarshal(orig, &o); err != nil {
		return err
	}
	if err := json.Unmarshal(b, &cur); err != nil {
		return fmt.Errorf("conflist is not JSON: %v\n%s", err, b)
	}
	op, _ := o["plugins"].([]any)
	cp, _ := cur["plugins"].([]any)
	if len(cp) != len(op)+1 {
		return fmt.Errorf("conflist has %d plugins, want %d + ours:\n%s", len(cp), len(op), b)
	}
	last, _ := cp[len(cp)-1].(map[string]any)
	if last["type"] != "ambient-redirect" {
		return fmt.Errorf("last plugin is %v, want type ambient-redirect:\n%s", last["type"], b)
	}
	ob, _ := json.Marshal(op)
	cb, _ := json.Marshal(cp[:len(op)])
	if string(ob) != string(cb) {
		return fmt.Errorf("the primary plugins changed:\n%s", b)
	}
	return nil
}

// Namespaces of the workload tests.
const (
	ambientNS = "ambient"
	plainNS   = "plain"
)

// appResults reads a test app's /results from its node's netns.
func appResults(t *testing.T, p *corev1.Pod) appRes {
	t.Helper()
	n := c.Node(p.Spec.NodeName)
	code, body, err := n.HTTPGet(p.Status.PodIP, realcluster.AppHTTPPort, "/results")
	if err != nil || code != 200 {
		t.Fatalf("%s/%s /results: %d %s %v", p.Namespace, p.Name, code, body, err)
	}
	var r appRes
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

type (
	dial   = results.Dial
	appRes = results.Results
)

func hostOf(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

// findRecord returns the record of a node's ztunnels with this listener,
// client and original destination.
func findRecord(recs []realcluster.ZRecord, listener int, client, dst string) *realcluster.ZRecord {
	for i, r := range recs {
		if r.Listener == listener && (client == "" || r.Client == client || hostOf(r.Client) == client) && r.OrigDst == dst {
			return &recs[i]
		}
	}
	return nil
}

// TestCapture: an ambient Deployment with a replica per node; each pod's
// first connection, made the moment its container starts, to a server on
// its node, on the other node and through a ClusterIP Service, is captured
// by its node's ztunnel (VIP as original destination); a non-ambient pod's
// connection to an ambient one is captured inbound (15006) by the server's
// ztunnel; a non-ambient pod's connection to a non-ambient one goes direct.
func TestCapture(t *testing.T) {
	need(t, true)
	c.Apply(t, realcluster.Namespace(ambientNS, true)+realcluster.Namespace(plainNS, false)+
		realcluster.AppDeployment(ambientNS, "server", len(c.Nodes))+realcluster.Service(ambientNS, "server")+
		realcluster.AppDeployment(plainNS, "server", len(c.Nodes)))
	servers := c.WaitReady(t, ambientNS, "server", len(c.Nodes))
	plainServers := c.WaitReady(t, plainNS, "server", len(c.Nodes))
	svc, err := c.Client.CoreV1().Services(ambientNS).Get(ctx(), "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := net.JoinHostPort(svc.Spec.ClusterIP, fmt.Sprint(realcluster.AppEchoPort))
	echo := func(p corev1.Pod) string {
		return net.JoinHostPort(p.Status.PodIP, fmt.Sprint(realcluster.AppEchoPort))
	}
	var ambientTargets, plainTargets []string
	for _, s := range servers {
		ambientTargets = append(ambientTargets, echo(s))
	}
	for _, s := range plainServers {
		plainTargets = append(plainTargets, echo(s))
	}
	created := time.Now()
	c.Apply(t, realcluster.AppDeployment(ambientNS, "client", len(c.Nodes), "--dial-at-start", strings.Join(append(append([]string{}, ambientTargets...), vip), ","))+
		realcluster.AppDeployment(plainNS, "client", len(c.Nodes), "--dial-at-start", strings.Join(append(append([]string{}, ambientTargets...), plainTargets...), ",")))
	clients := c.WaitReady(t, ambientNS, "client", len(c.Nodes))
	plainClients := c.WaitReady(t, plainNS, "client", len(c.Nodes))

	recs := map[string][]realcluster.ZRecord{}
	for _, n := range c.Nodes {
		recs[n.Name] = c.ZtunnelRecords(t, n)
	}
	var firstCaptured []time.Duration
	for _, p := range clients {
		res := appResults(t, &p)
		if len(res.Start) != len(ambientTargets)+1 {
			t.Fatalf("%s: %d start dials, want %d", p.Name, len(res.Start), len(ambientTargets)+1)
		}
		for i, d := range res.Start {
			kind := "same node"
			switch {
			case d.Target == vip:
				kind = "ClusterIP " + vip
			case c.NodeOf(hostOf(d.Target)).Name != p.Spec.NodeName:
				kind = "cross node"
			}
			if d.Err != "" {
				t.Errorf("%s on %s -> %s (%s): first connection failed: %s", p.Name, p.Spec.NodeName, d.Target, kind, d.Err)
				continue
			}
			r := findRecord(recs[p.Spec.NodeName], 15001, d.Local, d.Target)
			if r == nil {
				t.Errorf("%s on %s -> %s (%s): first connection (from %s) not recorded by its node's ztunnel on 15001", p.Name, p.Spec.NodeName, d.Target, kind, d.Local)
				continue
			}
			if hostOf(d.Peer) != p.Status.PodIP || d.Peer == d.Local {
				t.Errorf("%s -> %s (%s): server saw %s, want the pod IP %s via ztunnel (not the pod's own socket %s)", p.Name, d.Target, kind, d.Peer, p.Status.PodIP, d.Local)
			}
			if i == 0 {
				if at, err := time.Parse(time.RFC3339Nano, r.Time); err == nil {
					firstCaptured = append(firstCaptured, at.Sub(p.CreationTimestamp.Time))
				}
			}
			t.Logf("%s on %s -> %s (%s): captured by %s (listener %d, orig dst %s); server saw %s", p.Name, p.Spec.NodeName, d.Target, kind, r.Pod, r.Listener, r.OrigDst, d.Peer)
		}
	}
	t.Logf("pod created -> first connection captured: %v (Deployment applied %s before the last pod was Ready)", firstCaptured, time.Since(created).Round(time.Millisecond))
	for _, p := range plainClients {
		res := appResults(t, &p)
		for _, d := range res.Start {
			if d.Err != "" {
				t.Errorf("%s -> %s: %s", p.Name, d.Target, d.Err)
				continue
			}
			dst := c.NodeOf(hostOf(d.Target))
			ambientDst := false
			for _, a := range ambientTargets {
				ambientDst = ambientDst || a == d.Target
			}
			if ambientDst {
				r := findRecord(recs[dst.Name], 15006, hostOf(d.Local), d.Target)
				if r == nil {
					t.Errorf("non-ambient %s -> ambient %s: not recorded inbound (15006) by %s's ztunnel", p.Name, d.Target, dst.Name)
				} else {
					t.Logf("non-ambient %s -> ambient %s: captured inbound by %s (listener %d)", p.Name, d.Target, r.Pod, r.Listener)
				}
				continue
			}
			if d.Peer != d.Local {
				t.Errorf("non-ambient %s -> non-ambient %s: server saw %s, want the client's own socket %s (direct)", p.Name, d.Target, d.Peer, d.Local)
			}
			for _, n := range c.Nodes {
				for _, r := range recs[n.Name] {
					if r.Client == d.Local || r.OrigDst == d.Target {
						t.Errorf("non-ambient %s -> non-ambient %s: recorded by %s's ztunnel: %+v", p.Name, d.Target, n.Name, r)
					}
				}
			}
		}
	}
	// Each agent picked the backend that keeps VIPs under its node's
	// kube-proxy: nftables beside kube-proxy's nftables mode.
	for _, n := range c.Nodes {
		code, body, err := n.AgentDebug("/debug/state")
		var st struct {
			Backend map[string]any `json:"backend"`
		}
		if err == nil {
			err = json.Unmarshal(body, &st)
		}
		want := map[string]string{"iptables": "iptables", "nftables": "nftables"}[n.KubeProxyMode]
		if err != nil || code != 200 || st.Backend["name"] != want {
			t.Errorf("%s (kube-proxy %s): agent backend %v (%v), want %s; %d %v", n.Name, n.KubeProxyMode, st.Backend["name"], st.Backend["reason"], want, code, err)
		} else {
			t.Logf("%s (kube-proxy %s): backend %v: %v", n.Name, n.KubeProxyMode, st.Backend["name"], st.Backend["reason"])
		}
	}
	// Every ambient pod is enrolled and annotated by its node's agent.
	for _, p := range append(append([]corev1.Pod{}, servers...), clients...) {
		got, err := c.Client.CoreV1().Pods(p.Namespace).Get(ctx(), p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Annotations["ambient.istio.io/redirection"] != "enabled" {
			t.Errorf("%s: annotation %q, want enabled", p.Name, got.Annotations["ambient.istio.io/redirection"])
		}
	}
}

// TestProbes: the kubelet's HTTP liveness and readiness probes of ambient
// pods pass and are not captured; the exec startup probe works.
func TestProbes(t *testing.T) {
	need(t, true)
	servers := c.WaitReady(t, ambientNS, "server", len(c.Nodes))
	// Several liveness periods (2 s, 2 failures restart).
	time.Sleep(6 * time.Second)
	for _, p := range servers {
		got, err := c.Client.CoreV1().Pods(p.Namespace).Get(ctx(), p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !kube.PodReady(got) {
			t.Errorf("%s: not Ready", p.Name)
		}
		for _, cs := range got.Status.ContainerStatuses {
			if cs.RestartCount != 0 {
				t.Errorf("%s: container %s restarted %d times (liveness probe failed?)", p.Name, cs.Name, cs.RestartCount)
			}
			if cs.Started == nil || !*cs.Started {
				t.Errorf("%s: container %s not started (exec startup probe)", p.Name, cs.Name)
			}
		}
		probeDst := net.JoinHostPort(p.Status.PodIP, fmt.Sprint(realcluster.AppHTTPPort))
		for _, n := range c.Nodes {
			for _, r := range c.ZtunnelRecords(t, n) {
				if r.OrigDst == probeDst {
					t.Errorf("a connection to %s (the probes' port) was captured by %s: %+v", probeDst, r.Pod, r)
				}
			}
		}
	}
	// The exec probe really runs in the pod: kubectl exec the same command.
	if out, err := c.Kubectl("exec", "-n", ambientNS, servers[0].Name, "--", "/app", "probe"); err != nil {
		t.Errorf("kubectl exec /app probe: %v %s", err, out)
	}
}

// TestLeastPrivilege: with the agent pod's own kubelet-projected token, a
// patch of a pod on the other node is denied by the admission policy and
// one of its own node's pod is allowed.
func TestLeastPrivilege(t *testing.T) {
	need(t, true)
	agents := c.PodsOf(t, realcluster.AgentNamespace, "app.kubernetes.io/name=ambient-redirect")
	if len(agents) != len(c.Nodes) {
		t.Fatalf("%d agent pods", len(agents))
	}
	servers := c.WaitReady(t, ambientNS, "server", len(c.Nodes))
	agent := agents[0]
	n := c.Node(agent.Spec.NodeName)
	matches, _ := filepath.Glob(n.NodePath(filepath.Join(n.Dir, "kubelet", "pods", string(agent.UID), "volumes", "kubernetes.io~projected", "*", "token")))
	if len(matches) != 1 {
		t.Fatalf("the agent pod's projected token: found %v", matches)
	}
	token, err := os.ReadFile(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	who := c.CP.WhoAmI(t, string(token))
	if got := who.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != n.Name {
		t.Fatalf("the projected token's node claim is %v, want [%s] (user %s)", got, n.Name, who.Username)
	}
	cs, err := kubernetes.NewForConfig(c.CP.TokenConfig(string(token)))
	if err != nil {
		t.Fatal(err)
	}
	patch := []byte(`{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}}`)
	for _, p := range servers {
		_, err := cs.CoreV1().Pods(p.Namespace).Patch(ctx(), p.Name, types.MergePatchType, patch, metav1.PatchOptions{})
		if p.Spec.NodeName == n.Name {
			if err != nil {
				t.Errorf("patch of %s on the agent's own node %s denied: %v", p.Name, n.Name, err)
			}
			continue
		}
		if !(apierrors.IsForbidden(err) || apierrors.IsInvalid(err)) || !strings.Contains(err.Error(), "ambient-redirect-node-scoped") {
			t.Errorf("patch of %s on node %s with %s's token: %v, want denied by ambient-redirect-node-scoped", p.Name, p.Spec.NodeName, n.Name, err)
		} else {
			t.Logf("denied as expected: %v", err)
		}
	}
}

// dumps are the network state of each node's netns and ztunnel pod netns
// before the agent was installed.
var dumps = map[string]string{}

// takeDumps returns the dumps of every node netns and ztunnel pod netns,
// keyed by node name and "ztunnel/<pod>".
func takeDumps(t *testing.T) map[string]string {
	t.Helper()
	var out map[string]string
	// A fresh veth's IPv6 link-local address is "tentative" for a moment
	// (duplicate address detection); dump once it has settled.
	_ = realcluster.Poll(10*time.Second, func() error {
		out = dumpAll(t)
		for k, d := range out {
			if strings.Contains(d, " tentative") {
				return fmt.Errorf("%s: addresses still tentative", k)
			}
		}
		return nil
	})
	return out
}

// withoutKubeProxyTables drops kube-proxy's nftables tables from a dump:
// in nftables mode it keeps a deleted Service's chains, flushed, for a
// while, which is kube-proxy's state, not ours.
func withoutKubeProxyTables(dump string) string {
	var out []string
	skip := false
	for _, l := range strings.Split(dump, "\n") {
		switch {
		case l == "table ip kube-proxy {" || l == "table ip6 kube-proxy {":
			skip = true
		case skip && l == "}":
			skip = false
		case !skip:
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func dumpAll(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, n := range c.Nodes {
		out[n.Name] = withoutKubeProxyTables(netnstest.DumpPath(t, n.NodeNetnsPath()))
	}
	for _, z := range c.PodsOf(t, realcluster.ZtunnelNamespace, "app=ztunnel") {
		n := c.Node(z.Spec.NodeName)
		p, err := n.PodNetns(&z)
		if err != nil {
			t.Fatal(err)
		}
		out["ztunnel/"+z.Name] = netnstest.DumpPath(t, p)
	}
	return out
}

// TestUninstall: `kubectl delete -k` of the overlay, then the documented
// uninstall step (manifests/uninstall) leave no residue: every node's and
// ztunnel's network state as before the install (the workloads deleted
// first), no plugin binary or kubeconfig, and the conflist byte-identical.
func TestUninstall(t *testing.T) {
	need(t, true)
	if len(dumps) == 0 {
		t.Fatal("no dumps from before the install")
	}
	for _, ns := range []string{ambientNS, plainNS} {
		if _, err := c.Kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=true", "--timeout=120s"); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := c.Kubectl("delete", "-k", c.Opts.Repo+"/"+realcluster.Overlay, "--wait=true", "--timeout=120s"); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s", strings.TrimSpace(out))
	}
	installed = false
	if err := realcluster.Poll(60*time.Second, func() error {
		if n := len(c.PodsOf(t, realcluster.AgentNamespace, "app.kubernetes.io/name=ambient-redirect")); n > 0 {
			return fmt.Errorf("%d agent pods left", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// The documented uninstall step (README, "Uninstall").
	un := c.Opts.Repo + "/test/realcluster/overlay-uninstall"
	if out, err := c.Kubectl("apply", "-k", un); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s", strings.TrimSpace(out))
	}
	if out, err := c.Kubectl("-n", "kube-system", "rollout", "status", "ds/ambient-redirect-uninstall", "--timeout=5m"); err != nil {
		c.DumpPods(t, "kube-system")
		t.Fatal(err)
	} else {
		t.Logf("%s", strings.TrimSpace(out))
	}
	if _, err := c.Kubectl("delete", "-k", un, "--wait=true", "--timeout=120s"); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		got, err := os.ReadFile(filepath.Join(n.CNIConfDir, n.ConflistName))
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(before[n.Name]) {
			t.Errorf("%s: conflist not byte-identical to before the install:\n%s\n--- before ---\n%s", n.Name, got, before[n.Name])
		}
		for _, f := range []string{filepath.Join(n.CNIBinDir, "ambient-redirect"), filepath.Join(n.CNIConfDir, "ambient-redirect-kubeconfig")} {
			if _, err := os.Stat(f); err == nil {
				t.Errorf("%s: %s left behind", n.Name, f)
			}
		}
	}
	var after map[string]string
	// Pods of the deleted namespaces may still be releasing their veths.
	err := realcluster.Poll(30*time.Second, func() error {
		after = takeDumps(t)
		for k, b := range dumps {
			if after[k] != b {
				return fmt.Errorf("%s differs", k)
			}
		}
		return nil
	})
	if err != nil {
		for k, b := range dumps {
			if a, ok := after[k]; !ok {
				t.Errorf("%s: gone (it must stay for the comparison)", k)
			} else if a != b {
				t.Errorf("%s: residue after uninstall:\n%s", k, netnstest.LineDiff(b, a))
			}
		}
	}
}
