package e2e

import (
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/controller"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestAgent runs one agent per node on two nodes and walks the behaviours
// of the controller in order; each step leaves the cluster as it found it.
func TestAgent(t *testing.T) {
	// Agents and ztunnels outlive the subtest that starts them: they take T.
	T := t
	e := newEnv(t, 2)
	n1, n2 := e.nodes[0], e.nodes[1]
	a1 := e.runPod(t, n1, ambientNS, "a1")
	a2 := e.runPod(t, n1, ambientNS, "a2")
	b1 := e.runPod(t, n2, ambientNS, "b1")
	p1 := e.runPod(t, n1, plainNS, "p1")
	for _, n := range e.nodes {
		e.startAgent(t, n)
	}
	zt1, zt2 := n1.zt, n2.zt

	t.Run("ambient namespace pods are captured and annotated", func(t *testing.T) {
		eventually(t, 5*time.Second, func() error {
			if a := e.annotation(t, a1); a != controller.RedirectionEnabled {
				return fmt.Errorf("a1 annotation %q", a)
			}
			return captured(t, zt1, 15001, a1, a2)
		})
		if err := captured(t, zt1, 15006, p1, a2); err != nil {
			t.Fatal(err)
		}
		st := e.state(t, n1)
		if !st.Converged || st.Enrolled != 2 || st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "ztunnel-"+n1.Name) {
			t.Fatalf("debug state: converged=%v enrolled=%d ztunnel=%+v diff=%v", st.Converged, st.Enrolled, st.Ztunnel, st.Diff)
		}
	})

	t.Run("two nodes: each agent programs only its own pods; cross-node is captured on both sides", func(t *testing.T) {
		m1, m2 := members(t, n1), members(t, n2)
		if !m1[a1.ip] || !m1[a2.ip] || m1[b1.ip] || len(m1) != 2 {
			t.Fatalf("node1 members %v", m1)
		}
		if !m2[b1.ip] || len(m2) != 1 {
			t.Fatalf("node2 members %v", m2)
		}
		dst := hostport(b1.ip, echoPort)
		hbone := func() int {
			n := 0
			for _, r := range zt2.records_(t) {
				if r.Listener == 15008 && r.Target == dst && strings.HasPrefix(r.HeaderClient, a1.ip+":") && r.DialError == "" {
					n++
				}
			}
			return n
		}
		before := hbone()
		if err := captured(t, zt1, 15001, a1, b1); err != nil {
			t.Fatal(err)
		}
		eventually(t, time.Second, func() error {
			if hbone() == before {
				return fmt.Errorf("node2 ztunnel did not deliver the HBONE leg: %+v", zt2.records_(t))
			}
			return nil
		})
	})

	t.Run("opt-outs, hostNetwork, sidecar and kube-system are never enrolled", func(t *testing.T) {
		pods := []*kpod{
			e.runPod(t, n1, ambientNS, "optout-label", withLabels(controller.DataplaneModeLabel, controller.DataplaneModeNone)),
			e.runPod(t, n1, ambientNS, "optout-anno", withAnnotations(controller.RedirectionAnno, controller.RedirectionDisabled)),
			e.runPod(t, n1, ambientNS, "sidecar", withAnnotations(controller.SidecarStatusAnno, `{"containers":["istio-proxy"]}`)),
			e.runPod(t, n1, ambientNS, "hostnet", hostNetwork),
			e.runPod(t, n1, "kube-system", "sys", withLabels(controller.DataplaneModeLabel, controller.DataplaneModeAmbient)),
		}
		probe := e.runPod(t, n1, ambientNS, "probe") // an enrolled pod proves the agent saw the batch
		eventually(t, 5*time.Second, func() error {
			if !members(t, n1)[probe.ip] {
				return fmt.Errorf("probe pod not enrolled yet")
			}
			return nil
		})
		m := members(t, n1)
		for _, p := range pods {
			if p.obj.Spec.HostNetwork {
				if m[p.ip] {
					t.Errorf("hostNetwork pod's (node) IP enrolled")
				}
			} else if m[p.ip] || hasRoute(t, n1, p.ip) {
				t.Errorf("%s enrolled", p.obj.Name)
			}
			if a := e.annotation(t, p); a == controller.RedirectionEnabled {
				t.Errorf("%s annotated enabled", p.obj.Name)
			}
		}
		st := e.state(t, n1)
		reasons := map[string]string{}
		for _, ps := range st.Pods {
			reasons[ps.Name] = ps.Reason
		}
		for name, want := range map[string]string{"optout-label": controller.ReasonOptOutLabel, "optout-anno": controller.ReasonOptOutAnnotation,
			"sidecar": controller.ReasonSidecar, "hostnet": controller.ReasonHostNetwork, "sys": controller.ReasonExcludedNamespace} {
			if reasons[name] != want {
				t.Errorf("%s: reason %q, want %q", name, reasons[name], want)
			}
		}
		for _, p := range append(pods, probe) {
			e.deletePod(t, p)
		}
	})

	t.Run("deleted pod's member and route go; its IP reused by a plain pod is not captured", func(t *testing.T) {
		d := e.runPod(t, n1, ambientNS, "doomed")
		eventually(t, 5*time.Second, func() error {
			if !members(t, n1)[d.ip] || !hasRoute(t, n1, d.ip) {
				return fmt.Errorf("not programmed")
			}
			return nil
		})
		ip := d.net.IP
		e.deletePod(t, d)
		eventually(t, 5*time.Second, func() error {
			if members(t, n1)[d.ip] || hasRoute(t, n1, d.ip) {
				return fmt.Errorf("member or route of a deleted pod remains")
			}
			return nil
		})
		reuse := &kpod{node: n1}
		reuse.net = n1.AddPod(t, "plain-reuse", netnstest.WithIP(ip))
		reuse.ip = ip.String()
		e.link(reuse.net.NS)
		obj := e.runPodObject(t, n1, plainNS, "reuse", reuse.ip)
		reuse.obj = obj
		netnstest.EchoServer(t, reuse.net.NS, hostport(reuse.ip, echoPort))
		time.Sleep(300 * time.Millisecond)
		if members(t, n1)[reuse.ip] {
			t.Fatal("reused IP enrolled")
		}
		if err := direct(t, p1, reuse, zt1); err != nil {
			t.Fatal(err)
		}
		e.deletePod(t, reuse)
	})

	t.Run("a pod labelled app=ztunnel elsewhere changes nothing", func(t *testing.T) {
		before := e.kernelWrites(t, n1)
		fake := e.runPod(t, n1, "other", "ztunnel-impostor", withLabels("app", "ztunnel"))
		time.Sleep(500 * time.Millisecond)
		if st := e.state(t, n1); st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "ztunnel-"+n1.Name) {
			t.Fatalf("ztunnel changed to %+v", st.Ztunnel)
		}
		if after := e.kernelWrites(t, n1); after != before {
			t.Fatalf("impostor caused %d kernel writes", after-before)
		}
		if err := captured(t, zt1, 15001, a1, a2); err != nil {
			t.Fatal(err)
		}
		e.deletePod(t, fake)
	})

	t.Run("drift is repaired within the resync period", func(t *testing.T) {
		netnstest.Exec(t, n1.NS, "ipset", "del", "ztunnel-pods-ips", a2.ip)
		netnstest.Exec(t, n1.NS, "ip", "route", "del", a1.ip+"/32", "table", "100")
		netnstest.Exec(t, n1.NS, "ip", "rule", "del", "pref", "101")
		netnstest.Exec(t, n1.NS, "iptables", "-t", "mangle", "-F", "ztunnel-PREROUTING")
		eventually(t, 4*time.Second, func() error {
			st := e.state(t, n1)
			if !st.Converged {
				return fmt.Errorf("not converged: %v", st.Diff)
			}
			return captured(t, zt1, 15001, a1, a2)
		})
	})

	t.Run("removing the namespace label releases pods and the annotation", func(t *testing.T) {
		e.labelNamespace(t, ambientNS, false)
		eventually(t, 5*time.Second, func() error {
			if len(members(t, n1)) != 0 {
				return fmt.Errorf("members remain: %v", members(t, n1))
			}
			if a := e.annotation(t, a1); a != "" {
				return fmt.Errorf("annotation %q remains", a)
			}
			return direct(t, a1, a2, zt1)
		})
		e.labelNamespace(t, ambientNS, true)
		eventually(t, 5*time.Second, func() error { return captured(t, zt1, 15001, a1, a2) })
	})

	t.Run("agent restart under traffic: connection survives, zero kernel writes", func(t *testing.T) {
		c, err := netnstest.Dial(a1.net.NS, "tcp", hostport(a2.ip, echoPort), 3*time.Second)
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
		e.stopAgent(n1)
		if !strings.Contains(netnstest.Exec(t, n1.NS, "ipset", "list", "ztunnel-pods-ips"), a1.ip) {
			t.Fatal("SIGTERM removed state")
		}
		if err := ping(); err != nil {
			t.Fatalf("connection broke while the agent was down: %v", err)
		}
		e.startAgent(T, n1)
		if err := ping(); err != nil {
			t.Fatalf("connection broke across the restart: %v", err)
		}
		if w := e.kernelWrites(t, n1); w != 0 {
			t.Fatalf("restarted agent made %d kernel writes: %+v", w, e.state(t, n1).LastSync)
		}
		if !e.state(t, n1).Converged {
			t.Fatal("not converged after restart")
		}
	})

	t.Run("apiserver outage: no kernel writes meanwhile, converged within 5s of its return", func(t *testing.T) {
		before := e.kernelWrites(t, n1)
		e.cp.StopAPIServer(t)
		time.Sleep(30 * time.Second)
		if w := e.kernelWrites(t, n1); w != before {
			t.Fatalf("%d kernel writes during the outage", w-before)
		}
		if err := captured(t, zt1, 15001, a1, a2); err != nil {
			t.Fatalf("capture stopped during the outage: %v", err)
		}
		e.cp.StartAPIServer(t)
		back := time.Now()
		late := e.runPod(t, n1, ambientNS, "late")
		eventually(t, 5*time.Second, func() error {
			if !members(t, n1)[late.ip] || !e.state(t, n1).Converged {
				return fmt.Errorf("new pod not programmed %s after the apiserver returned", time.Since(back))
			}
			return nil
		})
		e.deletePod(t, late)
	})

	t.Run("ztunnel restart with a new IP and netns: fail closed in the gap, new ztunnel within 1s", func(t *testing.T) {
		old := zt1
		e.deletePod(t, old.pod)
		old.proc.Stop()
		eventually(t, 3*time.Second, func() error {
			start := time.Now()
			c, err := netnstest.Dial(a1.net.NS, "tcp", hostport(a2.ip, echoPort), 2*time.Second)
			if err == nil {
				c.Close()
				return fmt.Errorf("connected with no ztunnel (fail closed)")
			}
			if time.Since(start) > time.Second {
				return fmt.Errorf("connect took %s to fail: %v\n%s", time.Since(start), err, n1.agent.Log())
			}
			return nil
		})
		nz := e.startZtunnel(T, n1, "ztunnel-"+n1.Name+"-v2")
		ready := time.Now()
		var took time.Duration
		eventually(t, 3*time.Second, func() error {
			if err := captured(t, nz, 15001, a1, a2); err != nil {
				return err
			}
			took = time.Since(ready)
			return nil
		})
		if took > time.Second {
			t.Fatalf("new ztunnel captured after %s (ready at %s), want <= 1s\n%s", took, ready.Format(time.RFC3339Nano), n1.agent.Log())
		}
		t.Logf("switchover: first connection captured by the new ztunnel %s after it was Ready", took)
		n1.zt, zt1 = nz, nz
	})

	t.Run("two Ready ztunnels: the newest wins", func(t *testing.T) {
		time.Sleep(1100 * time.Millisecond) // creation timestamps have second resolution
		surge := e.startZtunnel(T, n1, "ztunnel-"+n1.Name+"-surge")
		eventually(t, 3*time.Second, func() error { return captured(t, surge, 15001, a1, a2) })
		// The status is recorded just after the kernel is programmed.
		eventually(t, time.Second, func() error {
			if st := e.state(t, n1); st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "-surge") {
				return fmt.Errorf("active ztunnel %+v", st.Ztunnel)
			}
			return nil
		})
		e.deletePod(t, zt1.pod)
		zt1.proc.Stop()
		n1.zt, zt1 = surge, surge
		eventually(t, 3*time.Second, func() error { return captured(t, zt1, 15001, a1, a2) })
	})
}

