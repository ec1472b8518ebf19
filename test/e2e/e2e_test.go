package e2e

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestAgent runs one agent per node on two nodes and walks the behaviours
// of the controller in order; each step leaves the cluster as it found it.
func TestAgent(t *testing.T) {
	// Agents and ztunnels outlive the subtest that starts them: they take T.
	T := t
	e := harness.New(t, 2, bins)
	n1, n2 := e.Nodes[0], e.Nodes[1]
	a1 := e.RunPod(t, n1, harness.AmbientNS, "a1")
	a2 := e.RunPod(t, n1, harness.AmbientNS, "a2")
	b1 := e.RunPod(t, n2, harness.AmbientNS, "b1")
	p1 := e.RunPod(t, n1, harness.PlainNS, "p1")
	for _, n := range e.Nodes {
		e.StartAgent(t, n)
	}
	zt1, zt2 := n1.ZT, n2.ZT

	t.Run("ambient namespace pods are captured and annotated", func(t *testing.T) {
		harness.Eventually(t, 5*time.Second, func() error {
			if a := e.Annotation(t, a1); a != selection.RedirectionEnabled {
				return fmt.Errorf("a1 annotation %q", a)
			}
			return harness.Captured(t, zt1, 15001, a1, a2)
		})
		if err := harness.Captured(t, zt1, 15006, p1, a2); err != nil {
			t.Fatal(err)
		}
		st := e.State(t, n1)
		if !st.Converged || st.Enrolled != 2 || st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "ztunnel-"+n1.Name) {
			t.Fatalf("debug state: converged=%v enrolled=%d ztunnel=%+v diff=%v", st.Converged, st.Enrolled, st.Ztunnel, st.Diff)
		}
	})

	t.Run("two nodes: each agent programs only its own pods; cross-node is captured on both sides", func(t *testing.T) {
		m1, m2 := harness.Members(t, n1), harness.Members(t, n2)
		if !m1[a1.IP] || !m1[a2.IP] || m1[b1.IP] || len(m1) != 2 {
			t.Fatalf("node1 members %v", m1)
		}
		if !m2[b1.IP] || len(m2) != 1 {
			t.Fatalf("node2 members %v", m2)
		}
		dst := harness.Hostport(b1.IP, harness.EchoPort)
		hbone := func() int {
			n := 0
			for _, r := range zt2.Records(t) {
				if r.Listener == 15008 && r.Target == dst && strings.HasPrefix(r.HeaderClient, a1.IP+":") && r.DialError == "" {
					n++
				}
			}
			return n
		}
		before := hbone()
		if err := harness.Captured(t, zt1, 15001, a1, b1); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, time.Second, func() error {
			if hbone() == before {
				return fmt.Errorf("node2 ztunnel did not deliver the HBONE leg: %+v", zt2.Records(t))
			}
			return nil
		})
	})

	t.Run("opt-outs, harness.HostNetwork, sidecar and kube-system are never enrolled", func(t *testing.T) {
		pods := []*harness.Pod{
			e.RunPod(t, n1, harness.AmbientNS, "optout-label", harness.WithLabels(selection.DataplaneModeLabel, selection.DataplaneModeNone)),
			e.RunPod(t, n1, harness.AmbientNS, "optout-anno", harness.WithAnnotations(selection.RedirectionAnno, selection.RedirectionDisabled)),
			e.RunPod(t, n1, harness.AmbientNS, "sidecar", harness.WithAnnotations(selection.SidecarStatusAnno, `{"containers":["istio-proxy"]}`)),
			e.RunPod(t, n1, harness.AmbientNS, "hostnet", harness.HostNetwork),
			e.RunPod(t, n1, "kube-system", "sys", harness.WithLabels(selection.DataplaneModeLabel, selection.DataplaneModeAmbient)),
		}
		probe := e.RunPod(t, n1, harness.AmbientNS, "probe") // an enrolled pod proves the agent saw the batch
		harness.Eventually(t, 5*time.Second, func() error {
			if !harness.Members(t, n1)[probe.IP] {
				return fmt.Errorf("probe pod not enrolled yet")
			}
			return nil
		})
		m := harness.Members(t, n1)
		for _, p := range pods {
			if p.Obj.Spec.HostNetwork {
				if m[p.IP] {
					t.Errorf("harness.HostNetwork pod's (node) IP enrolled")
				}
			} else if m[p.IP] || harness.HasRoute(t, n1, p.IP) {
				t.Errorf("%s enrolled", p.Obj.Name)
			}
			if a := e.Annotation(t, p); a == selection.RedirectionEnabled {
				t.Errorf("%s annotated enabled", p.Obj.Name)
			}
		}
		st := e.State(t, n1)
		reasons := map[string]string{}
		for _, ps := range st.Pods {
			reasons[ps.Name] = ps.Reason
		}
		for name, want := range map[string]string{"optout-label": selection.ReasonOptOutLabel, "optout-anno": selection.ReasonOptOutAnnotation,
			// A sidecar pod is never ambient: its rules are ours, in its
			// own netns (TestSidecarPodCapturedInItsNetns).
			"sidecar": selection.ReasonSidecarCapture, "hostnet": selection.ReasonHostNetwork, "sys": selection.ReasonExcludedNamespace} {
			if reasons[name] != want {
				t.Errorf("%s: reason %q, want %q", name, reasons[name], want)
			}
		}
		for _, p := range append(pods, probe) {
			e.DeletePod(t, p)
		}
	})

	t.Run("deleted pod's member and route go; its IP reused by a plain pod is not captured", func(t *testing.T) {
		d := e.RunPod(t, n1, harness.AmbientNS, "doomed")
		harness.Eventually(t, 5*time.Second, func() error {
			if !harness.Members(t, n1)[d.IP] || !harness.HasRoute(t, n1, d.IP) {
				return fmt.Errorf("not programmed")
			}
			return nil
		})
		ip := d.Net.IP
		e.DeletePod(t, d)
		harness.Eventually(t, 5*time.Second, func() error {
			if harness.Members(t, n1)[d.IP] || harness.HasRoute(t, n1, d.IP) {
				return fmt.Errorf("member or route of a deleted pod remains")
			}
			return nil
		})
		reuse := &harness.Pod{Node: n1}
		reuse.Net = n1.AddPod(t, "plain-reuse", netnstest.WithIP(ip))
		reuse.IP = ip.String()
		e.Link(reuse.Net.NS)
		obj := e.RunPodObject(t, n1, harness.PlainNS, "reuse", reuse.IP)
		reuse.Obj = obj
		netnstest.EchoServer(t, reuse.Net.NS, harness.Hostport(reuse.IP, harness.EchoPort))
		time.Sleep(300 * time.Millisecond)
		if harness.Members(t, n1)[reuse.IP] {
			t.Fatal("reused IP enrolled")
		}
		if err := harness.Direct(t, p1, reuse, zt1); err != nil {
			t.Fatal(err)
		}
		e.DeletePod(t, reuse)
	})

	t.Run("a pod labelled app=ztunnel elsewhere changes nothing", func(t *testing.T) {
		before := e.KernelWrites(t, n1)
		fake := e.RunPod(t, n1, "other", "ztunnel-impostor", harness.WithLabels("app", "ztunnel"))
		time.Sleep(500 * time.Millisecond)
		if st := e.State(t, n1); st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "ztunnel-"+n1.Name) {
			t.Fatalf("ztunnel changed to %+v", st.Ztunnel)
		}
		if after := e.KernelWrites(t, n1); after != before {
			t.Fatalf("impostor caused %d kernel writes", after-before)
		}
		if err := harness.Captured(t, zt1, 15001, a1, a2); err != nil {
			t.Fatal(err)
		}
		e.DeletePod(t, fake)
	})

	t.Run("drift is repaired within the resync period", func(t *testing.T) {
		harness.DelMember(t, n1, a2.IP)
		netnstest.Exec(t, n1.NS, "ip", "route", "del", a1.IP+"/32", "table", "100")
		netnstest.Exec(t, n1.NS, "ip", "rule", "del", "pref", "101")
		if fmt.Sprint(e.State(t, n1).Backend["name"]) == "nftables" {
			netnstest.Exec(t, n1.NS, "nft", "flush", "chain", "inet", dataplane.NFTTable, "prerouting-ip")
		} else {
			netnstest.Exec(t, n1.NS, "iptables", "-t", "mangle", "-F", "ztunnel-PREROUTING")
		}
		harness.Eventually(t, 4*time.Second, func() error {
			st := e.State(t, n1)
			if !st.Converged {
				return fmt.Errorf("not converged: %v", st.Diff)
			}
			return harness.Captured(t, zt1, 15001, a1, a2)
		})
	})

	t.Run("removing the namespace label releases pods and the annotation", func(t *testing.T) {
		e.LabelNamespace(t, harness.AmbientNS, false)
		harness.Eventually(t, 5*time.Second, func() error {
			if len(harness.Members(t, n1)) != 0 {
				return fmt.Errorf("members remain: %v", harness.Members(t, n1))
			}
			if a := e.Annotation(t, a1); a != "" {
				return fmt.Errorf("annotation %q remains", a)
			}
			return harness.Direct(t, a1, a2, zt1)
		})
		e.LabelNamespace(t, harness.AmbientNS, true)
		harness.Eventually(t, 5*time.Second, func() error { return harness.Captured(t, zt1, 15001, a1, a2) })
	})

	t.Run("agent restart under traffic: connection survives, zero kernel writes", func(t *testing.T) {
		c, err := netnstest.Dial(a1.Net.NS, "tcp", harness.Hostport(a2.IP, harness.EchoPort), 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ping := func() error {
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := c.Write([]byte("ping")); err != nil {
				return err
			}
			b := make([]byte, 4)
			if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
				return fmt.Errorf("echo %q %v", b, err)
			}
			return nil
		}
		if err := ping(); err != nil {
			t.Fatal(err)
		}
		e.StopAgent(n1)
		if !harness.Members(t, n1)[a1.IP] {
			t.Fatal("SIGTERM removed state")
		}
		if err := ping(); err != nil {
			t.Fatalf("connection broke while the agent was down: %v", err)
		}
		e.StartAgent(T, n1)
		if err := ping(); err != nil {
			t.Fatalf("connection broke across the restart: %v", err)
		}
		if w := e.KernelWrites(t, n1); w != 0 {
			t.Fatalf("restarted agent made %d kernel writes: %+v", w, e.State(t, n1).LastSync)
		}
		if !e.State(t, n1).Converged {
			t.Fatal("not converged after restart")
		}
	})

	t.Run("apiserver outage: no kernel writes meanwhile, converged within 5s of its return", func(t *testing.T) {
		before := e.KernelWrites(t, n1)
		e.CP.StopAPIServer(t)
		time.Sleep(30 * time.Second)
		if w := e.KernelWrites(t, n1); w != before {
			t.Fatalf("%d kernel writes during the outage", w-before)
		}
		if err := harness.Captured(t, zt1, 15001, a1, a2); err != nil {
			t.Fatalf("capture stopped during the outage: %v", err)
		}
		e.CP.StartAPIServer(t)
		back := time.Now()
		late := e.RunPod(t, n1, harness.AmbientNS, "late")
		harness.Eventually(t, 5*time.Second, func() error {
			if !harness.Members(t, n1)[late.IP] || !e.State(t, n1).Converged {
				return fmt.Errorf("new pod not programmed %s after the apiserver returned", time.Since(back))
			}
			return nil
		})
		e.DeletePod(t, late)
	})

	t.Run("ztunnel restart with a new IP and netns: fail closed in the gap, new ztunnel within 1s", func(t *testing.T) {
		old := zt1
		e.DeletePod(t, old.Pod)
		old.Proc.Stop()
		harness.Eventually(t, 3*time.Second, func() error {
			start := time.Now()
			c, err := netnstest.Dial(a1.Net.NS, "tcp", harness.Hostport(a2.IP, harness.EchoPort), 2*time.Second)
			if err == nil {
				c.Close()
				return fmt.Errorf("connected with no ztunnel (fail closed)")
			}
			if time.Since(start) > time.Second {
				return fmt.Errorf("connect took %s to fail: %v\n%s", time.Since(start), err, n1.Agent.Log())
			}
			return nil
		})
		nz := e.StartZtunnel(T, n1, "ztunnel-"+n1.Name+"-v2")
		ready := time.Now()
		var took time.Duration
		harness.Eventually(t, 3*time.Second, func() error {
			if err := harness.Captured(t, nz, 15001, a1, a2); err != nil {
				return err
			}
			took = time.Since(ready)
			return nil
		})
		if took > time.Second {
			t.Fatalf("new ztunnel captured after %s (ready at %s), want <= 1s\n%s", took, ready.Format(time.RFC3339Nano), n1.Agent.Log())
		}
		t.Logf("switchover: first connection captured by the new ztunnel %s after it was Ready", took)
		n1.ZT, zt1 = nz, nz
	})

	t.Run("two Ready ztunnels: the newest wins", func(t *testing.T) {
		time.Sleep(1100 * time.Millisecond) // creation timestamps have second resolution
		surge := e.StartZtunnel(T, n1, "ztunnel-"+n1.Name+"-surge")
		harness.Eventually(t, 3*time.Second, func() error { return harness.Captured(t, surge, 15001, a1, a2) })
		// The status is recorded just after the kernel is programmed.
		harness.Eventually(t, time.Second, func() error {
			if st := e.State(t, n1); st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "-surge") {
				return fmt.Errorf("active ztunnel %+v", st.Ztunnel)
			}
			return nil
		})
		e.DeletePod(t, zt1.Pod)
		zt1.Proc.Stop()
		n1.ZT, zt1 = surge, surge
		harness.Eventually(t, 3*time.Second, func() error { return harness.Captured(t, zt1, 15001, a1, a2) })
	})
}

