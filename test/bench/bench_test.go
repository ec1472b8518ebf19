// Package bench measures the real agent binary at node scale against a real
// kube-apiserver: event-to-programmed latency, churn, cold start, ztunnel
// switchover, footprint and process launches. Run it with hack/bench.sh
// (AR_BENCH=1); it prints a table and writes BENCHMARKS.md.
package bench

import (
	"bytes"
	"cmp"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

var (
	out     = flag.String("bench-out", "", "write the results as markdown to this file")
	runs    = flag.Int("bench-runs", 3, "repetitions of each measurement")
	churnS  = flag.Duration("bench-churn", 60*time.Second, "duration of the churn measurement")
	samples = flag.Int("bench-samples", 60, "pod events per latency run")
	only    = flag.String("bench-only", "", "comma-separated measurements to run (start, latency, exec, footprint, churn, switchover, coldstart); empty runs all")
	starts  = flag.Int("bench-starts", 5, "agent starts of the start → first capture measurement")
	// The first backend gets every measurement; the others, on the same
	// node after a cleanup, those compared side by side (latency at 250
	// pods, exec, footprint, coldstart).
	backends = flag.String("bench-backends", "iptables,nftables", "comma-separated agent --backend values to measure, the first in full")
)

// selected reports whether measurement m is to run (see -bench-only).
func selected(m string) bool {
	return *only == "" || slices.Contains(strings.Split(*only, ","), m)
}

// row is one result of one backend.
type row struct {
	backend, name, value, target, verdict string
}

type results struct {
	mu   sync.Mutex
	rows []row
}

func (r *results) add(backend, name, value, target string, ok bool) {
	v := "met"
	if !ok {
		v = "MISSED"
	}
	if target == "" {
		v = ""
	}
	r.mu.Lock()
	r.rows = append(r.rows, row{backend, name, value, target, v})
	r.mu.Unlock()
	fmt.Printf("%-9s %-58s %-48s %-14s %s\n", backend, name, value, target, v)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d.Microseconds())/1000) }

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p)
	return s[i]
}

// spread renders the min..max of per-run values.
func spread(vals []time.Duration) string {
	if len(vals) == 0 {
		return "-"
	}
	return ms(slices.Min(vals)) + ".." + ms(slices.Max(vals))
}

// fakeIP gives bench pods addresses outside any real pod: only the kernel
// state (ipset member, table-100 route) is observed for them.
func fakeIP(i int) string { return fmt.Sprintf("10.250.%d.%d", i/250, 1+i%250) }

// v6Of is the IPv6 address a dual-stack bench pod gets next to ip.
func v6Of(ip string) string {
	b := net.ParseIP(ip).To4()
	return net.IP{0xfd, 0, 0x02, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, b[0], b[1], b[2], b[3]}.String()
}

// observer reads a node's pod sets as one backend keeps them: ipsets
// (iptables) or elements of the sets of our nftables table, named alike.
type observer struct {
	backend string
	h       *netlink.Handle
	nft     *nftables.Conn // nftables: a lasting connection in the node netns
	mu      sync.Mutex     // one request at a time on nft
}

func newObserver(t *testing.T, node *harness.Node, backend string) *observer {
	o := &observer{backend: backend, h: node.Handle}
	switch backend {
	case "iptables":
	case "nftables":
		c, err := nftables.New(nftables.AsLasting(), nftables.WithNetNSFd(int(node.NsHandle)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.CloseLasting() })
		o.nft = c
	default:
		t.Fatalf("-bench-backends: unknown backend %q", backend)
	}
	return o
}

// agentArgs are the flags of the bench's agents on o's backend.
func (o *observer) agentArgs() []string {
	return []string{"--backend", o.backend, "--resync-period", "1h"}
}

