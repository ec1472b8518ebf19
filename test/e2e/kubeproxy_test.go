package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

const (
	kubeProxyVIP  = "10.96.100.10" // inside cluster.ServiceClusterIPRange
	kubeProxyPort = 80
	// Far longer than the test: the periodic resync must not be what puts
	// our jumps first again (the harness's 2 s default would hide that).
	kubeProxyAgentResync = "10m"
	// A connection to the VIP must be captured with the VIP as original
	// destination within this long after the VIP first answers ...
	vipCapturedWithin = 2 * time.Second
	// ... and stay so for at least this long after that deadline.
	vipHold = 3 * time.Second
	// kube-proxy needs a few seconds to start and sync.
	vipAnswerTimeout = 60 * time.Second
	// Counts the agent's writes that put back what others changed.
	driftRepairsMetric = "ambient_redirect_drift_repairs_total"
)

// TestKubeProxy (issue 8): a real kube-proxy (iptables mode) started after
// the agent inserts its KUBE-SERVICES jump at position 1 of nat PREROUTING,
// ahead of ours. Until ours is first again, captured connections to a
// ClusterIP are DNATed before capture and ztunnel sees the endpoint instead
// of the VIP. The agent must put its jumps first again within 2 s, without
// waiting for its periodic resync.
func TestKubeProxy(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	client := e.RunPod(t, n, harness.AmbientNS, "client")
	server := e.RunPod(t, n, harness.AmbientNS, "server")
	// Our jumps' positions are the iptables backend's (the nftables one is
	// TestServiceVIPsEveryKubeProxyMode's).
	e.StartAgent(t, n, "--resync-period", kubeProxyAgentResync, "--backend", "iptables")
	harness.Eventually(t, 5*time.Second, func() error { return harness.Captured(t, n.ZT, 15001, client, server) })
	if b := fmt.Sprint(e.State(t, n).IPTables["backend"]); b != "nft" {
		t.Fatalf("agent uses iptables %q; kube-proxy uses the netns's default (nft): they would not share chains", b)
	}
	e.CreateService(t, harness.AmbientNS, "echo", kubeProxyVIP, kubeProxyPort, server)
	p := vipProber{e: e, n: n, from: client,
		vip: harness.Hostport(kubeProxyVIP, kubeProxyPort), endpoint: harness.Hostport(server.IP, harness.EchoPort)}

	launched := time.Now()
	kp := e.LaunchKubeProxy(t, n)
	t.Run("kube-proxy started after the agent", func(t *testing.T) {
		p.run(t, kp, launched, true)
	})

	t.Run("kube-proxy restarted after --cleanup inserts its jump first again", func(t *testing.T) {
		kp.Stop(t)
		// A plain restart finds its jump and leaves it where it is
		// (EnsureRule checks before inserting); after --cleanup, as on a
		// fresh node or a mode switch, it inserts it at position 1 again.
		kp.Cleanup(t)
		if kubeServicesJump(harness.ChainRules(t, n, "nat", "PREROUTING")) > 0 {
			t.Fatal("kube-proxy --cleanup left its jump in nat PREROUTING")
		}
		restarted := time.Now()
		kp.Start(t)
		p.run(t, kp, restarted, true)
	})

	// The usual restart: its first full sync rewrites its chains but must
	// not cost us position 1.
	t.Run("kube-proxy restarted with its rules in place", func(t *testing.T) {
		kp.Stop(t)
		restarted := time.Now()
		kp.Start(t)
		kp.WaitHealthy(t, vipAnswerTimeout)
		t.Logf("kube-proxy healthy %s after the restart", time.Since(restarted).Round(time.Millisecond))
		p.run(t, kp, restarted, false)
	})
}

// vipProber connects from an ambient pod to a ClusterIP over and over and
// asks the node's ztunnel what it saw as each connection's original
// destination.
type vipProber struct {
	e            *harness.Env
	n            *harness.Node
	from         *harness.Pod
	vip          string // ClusterIP:port
	endpoint     string // the Service's only endpoint, podIP:EchoPort
	payloadCount int
}