// TestCleanupCommand proves `ambient-redirect cleanup`, given the agent's own
// argument list, leaves no residue in the kernel and removes the redirection
// annotation; without a reachable API server it still cleans the kernel.
func TestCleanupCommand(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	a1 := e.RunPod(t, n, harness.AmbientNS, "a1")
	a2 := e.RunPod(t, n, harness.AmbientNS, "a2")
	optout := e.RunPod(t, n, harness.AmbientNS, "optout", harness.WithAnnotations(selection.RedirectionAnno, selection.RedirectionDisabled))
	nodeBefore, ztBefore := netnstest.Dump(t, n.NS), netnstest.Dump(t, n.ZT.Pod.Net.NS)
	// LaunchAgent's arguments, as a DaemonSet and an uninstall Job would share them.
	args := func(kubeconfig string) []string {
		return []string{"--node-name", n.Name, "--kubeconfig", kubeconfig, "--netns-dir", e.NSDir,
			"--resync-period", "2s", "--debug-addr", harness.DebugAddr, "--fail-mode", "closed", "--tunnel", "auto",
			"--iptables-mode", "auto", "--ztunnel-namespace", harness.ZtunnelNS, "--kube-api-qps", "20", "--log-level", "info"}
	}
	runAgent := func(t *testing.T) {
		e.StartAgent(t, n)
		harness.Eventually(t, 5*time.Second, func() error {
			for _, p := range []*harness.Pod{a1, a2} {
				if a := e.Annotation(t, p); a != selection.RedirectionEnabled {
					return fmt.Errorf("%s annotation %q", p.Obj.Name, a)
				}
			}
			return harness.Captured(t, n.ZT, 15001, a1, a2)
		})
		e.StopAgent(n)
	}
	noResidue := func(t *testing.T) {
		if after := netnstest.Dump(t, n.NS); after != nodeBefore {
			t.Fatalf("node residue:\n%s", netnstest.LineDiff(nodeBefore, after))
		}
		if after := netnstest.Dump(t, n.ZT.Pod.Net.NS); after != ztBefore {
			t.Fatalf("ztunnel netns residue:\n%s", netnstest.LineDiff(ztBefore, after))
		}
		if err := harness.Direct(t, a1, a2, n.ZT); err != nil {
			t.Fatal(err)
		}
	}
	annotations := func(t *testing.T) map[string]string {
		pods, err := e.Client.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, p := range pods.Items {
			if v, ok := p.Annotations[selection.RedirectionAnno]; ok {
				out[p.Name] = v
			}
		}
		return out
	}

	t.Run("with run's arguments: kernel clean, annotations removed, opt-out kept", func(t *testing.T) {
		runAgent(t)
		stdout, stderr := cleanup(t, n, args(e.KC)...)
		if !strings.Contains(stdout, "cleanup done") || !strings.Contains(stdout, "removed the redirection annotation from 2 pods") || strings.Contains(stderr, "warning") {
			t.Fatalf("cleanup stdout: %s\nstderr: %s", stdout, stderr)
		}
		noResidue(t)
		if got := annotations(t); len(got) != 1 || got[optout.Obj.Name] != selection.RedirectionDisabled {
			t.Fatalf("annotations left on the node's pods: %v", got)
		}
	})

	t.Run("unreachable API server: kernel clean, annotations left with a warning", func(t *testing.T) {
		runAgent(t)
		cfg, err := clientcmd.LoadFromFile(e.KC)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cfg.Clusters {
			c.Server = "https://127.0.0.1:1" // nothing listens there
		}
		kc := filepath.Join(t.TempDir(), "kubeconfig")
		if err := clientcmd.WriteToFile(*cfg, kc); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		stdout, stderr := cleanup(t, n, args(kc)...)
		if !strings.Contains(stdout, "cleanup done") || !strings.Contains(stderr, "warning") || !strings.Contains(stderr, "annotations were left") {
			t.Fatalf("cleanup stdout: %s\nstderr: %s", stdout, stderr)
		}
		if d := time.Since(start); d > 40*time.Second {
			t.Errorf("cleanup took %s", d)
		}
		noResidue(t)
		if got := annotations(t); got[a1.Obj.Name] != selection.RedirectionEnabled || got[a2.Obj.Name] != selection.RedirectionEnabled {
			t.Fatalf("annotations: %v", got)
		}
	})
}