// member reports whether ip is in its family's pod set: one ipset test, or
// one dump of the nftables set's elements.
func (o *observer) member(ip net.IP) (bool, error) {
	set, key := "ztunnel-pods-ips", ip.To4()
	if key == nil {
		set, key = "ztunnel-pods-ips-v6", ip.To16()
	}
	if o.nft == nil {
		return o.h.IpsetTest(set, &netlink.IPSetEntry{IP: ip})
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	elems, err := o.nft.GetSetElements(&nftables.Set{Name: set, Table: &nftables.Table{Name: dataplane.NFTTable, Family: nftables.TableFamilyINet}})
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(elems, func(e nftables.SetElement) bool { return bytes.Equal(e.Key, key) }), nil
}

// addrs are a bench pod's two addresses: ip and its IPv6 twin.
func addrs(ip string) []net.IP { return []net.IP{net.ParseIP(ip), net.ParseIP(v6Of(ip))} }

// programmed reports whether ip and its IPv6 twin are set members with a
// table-100 route each (a dual-stack pod is 2 members + 2 routes).
func (o *observer) programmed(ip string) bool {
	for _, a := range addrs(ip) {
		fam, bits := netlink.FAMILY_V4, 32
		if a.To4() == nil {
			fam, bits = netlink.FAMILY_V6, 128
		}
		if ok, err := o.member(a); err != nil || !ok {
			return false
		}
		rs, err := o.h.RouteListFiltered(fam, &netlink.Route{Table: 100, Dst: &net.IPNet{IP: a, Mask: net.CIDRMask(bits, bits)}}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
		if err != nil || len(rs) == 0 {
			return false
		}
	}
	return true
}

// gone reports whether neither address of ip is a set member.
func (o *observer) gone(ip string) bool {
	for _, a := range addrs(ip) {
		if ok, err := o.member(a); err != nil || ok {
			return false
		}
	}
	return true
}

// waitFor spins on cond, returning how long it took (or false on timeout).
func waitFor(timeout time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(100 * time.Microsecond)
	}
	return time.Since(start), true
}

// podObject creates an ambient pod object bound to the node, without status.
func podObject(t testing.TB, e *harness.Env, n *harness.Node, name string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: harness.AmbientNS, Name: name},
		Spec: corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{Name: "c", Image: "x"}}}}
	created, err := e.Client.CoreV1().Pods(harness.AmbientNS).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return created
}

// setIP plays kubelet reporting the pod running with ip; it returns when the
// status write was sent (the latency clock starts just before it).
func setIP(t testing.TB, e *harness.Env, p *corev1.Pod, ip string) *corev1.Pod {
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}, {IP: v6Of(ip)}}}
	up, err := e.Client.CoreV1().Pods(p.Namespace).UpdateStatus(context.Background(), p, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return up
}