// runPodObject creates a pod object for an existing netns pod.
func (e *env) runPodObject(t testing.TB, n *enode, namespace, name, ip string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{Name: "c", Image: "x"}}}}
	created, err := e.client.CoreV1().Pods(namespace).Create(ctx(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
	out, err := e.client.CoreV1().Pods(namespace).UpdateStatus(ctx(), created, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestCleanupCommand proves `ambient-redirect cleanup` leaves no residue.
func TestCleanupCommand(t *testing.T) {
	e := newEnv(t, 1)
	n := e.nodes[0]
	a1 := e.runPod(t, n, ambientNS, "a1")
	a2 := e.runPod(t, n, ambientNS, "a2")
	nodeBefore, ztBefore := netnstest.Dump(t, n.NS), netnstest.Dump(t, n.zt.pod.net.NS)
	e.startAgent(t, n)
	eventually(t, 5*time.Second, func() error { return captured(t, n.zt, 15001, a1, a2) })
	e.stopAgent(n)
	out := netnstest.Exec(t, n.NS, agentBin, "cleanup", "--netns-dir", e.nsDir)
	if !strings.Contains(out, "cleanup done") {
		t.Fatalf("cleanup output: %s", out)
	}
	if after := netnstest.Dump(t, n.NS); after != nodeBefore {
		t.Fatalf("node residue:\n%s", lineDiff(nodeBefore, after))
	}
	if after := netnstest.Dump(t, n.zt.pod.net.NS); after != ztBefore {
		t.Fatalf("ztunnel netns residue:\n%s", lineDiff(ztBefore, after))
	}
	if err := direct(t, a1, a2, n.zt); err != nil {
		t.Fatal(err)
	}
}

func lineDiff(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !mb[l] {
			out = append(out, "- "+l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !ma[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}