// cleanup runs `ambient-redirect cleanup args...` in n's netns, wants exit
// code 0 and returns its stdout and stderr.
func cleanup(t *testing.T, n *harness.Node, args ...string) (stdout, stderr string) {
	t.Helper()
	var out, errb strings.Builder
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.NS, bins.Agent, "cleanup"}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("cleanup: %v\nstdout: %s\nstderr: %s", err, out.String(), errb.String())
	}
	t.Logf("cleanup stdout: %s\nstderr: %s", out.String(), errb.String())
	return out.String(), errb.String()
}

// TestCleanupCommandOnEachNode: the uninstall Job runs cleanup with the
// DaemonSet's arguments on every node; each run cleans its own node only
// (kernel and annotations), the other node keeps capturing until its turn.
func TestCleanupCommandOnEachNode(t *testing.T) {
	e := harness.New(t, 2, bins)
	type nodePods struct {
		n      *harness.Node
		a1, a2 *harness.Pod
		before map[string]string // netns -> dump before the agent
	}
	var nodes []*nodePods
	for _, n := range e.Nodes {
		np := &nodePods{n: n, a1: e.RunPod(t, n, harness.AmbientNS, "a1-"+n.Name), a2: e.RunPod(t, n, harness.AmbientNS, "a2-"+n.Name)}
		np.before = map[string]string{n.NS: netnstest.Dump(t, n.NS), n.ZT.Pod.Net.NS: netnstest.Dump(t, n.ZT.Pod.Net.NS)}
		nodes = append(nodes, np)
	}
	enabled := func(np *nodePods) int {
		c := 0
		for _, p := range []*harness.Pod{np.a1, np.a2} {
			if e.Annotation(t, p) == selection.RedirectionEnabled {
				c++
			}
		}
		return c
	}
	for _, np := range nodes {
		e.StartAgent(t, np.n)
		harness.Eventually(t, 5*time.Second, func() error {
			if c := enabled(np); c != 2 {
				return fmt.Errorf("%s: %d pods annotated", np.n.Name, c)
			}
			return harness.Captured(t, np.n.ZT, 15001, np.a1, np.a2)
		})
	}
	for i, np := range nodes {
		e.StopAgent(np.n)
		stdout, _ := cleanup(t, np.n, "--node-name", np.n.Name, "--kubeconfig", e.KC, "--netns-dir", e.NSDir,
			"--resync-period", "2s", "--debug-addr", harness.DebugAddr, "--fail-mode", "closed")
		if !strings.Contains(stdout, "removed the redirection annotation from 2 pods") {
			t.Fatalf("%s: cleanup stdout: %s", np.n.Name, stdout)
		}
		for ns, before := range np.before {
			if after := netnstest.Dump(t, ns); after != before {
				t.Fatalf("%s: residue in %s:\n%s", np.n.Name, ns, netnstest.LineDiff(before, after))
			}
		}
		if c := enabled(np); c != 0 {
			t.Fatalf("%s: %d pods keep the annotation after cleanup", np.n.Name, c)
		}
		if err := harness.Direct(t, np.a1, np.a2, np.n.ZT); err != nil {
			t.Fatal(err)
		}
		for _, other := range nodes[i+1:] {
			// Not yet cleaned: untouched, still captured and annotated.
			if c := enabled(other); c != 2 {
				t.Fatalf("cleanup of %s removed %s's annotations", np.n.Name, other.n.Name)
			}
			if err := harness.Captured(t, other.n.ZT, 15001, other.a1, other.a2); err != nil {
				t.Fatalf("cleanup of %s broke %s: %v", np.n.Name, other.n.Name, err)
			}
		}
	}
}