func deletePod(t testing.TB, e *harness.Env, p *corev1.Pod) {
	zero := int64(0)
	if err := e.Client.CoreV1().Pods(p.Namespace).Delete(context.Background(), p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
}

// fill brings the node to n enrolled bench pods.
func fill(t testing.TB, e *harness.Env, node *harness.Node, o *observer, pods *[]*corev1.Pod, n int) {
	for len(*pods) < n {
		i := len(*pods)
		p := setIP(t, e, podObject(t, e, node, fmt.Sprintf("fill-%d", i)), fakeIP(i))
		*pods = append(*pods, p)
	}
	last := fakeIP(n - 1)
	if _, ok := waitFor(30*time.Second, func() bool { return o.programmed(last) }); !ok {
		t.Fatalf("filling to %d pods: %s not programmed", n, last)
	}
}

// latencies measures pod-status-written → set member and route present.
func latencies(t testing.TB, e *harness.Env, node *harness.Node, o *observer, tag string, count int) []time.Duration {
	var out []time.Duration
	for i := range count {
		ip := fmt.Sprintf("10.251.%d.%d", i/250, 1+i%250)
		p := podObject(t, e, node, fmt.Sprintf("lat-%s-%d", tag, i))
		time.Sleep(5 * time.Millisecond) // let the Add event pass; measure the IP write alone
		start := time.Now()
		setIP(t, e, p, ip)
		if _, ok := waitFor(5*time.Second, func() bool { return o.programmed(ip) }); !ok {
			t.Fatalf("%s not programmed within 5s", ip)
		}
		out = append(out, time.Since(start))
		deletePod(t, e, p)
		if _, ok := waitFor(5*time.Second, func() bool { return o.gone(ip) }); !ok {
			t.Fatalf("%s not removed within 5s", ip)
		}
	}
	return out
}

func TestNodeScale(t *testing.T) {
	if os.Getenv("AR_BENCH") != "1" {
		t.Skip("node-scale benchmarks run with hack/bench.sh (AR_BENCH=1)")
	}
	netnstest.RequireRoot(t)
	dir := t.TempDir()
	bins, err := harness.Build("../..", dir)
	if err != nil {
		t.Fatal(err)
	}
	// Two nodes: the second only serves the start → first capture
	// measurement (a cross-node connection); the rest runs on the first.
	e := harness.New(t, 2, bins)
	node := e.Nodes[0]
	a1 := e.RunPod(t, node, harness.AmbientNS, "a1")
	a2 := e.RunPod(t, node, harness.AmbientNS, "a2")
	if g := os.Getenv("AR_BENCH_GOGC"); g != "" {
		e.AgentEnv = append(e.AgentEnv, "GOGC="+g)
	}
	res := &results{}
	fmt.Printf("%-9s %-58s %-48s %-14s %s\n", "backend", "measurement", "value", "target", "")
	var pods []*corev1.Pod
	var wrap wrapper
	for i, backend := range strings.Split(*backends, ",") {
		o := newObserver(t, node, backend)
		if i == 0 {
			if selected("start") {
				// The agents as deployed: without the launch-counting
				// wrappers below (a shell started in front of every
				// iptables binary).
				startToCapture(t, e, a1, e.RunPod(t, e.Nodes[1], harness.AmbientNS, "b1"), o, res)
			}
			wrap = wrapBinaries(t)
			e.AgentEnv = append(e.AgentEnv, "PATH="+wrap.dir+":"+os.Getenv("PATH"))
		} else {
			stopClean(t, e, node) // the previous backend's state goes
		}
		if startAgent(t, e, node, o, res) {
			measure(t, e, node, o, i == 0, &pods, wrap, a1, a2, res)
		}
	}
	if *out != "" {
		writeMarkdown(t, *out, res)
	}
}

// measure runs the selected measurements on the node's agent, started on
// o's backend: in full, or those compared across backends.
func measure(t *testing.T, e *harness.Env, node *harness.Node, o *observer, full bool, pods *[]*corev1.Pod, wrap wrapper, a1, a2 *harness.Pod, res *results) {
	sizes := []int{250}
	if full {
		sizes = []int{110, 250}
	}
	for _, size := range sizes {
		if selected("latency") {
			latencyAt(t, e, node, o, pods, size, res)
		}
	}
	if selected("exec") {
		// Process launches per pod event, counted by wrappers around every
		// binary the agent could run.
		before := wrap.count(t)
		ls := latencies(t, e, node, o, "exec-"+o.backend, 50)
		launches := wrap.count(t) - before
		res.add(o.backend, "process launches per pod event (add + delete = 2 events)", fmt.Sprintf("%.2f (%d over %d events)", float64(launches)/float64(2*len(ls)), launches, 2*len(ls)), "0", launches == 0)
	}
	if selected("footprint") || selected("coldstart") {
		fill(t, e, node, o, pods, 248) // 250 with a1, a2
	}
	if selected("footprint") {
		footprint(t, e, node, o.backend, res)
	}
	if full && selected("churn") {
		churn(t, e, node, o, res)
	}
	if full && selected("switchover") {
		switchover(t, e, node, a1, a2, o.backend, res)
	}
	if selected("coldstart") {
		coldStart(t, e, node, o, res)
	}
}

// latencyAt measures pod IP written → programmed with size pods on the
// node, and the agent's share of it (its event → kernel histogram).
func latencyAt(t *testing.T, e *harness.Env, node *harness.Node, o *observer, pods *[]*corev1.Pod, size int, res *results) {
	fill(t, e, node, o, pods, size-2) // plus a1, a2
	var p50s, p99s, maxs []time.Duration
	var all []time.Duration
	// The agent's share: its event → programmed histogram (sum, count and
	// events within 4 ms), read at once.
	hist := func() (sum, n, fast float64) {
		m := e.Metrics(t, node, "ambient_redirect_event_to_programmed_seconds_sum", "ambient_redirect_event_to_programmed_seconds_count",
			`ambient_redirect_event_to_programmed_seconds_bucket{le="0.004"}`)
		return m[0], m[1], m[2]
	}
	sum0, n0, f0 := hist()
	for r := range *runs {
		ls := latencies(t, e, node, o, fmt.Sprintf("%s-%d-%d", o.backend, size, r), *samples)
		all = append(all, ls...)
		p50s, p99s, maxs = append(p50s, pct(ls, .5)), append(p99s, pct(ls, .99)), append(maxs, slices.Max(ls))
	}
	target := map[int]time.Duration{110: 10 * time.Millisecond, 250: 20 * time.Millisecond}[size]
	res.add(o.backend, fmt.Sprintf("pod IP written → programmed, %d pods: p50", size), fmt.Sprintf("%s (runs %s)", ms(pct(all, .5)), spread(p50s)), "", true)
	res.add(o.backend, fmt.Sprintf("pod IP written → programmed, %d pods: p99", size), fmt.Sprintf("%s (runs %s)", ms(pct(all, .99)), spread(p99s)), "≤ "+ms(target), pct(all, .99) <= target)
	res.add(o.backend, fmt.Sprintf("pod IP written → programmed, %d pods: max", size), fmt.Sprintf("%s (runs %s)", ms(slices.Max(all)), spread(maxs)), "", true)
	sum1, n1, f1 := hist()
	if n1 > n0 {
		mean := time.Duration((sum1 - sum0) / (n1 - n0) * float64(time.Second))
		res.add(o.backend, fmt.Sprintf("  of which inside the agent (event → kernel), %d pods: mean", size), ms(mean), "", true)
		slow := (n1 - n0) - (f1 - f0)
		res.add(o.backend, fmt.Sprintf("  inside the agent over 4 ms, %d pods", size), fmt.Sprintf("%.0f of %.0f events", slow, n1-n0), "", true)
	}
}

// isReady reports whether node's agent answers /readyz with 200.
func isReady(e *harness.Env, node *harness.Node) func() bool {
	return func() bool { code, _, err := e.Get(node, "/readyz"); return err == nil && code == 200 }
}

// startAgent starts node's agent on o's backend and waits until it is
// ready. An agent that is not ready within 30s fails the test and shows in
// the table with its last error; its backend is not measured further, the
// other backends still are.
func startAgent(t *testing.T, e *harness.Env, node *harness.Node, o *observer, res *results) bool {
	e.LaunchAgent(t, node, o.agentArgs()...)
	if _, ok := waitFor(30*time.Second, isReady(e, node)); ok {
		return true
	}
	log := node.Agent.Log()
	t.Errorf("%s backend: agent not ready within 30s:\n%s", o.backend, log)
	res.add(o.backend, "agent ready after start", "not within 30s: "+lastError(log), "ready", false)
	return false
}

// lastError is the last "error" field an agent logged.
func lastError(log string) string {
	const key = `"error":"`
	i := strings.LastIndex(log, key)
	if i < 0 {
		return "no error logged"
	}
	msg, _, _ := strings.Cut(log[i+len(key):], `"`)
	return msg
}

// stopClean stops n's agent and removes what it owns from n's kernel.
func stopClean(t *testing.T, e *harness.Env, n *harness.Node) {
	e.StopAgent(n)
	netnstest.Exec(t, n.NS, e.Bins.Agent, "cleanup", "--netns-dir", e.NSDir)
}

// footprint measures the agent's RSS and CPU at idle (250 pods).
func footprint(t *testing.T, e *harness.Env, node *harness.Node, backend string, res *results) {
	pid := node.Agent.Cmd.Process.Pid
	// Idle means no sync for 2s (annotation patches of the last events done).
	for last, stable, deadline := -1.0, 0, time.Now().Add(60*time.Second); stable < 4 && time.Now().Before(deadline); {
		cur := e.Metric(t, node, "ambient_redirect_syncs_total")
		if cur == last {
			stable++
		} else {
			stable = 0
		}
		last = cur
		time.Sleep(500 * time.Millisecond)
	}
	cpu0, rss0 := procStat(t, pid)
	syncs0 := e.Metric(t, node, "ambient_redirect_syncs_total")
	time.Sleep(10 * time.Second)
	cpu1, rss1 := procStat(t, pid)
	syncs := e.Metric(t, node, "ambient_redirect_syncs_total") - syncs0
	res.add(backend, "agent RSS at idle, 250 dual-stack pods", fmt.Sprintf("%.1f MiB (%.1f..%.1f)", float64(max(rss0, rss1))/1024, float64(rss0)/1024, float64(rss1)/1024), "≤ 36 MiB", max(rss0, rss1) <= 36*1024)
	res.add(backend, "  of which anonymous / the binary and libraries (file)", fmt.Sprintf("%.1f / %.1f MiB", float64(procStatus(t, pid, "RssAnon"))/1024, float64(procStatus(t, pid, "RssFile"))/1024), "", true)
	res.add(backend, "agent CPU at idle, 250 pods (10s)", fmt.Sprintf("%.2f%% of a core (%.0f syncs)", 100*(cpu1-cpu0)/10, syncs), "", true)
}

// startToCapture starts the agents of two nodes on kernels without our
// state, together, and measures from the agent processes' start to the first
// connection of an ambient pod of the first node to one of the second that
// the first node's ztunnel captures. The agents are stopped afterwards.
func startToCapture(t *testing.T, e *harness.Env, from, to *harness.Pod, o *observer, res *results) {
	dst := harness.Hostport(to.IP, harness.EchoPort)
	zt := from.Node.ZT
	var took []time.Duration
	for r := range *starts {
		for _, n := range e.Nodes {
			stopClean(t, e, n)
		}
		before := zt.Count(t, 15001, from.IP, dst)
		if err := harness.RoundTrip(from, dst); err != nil || zt.Count(t, 15001, from.IP, dst) != before {
			t.Fatalf("start %d: %s -> %s not direct before the agents start (%v)", r, from.IP, dst, err)
		}
		start := time.Now()
		for _, n := range e.Nodes {
			e.LaunchAgent(t, n, o.agentArgs()...)
		}
		// The ztunnel records a connection before it relays a byte: a
		// round trip it captured is already counted when it returns.
		_, ok := waitFor(10*time.Second, func() bool {
			before := zt.Count(t, 15001, from.IP, dst)
			_, err := netnstest.RoundTrip(from.Net.NS, dst, []byte("start"), time.Second)
			return err == nil && zt.Count(t, 15001, from.IP, dst) > before
		})
		if !ok {
			t.Fatalf("start %d: no connection captured within 10s:\n%s", r, from.Node.Agent.Log())
		}
		took = append(took, time.Since(start))
	}
	for _, n := range e.Nodes {
		e.StopAgent(n)
	}
	p50 := pct(took, .5)
	res.add(o.backend, fmt.Sprintf("agent start → first captured connection, 2 nodes: p50 of %d", len(took)), fmt.Sprintf("%s (starts %s)", ms(p50), spread(took)), "≤ 150.00ms", p50 <= 150*time.Millisecond)
}

// churn creates and deletes 20 pods per second and measures each creation.
func churn(t *testing.T, e *harness.Env, node *harness.Node, o *observer, res *results) {
	type ev struct {
		ip    string
		start time.Time
	}
	var mu sync.Mutex
	var lat []time.Duration
	var windows [][]time.Duration
	pending := make(chan ev, 4096)
	done := make(chan struct{})
	go func() { // the observer
		defer close(done)
		for x := range pending {
			if _, ok := waitFor(10*time.Second, func() bool { return o.programmed(x.ip) }); ok {
				mu.Lock()
				lat = append(lat, time.Since(x.start))
				mu.Unlock()
			}
		}
	}()
	var live []*corev1.Pod
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	windowStart := 0
	for i := 0; time.Since(start) < *churnS; i++ {
		<-tick.C
		ip := fmt.Sprintf("10.252.%d.%d", (i/250)%250, 1+i%250)
		p := podObject(t, e, node, fmt.Sprintf("churn-%d", i))
		pending <- ev{ip, time.Now()}
		live = append(live, setIP(t, e, p, ip))
		if len(live) > 20 {
			deletePod(t, e, live[0])
			live = live[1:]
		}
		if (i+1)%200 == 0 { // 10s windows
			mu.Lock()
			windows = append(windows, slices.Clone(lat[windowStart:]))
			windowStart = len(lat)
			mu.Unlock()
		}
	}
	close(pending)
	<-done
	for _, p := range live {
		deletePod(t, e, p)
	}
	var p99s []time.Duration
	for _, w := range windows {
		p99s = append(p99s, pct(w, .99))
	}
	first, last := time.Duration(0), time.Duration(0)
	if len(p99s) > 0 {
		first, last = p99s[0], p99s[len(p99s)-1]
	}
	res.add(o.backend, fmt.Sprintf("churn 20 create+delete/s for %s: p50", *churnS), ms(pct(lat, .5)), "", true)
	res.add(o.backend, fmt.Sprintf("churn 20 create+delete/s for %s: p99", *churnS), fmt.Sprintf("%s (10s windows %s)", ms(pct(lat, .99)), spread(p99s)), "≤ 50.00ms", pct(lat, .99) <= 50*time.Millisecond)
	res.add(o.backend, "churn backlog: p99 first vs last 10s window", ms(first)+" → "+ms(last), "no growth", last <= 2*first+5*time.Millisecond)
}

// switchover: new ztunnel Ready → first new connection captured by it.
func switchover(t *testing.T, e *harness.Env, node *harness.Node, a1, a2 *harness.Pod, backend string, res *results) {
	var took []time.Duration
	for r := range *runs + 2 {
		old := node.ZT
		// The active ztunnel is the newest by start time, which the API
		// keeps in whole seconds: the new one must start in a later second.
		if ts := old.Pod.Obj.Status.StartTime; ts != nil {
			time.Sleep(time.Until(ts.Add(1100 * time.Millisecond)))
		}
		nz := e.StartZtunnel(t, node, fmt.Sprintf("ztunnel-next-%d", r))
		dst := harness.Hostport(a2.IP, harness.EchoPort)
		// Connect until a connection lands on the new ztunnel (earlier ones
		// go through the old one, or fail fast in between). A ztunnel
		// records a connection before it relays a byte, so a round trip it
		// captured is counted when it returns: no need to wait for the
		// record (waiting 50 ms after every round trip through the old
		// ztunnel made this measurement 50 ms coarse).
		d, ok := waitFor(5*time.Second, func() bool {
			before := nz.Count(t, 15001, a1.IP, dst)
			return harness.RoundTrip(a1, dst) == nil && nz.Count(t, 15001, a1.IP, dst) > before
		})
		if !ok {
			t.Fatalf("switchover %d: new ztunnel never captured", r)
		}
		took = append(took, d)
		e.DeletePod(t, old.Pod)
		old.Proc.Stop()
		node.ZT = nz
		time.Sleep(200 * time.Millisecond)
	}
	slices.Sort(took)
	res.add(backend, "ztunnel Ready → first connection captured by it", fmt.Sprintf("median %s (runs %s)", ms(took[len(took)/2]), spread(took)), "≤ 50.00ms", slices.Max(took) <= 50*time.Millisecond)
}

// coldStart restarts the agent on a programmed node, then on an empty one.
func coldStart(t *testing.T, e *harness.Env, node *harness.Node, o *observer, res *results) {
	var ready, afterSync []time.Duration
	var writes []int
	for range *runs {
		e.StopAgent(node)
		start := time.Now()
		e.LaunchAgent(t, node, o.agentArgs()...)
		d, ok := waitFor(60*time.Second, isReady(e, node))
		if !ok {
			t.Fatalf("agent not ready: %s", node.Agent.Log())
		}
		ready = append(ready, d)
		afterSync = append(afterSync, time.Since(start)-syncedAt(t, node.Agent.Log(), start))
		writes = append(writes, e.KernelWrites(t, node))
	}
	res.add(o.backend, "cold start, 250 pods, state present: start → ready", "runs "+spread(ready), "", true)
	res.add(o.backend, "cold start, state present: caches synced → ready", "runs "+spread(afterSync), "≤ 50.00ms", slices.Max(afterSync) <= 50*time.Millisecond)
	res.add(o.backend, "cold start, state present: kernel writes", fmt.Sprint(writes), "0", slices.Max(writes) == 0)

	var converge []time.Duration
	for range *runs {
		stopClean(t, e, node)
		e.LaunchAgent(t, node, o.agentArgs()...)
		d, ok := waitFor(60*time.Second, func() bool { return isReady(e, node)() && o.programmed(fakeIP(247)) })
		if !ok {
			t.Fatalf("agent did not converge on an empty kernel: %s", node.Agent.Log())
		}
		converge = append(converge, d)
	}
	res.add(o.backend, "cold start, 250 pods, empty kernel: start → converged", "runs "+spread(converge), "", true)
}

// syncedAt returns when (relative to start) the agent logged "caches synced".
func syncedAt(t *testing.T, log string, start time.Time) time.Duration {
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, `"caches synced"`) {
			continue
		}
		i := strings.Index(l, `"ts":"`)
		if i < 0 {
			continue
		}
		ts, _, _ := strings.Cut(l[i+6:], `"`)
		if at, err := time.Parse("2006-01-02T15:04:05.000Z0700", ts); err == nil {
			return at.Sub(start)
		}
	}
	t.Fatalf("no caches-synced line in:\n%s", log)
	return 0
}

