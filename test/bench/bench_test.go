// Package bench measures the real agent binary at node scale against a real
// kube-apiserver: event-to-programmed latency, churn, cold start, ztunnel
// switchover, footprint and process launches. Run it with hack/bench.sh
// (AR_BENCH=1); it prints a table and writes BENCHMARKS.md.
package bench

import (
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

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
)

// selected reports whether measurement m is to run (see -bench-only).
func selected(m string) bool {
	return *only == "" || slices.Contains(strings.Split(*only, ","), m)
}

// row is one line of the results table.
type row struct {
	name, value, target, verdict string
}

type results struct {
	mu   sync.Mutex
	rows []row
}

func (r *results) add(name, value, target string, ok bool) {
	v := "met"
	if !ok {
		v = "MISSED"
	}
	if target == "" {
		v = ""
	}
	r.mu.Lock()
	r.rows = append(r.rows, row{name, value, target, v})
	r.mu.Unlock()
	fmt.Printf("%-58s %-48s %-14s %s\n", name, value, target, v)
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

// programmed reports whether ip and its IPv6 twin are set members with a
// table-100 route each (a dual-stack pod is 2 members + 2 routes).
func programmed(h *netlink.Handle, ip string) bool {
	for _, c := range []struct {
		set  string
		ip   net.IP
		fam  int
		bits int
	}{{"ztunnel-pods-ips", net.ParseIP(ip), netlink.FAMILY_V4, 32}, {"ztunnel-pods-ips-v6", net.ParseIP(v6Of(ip)), netlink.FAMILY_V6, 128}} {
		ok, err := h.IpsetTest(c.set, &netlink.IPSetEntry{IP: c.ip})
		if err != nil || !ok {
			return false
		}
		rs, err := h.RouteListFiltered(c.fam, &netlink.Route{Table: 100, Dst: &net.IPNet{IP: c.ip, Mask: net.CIDRMask(c.bits, c.bits)}}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
		if err != nil || len(rs) == 0 {
			return false
		}
	}
	return true
}

func gone(h *netlink.Handle, ip string) bool {
	ok, err := h.IpsetTest("ztunnel-pods-ips", &netlink.IPSetEntry{IP: net.ParseIP(ip)})
	ok6, err6 := h.IpsetTest("ztunnel-pods-ips-v6", &netlink.IPSetEntry{IP: net.ParseIP(v6Of(ip))})
	return err == nil && !ok && err6 == nil && !ok6
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
func fill(t testing.TB, e *harness.Env, node *harness.Node, pods *[]*corev1.Pod, n int) {
	for len(*pods) < n {
		i := len(*pods)
		p := setIP(t, e, podObject(t, e, node, fmt.Sprintf("fill-%d", i)), fakeIP(i))
		*pods = append(*pods, p)
	}
	last := fakeIP(n - 1)
	if _, ok := waitFor(30*time.Second, func() bool { return programmed(node.Handle, last) }); !ok {
		t.Fatalf("filling to %d pods: %s not programmed", n, last)
	}
}

// latencies measures pod-status-written → ipset member and route present.
func latencies(t testing.TB, e *harness.Env, node *harness.Node, tag string, count int) []time.Duration {
	var out []time.Duration
	for i := range count {
		ip := fmt.Sprintf("10.251.%d.%d", i/250, 1+i%250)
		p := podObject(t, e, node, fmt.Sprintf("lat-%s-%d", tag, i))
		time.Sleep(5 * time.Millisecond) // let the Add event pass; measure the IP write alone
		start := time.Now()
		setIP(t, e, p, ip)
		if _, ok := waitFor(5*time.Second, func() bool { return programmed(node.Handle, ip) }); !ok {
			t.Fatalf("%s not programmed within 5s", ip)
		}
		out = append(out, time.Since(start))
		deletePod(t, e, p)
		if _, ok := waitFor(5*time.Second, func() bool { return gone(node.Handle, ip) }); !ok {
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
	wrap := wrapBinaries(t)
	e.AgentEnv = []string{"PATH=" + wrap.dir + ":" + os.Getenv("PATH")}
	if g := os.Getenv("AR_BENCH_GOGC"); g != "" {
		e.AgentEnv = append(e.AgentEnv, "GOGC="+g)
	}
	res := &results{}
	fmt.Printf("%-58s %-48s %-14s %s\n", "measurement", "value", "target", "")
	if selected("start") {
		startToCapture(t, e, a1, e.RunPod(t, e.Nodes[1], harness.AmbientNS, "b1"), res)
	}
	e.StartAgent(t, node, "--resync-period", "1h")

	var pods []*corev1.Pod
	for _, size := range []int{110, 250} {
		if !selected("latency") {
			continue
		}
		fill(t, e, node, &pods, size-2) // plus a1, a2
		var p50s, p99s, maxs []time.Duration
		var all []time.Duration
		const fast = `ambient_redirect_event_to_programmed_seconds_bucket{le="0.004"}`
		sum0, n0 := e.Metric(t, node, "ambient_redirect_event_to_programmed_seconds_sum"), e.Metric(t, node, "ambient_redirect_event_to_programmed_seconds_count")
		f0 := e.Metric(t, node, fast)
		for r := range *runs {
			ls := latencies(t, e, node, fmt.Sprintf("%d-%d", size, r), *samples)
			all = append(all, ls...)
			p50s, p99s, maxs = append(p50s, pct(ls, .5)), append(p99s, pct(ls, .99)), append(maxs, slices.Max(ls))
		}
		target := map[int]time.Duration{110: 10 * time.Millisecond, 250: 20 * time.Millisecond}[size]
		res.add(fmt.Sprintf("pod IP written → programmed, %d pods: p50", size), fmt.Sprintf("%s (runs %s)", ms(pct(all, .5)), spread(p50s)), "", true)
		res.add(fmt.Sprintf("pod IP written → programmed, %d pods: p99", size), fmt.Sprintf("%s (runs %s)", ms(pct(all, .99)), spread(p99s)), "≤ "+ms(target), pct(all, .99) <= target)
		res.add(fmt.Sprintf("pod IP written → programmed, %d pods: max", size), fmt.Sprintf("%s (runs %s)", ms(slices.Max(all)), spread(maxs)), "", true)
		sum1, n1 := e.Metric(t, node, "ambient_redirect_event_to_programmed_seconds_sum"), e.Metric(t, node, "ambient_redirect_event_to_programmed_seconds_count")
		if n1 > n0 {
			mean := time.Duration((sum1 - sum0) / (n1 - n0) * float64(time.Second))
			res.add(fmt.Sprintf("  of which inside the agent (event → kernel), %d pods: mean", size), ms(mean), "", true)
			slow := (n1 - n0) - (e.Metric(t, node, fast) - f0)
			res.add(fmt.Sprintf("  inside the agent over 4 ms, %d pods", size), fmt.Sprintf("%.0f of %.0f events", slow, n1-n0), "", true)
		}
	}

	if selected("exec") {
		// Process launches per pod event, counted by wrappers around every
		// binary the agent could run.
		before := wrap.count(t)
		ls := latencies(t, e, node, "exec", 50)
		launches := wrap.count(t) - before
		res.add("process launches per pod event (add + delete = 2 events)", fmt.Sprintf("%.2f (%d over %d events)", float64(launches)/float64(2*len(ls)), launches, 2*len(ls)), "0", launches == 0)
	}
	if selected("footprint") || selected("coldstart") {
		fill(t, e, node, &pods, 248) // 250 with a1, a2
	}
	if selected("footprint") {
		footprint(t, e, node, res)
	}
	if selected("churn") {
		churn(t, e, node, res)
	}
	if selected("switchover") {
		switchover(t, e, node, a1, a2, res)
	}
	if selected("coldstart") {
		coldStart(t, e, node, res)
	}

	if *out != "" {
		writeMarkdown(t, *out, res)
	}
}

// footprint measures the agent's RSS and CPU at idle (250 pods).
func footprint(t *testing.T, e *harness.Env, node *harness.Node, res *results) {
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
	res.add("agent RSS at idle, 250 dual-stack pods", fmt.Sprintf("%.1f MiB (%.1f..%.1f)", float64(max(rss0, rss1))/1024, float64(rss0)/1024, float64(rss1)/1024), "≤ 36 MiB", max(rss0, rss1) <= 36*1024)
	res.add("agent CPU at idle, 250 pods (10s)", fmt.Sprintf("%.2f%% of a core (%.0f syncs)", 100*(cpu1-cpu0)/10, syncs), "", true)
}

// startToCapture starts the agents of two nodes on kernels without our
// state, together, and measures from the agent processes' start to the first
// connection of an ambient pod of the first node to one of the second that
// the first node's ztunnel captures. The agents are stopped afterwards.
func startToCapture(t *testing.T, e *harness.Env, from, to *harness.Pod, res *results) {
	dst := harness.Hostport(to.IP, harness.EchoPort)
	zt := from.Node.ZT
	var took []time.Duration
	for r := range *starts {
		for _, n := range e.Nodes {
			e.StopAgent(n)
			netnstest.Exec(t, n.NS, e.Bins.Agent, "cleanup", "--netns-dir", e.NSDir)
		}
		before := zt.Count(t, 15001, from.IP, dst)
		if err := harness.RoundTrip(from, dst); err != nil || zt.Count(t, 15001, from.IP, dst) != before {
			t.Fatalf("start %d: %s -> %s not direct before the agents start (%v)", r, from.IP, dst, err)
		}
		start := time.Now()
		for _, n := range e.Nodes {
			e.LaunchAgent(t, n, "--resync-period", "1h")
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
	res.add(fmt.Sprintf("agent start → first captured connection, 2 nodes: p50 of %d", len(took)), fmt.Sprintf("%s (starts %s)", ms(p50), spread(took)), "≤ 150.00ms", p50 <= 150*time.Millisecond)
}

// churn creates and deletes 20 pods per second and measures each creation.
func churn(t *testing.T, e *harness.Env, node *harness.Node, res *results) {
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
			if _, ok := waitFor(10*time.Second, func() bool { return programmed(node.Handle, x.ip) }); ok {
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
	res.add(fmt.Sprintf("churn 20 create+delete/s for %s: p50", *churnS), ms(pct(lat, .5)), "", true)
	res.add(fmt.Sprintf("churn 20 create+delete/s for %s: p99", *churnS), fmt.Sprintf("%s (10s windows %s)", ms(pct(lat, .99)), spread(p99s)), "≤ 50.00ms", pct(lat, .99) <= 50*time.Millisecond)
	res.add("churn backlog: p99 first vs last 10s window", ms(first)+" → "+ms(last), "no growth", last <= 2*first+5*time.Millisecond)
}

// switchover: new ztunnel Ready → first new connection captured by it.
func switchover(t *testing.T, e *harness.Env, node *harness.Node, a1, a2 *harness.Pod, res *results) {
	var took []time.Duration
	for r := range *runs + 2 {
		old := node.ZT
		nz := e.StartZtunnel(t, node, fmt.Sprintf("ztunnel-next-%d", r))
		dst := harness.Hostport(a2.IP, harness.EchoPort)
		// Connect until a connection lands on the new ztunnel (earlier ones
		// go through the old one, or fail fast in between).
		d, ok := waitFor(5*time.Second, func() bool {
			before := nz.Count(t, 15001, a1.IP, dst)
			if harness.RoundTrip(a1, dst) != nil {
				return false
			}
			_, seen := waitFor(50*time.Millisecond, func() bool { return nz.Count(t, 15001, a1.IP, dst) > before })
			return seen
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
	res.add("ztunnel Ready → first connection captured by it", fmt.Sprintf("median %s (runs %s)", ms(took[len(took)/2]), spread(took)), "≤ 50.00ms", slices.Max(took) <= 50*time.Millisecond)
}

// coldStart restarts the agent on a programmed node, then on an empty one.
func coldStart(t *testing.T, e *harness.Env, node *harness.Node, res *results) {
	var ready, afterSync []time.Duration
	var writes []int
	for range *runs {
		e.StopAgent(node)
		start := time.Now()
		e.LaunchAgent(t, node, "--resync-period", "1h")
		d, ok := waitFor(60*time.Second, func() bool { code, _, err := e.Get(node, "/readyz"); return err == nil && code == 200 })
		if !ok {
			t.Fatalf("agent not ready: %s", node.Agent.Log())
		}
		ready = append(ready, d)
		afterSync = append(afterSync, time.Since(start)-syncedAt(t, node.Agent.Log(), start))
		writes = append(writes, e.KernelWrites(t, node))
	}
	res.add("cold start, 250 pods, state present: start → ready", "runs "+spread(ready), "", true)
	res.add("cold start, state present: caches synced → ready", "runs "+spread(afterSync), "≤ 50.00ms", slices.Max(afterSync) <= 50*time.Millisecond)
	res.add("cold start, state present: kernel writes", fmt.Sprint(writes), "0", slices.Max(writes) == 0)

	var converge []time.Duration
	for range *runs {
		e.StopAgent(node)
		netnstest.Exec(t, node.NS, e.Bins.Agent, "cleanup", "--netns-dir", e.NSDir)
		e.LaunchAgent(t, node, "--resync-period", "1h")
		d, ok := waitFor(60*time.Second, func() bool {
			code, _, err := e.Get(node, "/readyz")
			return err == nil && code == 200 && programmed(node.Handle, fakeIP(247))
		})
		if !ok {
			t.Fatalf("agent did not converge on an empty kernel: %s", node.Agent.Log())
		}
		converge = append(converge, d)
	}
	res.add("cold start, 250 pods, empty kernel: start → converged", "runs "+spread(converge), "", true)
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
	fmt.Fprintf(&b, "- date: %s\n- machine: %d cores (%s), kernel %s- Go: %s\n- %s- commit: %s- command: `bash hack/bench.sh`\n- runs per measurement: %d (spread shown as min..max of per-run values)\n\n",
		time.Now().UTC().Format(time.RFC3339), runtime.NumCPU(), cpu, kernel, runtime.Version(), ipt, rev, *runs)
	fmt.Fprintf(&b, "| measurement | value | target | |\n|---|---|---|---|\n")
	for _, r := range res.rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.name, r.value, r.target, r.verdict)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}