// run probes from since until the VIP answers, then for
// vipCapturedWithin+vipHold more, and checks that a connection to the VIP
// was captured with the VIP as original destination within
// vipCapturedWithin of the first answer and every one after it too, and
// that our jump is first in nat PREROUTING (and in every other chain) at
// the end. Timings are relative to since. With inserted, kube-proxy puts its
// jump first in this phase: that must be seen (in the rules or as an agent
// repair), or the phase proved nothing.
func (p *vipProber) run(t *testing.T, kp *cluster.KubeProxy, since time.Time, inserted bool) {
	t.Helper()
	repairsBefore := p.e.Metric(t, p.n, driftRepairsMetric)
	if pid, ok := kp.Running(); ok {
		t.Logf("kube-proxy pid %d", pid)
	}
	var (
		answered, viaVIP         time.Time // first answer; first captured with the VIP
		kpFirst, oursFirstAgain  time.Time // nat PREROUTING rule 1: kube-proxy's; ours after that
		probes, dnated, regress  int
		failedAfter, notCaptured int
		lastFailure              error
		origs                    = map[string]int{}
	)
	rel := func(at time.Time) string {
		if at.IsZero() {
			return "never"
		}
		return "+" + at.Sub(since).Round(time.Millisecond).String()
	}
	for {
		start := time.Now()
		// Short until the VIP answers: a probe whose upstream SYN hit no
		// rules waits for a 1 s retransmit and would blur when it answered.
		timeout := 2 * time.Second
		if answered.IsZero() {
			timeout = 250 * time.Millisecond
		}
		orig, err := p.probe(t, timeout)
		end := time.Now()
		probes++
		rules := harness.ChainRules(t, p.n, "nat", "PREROUTING")
		switch {
		case len(rules) > 0 && kubeServicesJump(rules) == 1:
			if kpFirst.IsZero() {
				kpFirst = time.Now()
			}
		case len(rules) > 0 && harness.IsOurJump(rules[0]):
			if !kpFirst.IsZero() && oursFirstAgain.IsZero() {
				oursFirstAgain = time.Now()
			}
		}
		switch {
		case answered.IsZero() && err == nil:
			// Not judged: it may have started before kube-proxy's rules
			// existed and got through on a SYN retransmit.
			answered = end
			t.Logf("VIP answered %s (that probe took %s; ztunnel saw %q)", rel(answered), end.Sub(start).Round(time.Millisecond), orig)
		case answered.IsZero():
			// not answering yet
		case err != nil:
			failedAfter++
			lastFailure = err
		default:
			origs[orig]++
			switch orig {
			case p.vip:
				if viaVIP.IsZero() {
					viaVIP = start
				}
			case "":
				notCaptured++
			default:
				dnated++
				if !viaVIP.IsZero() {
					regress++
				}
			}
		}
		if answered.IsZero() && time.Since(since) > vipAnswerTimeout {
			t.Fatalf("%s never answered within %s (last probe: %v)\nkube-proxy log:\n%s", p.vip, vipAnswerTimeout, err, kp.Log())
		}
		if !answered.IsZero() && time.Since(answered) > vipCapturedWithin+vipHold {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}

	var seen []string
	for o, c := range origs {
		if o == "" {
			o = "(not captured)"
		}
		seen = append(seen, fmt.Sprintf("%s x%d", o, c))
	}
	sort.Strings(seen)
	t.Logf("timeline (sampled once per probe): VIP answered %s, first captured with the VIP %s; rule 1 of nat PREROUTING seen kube-proxy's %s, ours again %s",
		rel(answered), rel(viaVIP), rel(kpFirst), rel(oursFirstAgain))
	t.Logf("%d probes; ztunnel saw as original destination: %s; DNATed before capture: %d (%d after the first VIP capture); failed after the first answer: %d",
		probes, strings.Join(seen, ", "), dnated, regress, failedAfter)

	switch {
	case viaVIP.IsZero():
		t.Errorf("no connection to %s was captured with the VIP as original destination in the %s after it answered: ztunnel saw %s (the endpoint is %s: DNATed by kube-proxy before capture)",
			p.vip, vipCapturedWithin+vipHold, strings.Join(seen, ", "), p.endpoint)
	case viaVIP.Sub(answered) > vipCapturedWithin:
		t.Errorf("first connection captured with the VIP %s after the VIP answered, want <= %s", viaVIP.Sub(answered).Round(time.Millisecond), vipCapturedWithin)
	default:
		t.Logf("captured with the VIP %s after the VIP answered", viaVIP.Sub(answered).Round(time.Millisecond))
	}
	if regress > 0 {
		t.Errorf("%d connections DNATed before capture after one was captured with the VIP", regress)
	}
	if notCaptured > 0 {
		t.Errorf("%d connections from the ambient pod to the VIP were not captured", notCaptured)
	}
	if failedAfter > 0 {
		t.Errorf("%d connections to the VIP failed after it first answered; last: %v", failedAfter, lastFailure)
	}

	rules := harness.ChainRules(t, p.n, "nat", "PREROUTING")
	if kubeServicesJump(rules) == 0 {
		t.Errorf("kube-proxy's jump is missing from nat PREROUTING:\n%s", strings.Join(rules, "\n"))
	}
	if len(rules) == 0 || !harness.IsOurJump(rules[0]) {
		t.Errorf("our jump is not first in nat PREROUTING:\n%s", strings.Join(rules, "\n"))
	}
	pos := harness.JumpPositions(t, p.n)
	for chain, at := range pos {
		if at != 1 {
			t.Errorf("our jump is at position %d of %s, want 1", at, chain)
		}
	}
	t.Logf("our jumps' positions: %v", pos)

	repairs := p.e.Metric(t, p.n, driftRepairsMetric) - repairsBefore
	t.Logf("agent repairs (%s) in this phase: %v", driftRepairsMetric, repairs)
	t.Logf("from the logs: %s", logTimeline(kp, p.n, since))
	if inserted && kpFirst.IsZero() && repairs == 0 {
		t.Errorf("kube-proxy's jump was never seen ahead of ours and the agent repaired nothing: nothing was tested")
	}
}

// probe connects to the VIP, round-trips bytes (timeout bounds each of
// dial and exchange), and returns the original destination the ztunnel
// recorded at 15001 for that very connection ("" if it recorded none within
// a second).
func (p *vipProber) probe(t testing.TB, timeout time.Duration) (string, error) {
	c, err := netnstest.Dial(p.from.Net.NS, "tcp", p.vip, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	local := c.LocalAddr().String()
	p.payloadCount++
	payload := fmt.Sprintf("kube-proxy e2e probe %d from %s", p.payloadCount, local)
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, payload); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return "", fmt.Errorf("close write: %w", err)
		}
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return "", fmt.Errorf("read: %w", err)
	}
	if string(got) != payload {
		return "", fmt.Errorf("echo: got %d bytes back, want %d", len(got), len(payload))
	}
	deadline := time.Now().Add(time.Second)
	for {
		for _, r := range p.n.ZT.Records(t) {
			if r.Listener == 15001 && r.Client == local {
				return r.OrigDst, nil
			}
		}
		if time.Now().After(deadline) {
			return "", nil
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kubeServicesJump is the 1-based position of kube-proxy's KUBE-SERVICES
// jump among rules (`iptables -S` lines), 0 if absent.
func kubeServicesJump(rules []string) int {
	for i, r := range rules {
		if strings.HasSuffix(r, " -j KUBE-SERVICES") {
			return i + 1
		}
	}
	return 0
}

// logTimeline is information only: when kube-proxy started each IPv4 sync
// (it inserts its jumps at the start of one) and when the agent's watcher
// logged a repair, after since.
func logTimeline(kp *cluster.KubeProxy, n *harness.Node, since time.Time) string {
	type event struct {
		at   time.Time
		what string
	}
	var events []event
	// klog: "I1202 03:37:20.377890   16680 proxier.go:763] \"Syncing iptables rules\" ipFamily=\"IPv4\" ..."
	if b, err := os.ReadFile(kp.LogPath()); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if !strings.Contains(l, `"Syncing iptables rules" ipFamily="IPv4"`) || len(l) < 21 {
				continue
			}
			clock, err := time.ParseInLocation("15:04:05.000000", l[6:21], time.Local)
			if err != nil {
				continue
			}
			y, m, d := since.Date()
			at := time.Date(y, m, d, clock.Hour(), clock.Minute(), clock.Second(), clock.Nanosecond(), time.Local)
			if at.After(since) {
				events = append(events, event{at, "kube-proxy sync"})
			}
		}
	}
	for _, l := range strings.Split(n.Agent.Log(), "\n") {
		var entry struct {
			TS  string `json:"ts"`
			Msg string `json:"msg"`
		}
		if json.Unmarshal([]byte(l), &entry) != nil || !strings.Contains(entry.Msg, "repaired") {
			continue
		}
		if at, err := time.Parse(time.RFC3339Nano, entry.TS); err == nil && at.After(since) {
			events = append(events, event{at, "agent: " + entry.Msg})
		}
	}
	if len(events) == 0 {
		return "nothing found"
	}
	sort.Slice(events, func(i, j int) bool { return events[i].at.Before(events[j].at) })
	var out []string
	for _, ev := range events {
		out = append(out, fmt.Sprintf("+%s %s", ev.at.Sub(since).Round(time.Millisecond), ev.what))
	}
	return strings.Join(out, "; ")
}