// procStatus returns a KiB field of /proc/PID/status (0 when absent).
func procStatus(t *testing.T, pid int, field string) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			v, _ := strconv.Atoi(strings.Fields(l)[1])
			return v
		}
	}
	return 0
}

// procStat returns the process's CPU seconds and RSS in KiB.
func procStat(t *testing.T, pid int) (float64, int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndex(string(b), ")")+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	rss := 0
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			rss, _ = strconv.Atoi(strings.Fields(l)[1])
		}
	}
	return float64(ut+st) / 100, rss // USER_HZ is 100 on Linux
}

// wrapper counts launches of the binaries the agent may run.
type wrapper struct{ dir, log string }

func wrapBinaries(t *testing.T) wrapper {
	w := wrapper{dir: t.TempDir()}
	w.log = filepath.Join(w.dir, "launches.log")
	for _, b := range []string{"iptables-nft-save", "iptables-nft-restore", "iptables-legacy-save", "iptables-legacy-restore",
		"iptables", "ip6tables", "ipset", "ip", "nsenter", "sysctl", "nft"} {
		real, err := exec.LookPath(b)
		if err != nil {
			continue
		}
		script := fmt.Sprintf("#!/bin/sh\necho %s >> %s\nexec %s \"$@\"\n", b, w.log, real)
		if err := os.WriteFile(filepath.Join(w.dir, b), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

func (w wrapper) count(t *testing.T) int {
	b, err := os.ReadFile(w.log)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

// table is the results as markdown: a row per measurement (in the order
// first taken), a column per backend (in -bench-backends order).
func (r *results) table() string {
	cols := strings.Split(*backends, ",")
	var names []string
	cells, targets := map[string]map[string]string{}, map[string]string{}
	for _, x := range r.rows {
		if cells[x.name] == nil {
			names, cells[x.name] = append(names, x.name), map[string]string{}
		}
		cells[x.name][x.backend], targets[x.name] = x.value, x.target
		if x.verdict != "" {
			cells[x.name][x.backend] += " — " + x.verdict
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "| measurement | target | %s |\n|---|---|%s\n", strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
	for _, n := range names {
		vals := []string{}
		for _, c := range cols {
			vals = append(vals, cmp.Or(cells[n][c], "·"))
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", n, targets[n], strings.Join(vals, " | "))
	}
	if len(cols) > 1 {
		fmt.Fprintf(&b, "\n· not measured on that backend: %s is measured in full, the others (after `ambient-redirect cleanup`, on the same node and pods) on latency at 250 pods, process launches, footprint and cold start.\n", cols[0])
	}
	return b.String()
}

func writeMarkdown(t *testing.T, path string, res *results) {
	kernel, _ := exec.Command("uname", "-r").Output()
	ipt, _ := exec.Command("iptables", "--version").Output()
	rev, _ := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Benchmarks\n\nNode-scale measurements of the real `ambient-redirect` binary against a real kube-apiserver, ")
	fmt.Fprintf(&b, "one node in a network namespace, dual-stack bench pods as API objects (each pod is 2 set members + 2 routes; their kernel state is observed through netlink from outside the agent).\n\n")
	fmt.Fprintf(&b, "- date: %s\n- machine: %d cores (%s), kernel %s- Go: %s\n- %s- commit: %s- command: `bash hack/bench.sh`\n- runs per measurement: %d (spread shown as min..max of per-run values)\n",
		time.Now().UTC().Format(time.RFC3339), runtime.NumCPU(), cpu, kernel, runtime.Version(), ipt, rev, *runs)
	fmt.Fprintf(&b, "- backends: %s (the agent's `--backend`; iptables keeps pods in ipsets, nftables in the sets of its table `inet %s`)\n\n", *backends, dataplane.NFTTable)
	b.WriteString(res.table())
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}