// TestKubeProxyNFTablesMode: an agent started before kube-proxy (as on a
// booting node) finds no kube-proxy table and, with --backend auto, picks
// iptables; once the real kube-proxy runs in nftables mode it switches to
// nftables at its next full sync (the periodic resync at the latest):
// ambient pods stay captured throughout, a non-ambient client's
// connection to a ClusterIP is balanced by kube-proxy, and from then on an
// ambient client's reaches ztunnel with the VIP (issue 19).
func TestKubeProxyNFTablesMode(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	client := e.RunPod(t, n, harness.AmbientNS, "client")
	server := e.RunPod(t, n, harness.AmbientNS, "server")
	plain := e.RunPod(t, n, harness.PlainNS, "plain")
	e.StartAgent(t, n, "--backend", "auto") // resync 2s
	if b := fmt.Sprint(e.State(t, n).Backend["name"]); b != "iptables" {
		t.Fatalf("backend %s before kube-proxy runs", b)
	}
	e.CreateService(t, harness.AmbientNS, "echo", kubeProxyVIP, kubeProxyPort, server)
	kp := e.LaunchKubeProxyMode(t, n, "nftables")
	kp.WaitHealthy(t, vipAnswerTimeout)
	harness.Eventually(t, vipAnswerTimeout, func() error {
		if out := netnstest.Exec(t, n.NS, "nft", "list", "tables"); !strings.Contains(out, "kube-proxy") {
			return fmt.Errorf("kube-proxy in nftables mode has no table yet:\n%s\nkube-proxy log:\n%s", out, kp.Log())
		}
		return nil
	})
	appeared := time.Now()
	vip := harness.Hostport(kubeProxyVIP, kubeProxyPort)
	harness.Eventually(t, 10*time.Second, func() error {
		return harness.RoundTrip(plain, vip) // kube-proxy balances it
	})
	if err := harness.Captured(t, n.ZT, 15001, client, server); err != nil {
		t.Fatalf("ambient capture with kube-proxy in nftables mode: %v", err)
	}
	harness.Eventually(t, 10*time.Second, func() error {
		st := e.State(t, n)
		if b := fmt.Sprint(st.Backend["name"]); b != "nftables" {
			return fmt.Errorf("backend %s (%v), warning %v", b, st.Backend["reason"], st.Backend["warning"])
		}
		return nil
	})
	st := e.State(t, n)
	t.Logf("switched %s after kube-proxy's table appeared: %v", time.Since(appeared).Round(time.Millisecond), st.Backend["reason"])
	if w, ok := st.Backend["warning"]; ok {
		t.Errorf("warning after the switch: %v", w)
	}
	if out := netnstest.Exec(t, n.NS, "iptables-save"); strings.Contains(out, "ztunnel-") {
		t.Errorf("iptables chains of ours left after the switch:\n%s", out)
	}
	p := vipProber{e: e, n: n, from: client, vip: vip, endpoint: harness.Hostport(server.IP, harness.EchoPort)}
	harness.Eventually(t, 5*time.Second, func() error {
		if orig, err := p.probe(t, time.Second); err != nil || orig != vip {
			return fmt.Errorf("ambient client -> %s: ztunnel saw %q (%v)", vip, orig, err)
		}
		return nil
	})
}
