package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/coexist"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// outcome is what became of one probe connection.
type outcome string

const (
	captured outcome = "captured" // a ztunnel accepted it
	direct   outcome = "direct"   // the destination saw the client's own address and port
	reset    outcome = "reset"    // refused (RST) within resetWithin
	stalled  outcome = "stalled"  // no answer, or an error that took too long
	// both: the destination saw the client's own address and a ztunnel
	// recorded that client too (a reused port): it proves neither.
	both outcome = "captured or direct"
)

const (
	probeEvery  = 15 * time.Millisecond
	probeWait   = 500 * time.Millisecond
	resetWithin = 250 * time.Millisecond
)

// allowed is the set of outcomes a capture state permits.
type allowed map[outcome]bool

func allow(os ...outcome) allowed {
	a := allowed{}
	for _, o := range os {
		a[o] = true
	}
	return a
}

// timeline records which outcomes were allowed when: a transition allows the
// union of the states on both sides while it is being written.
type timeline struct {
	mu   sync.Mutex
	segs []segment
}

type segment struct {
	from, to time.Time // to is zero for the current segment
	ok       allowed
	what     string
}

func (tl *timeline) set(what string, ok allowed) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	now := time.Now()
	if n := len(tl.segs); n > 0 {
		tl.segs[n-1].to = now
	}
	tl.segs = append(tl.segs, segment{from: now, ok: ok, what: what})
}

// transition runs f while both the current state and next are allowed.
func (tl *timeline) transition(t *testing.T, what string, next allowed, f func() error) {
	t.Helper()
	tl.mu.Lock()
	cur := tl.segs[len(tl.segs)-1].ok
	tl.mu.Unlock()
	// While it is written, a connection may see either side, or be reset
	// fast if it was mid-handshake through a ztunnel being taken away:
	// never leak, never stall.
	both := allowed{reset: true}
	for o := range cur {
		both[o] = true
	}
	for o := range next {
		both[o] = true
	}
	tl.set(what+" (writing)", both)
	if err := f(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	tl.set(what, next)
}

// at returns what was allowed at any moment of [from, to], and the names of
// the segments.
func (tl *timeline) at(from, to time.Time) (allowed, []string) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	ok := allowed{}
	var names []string
	for _, s := range tl.segs {
		if s.from.After(to) || (!s.to.IsZero() && s.to.Before(from)) {
			continue
		}
		for o := range s.ok {
			ok[o] = true
		}
		names = append(names, s.what)
	}
	return ok, names
}

// sightings records the remote address of every connection a server accepted.
type sightings struct {
	mu   sync.Mutex
	seen map[string][]time.Time
}

// saw reports a connection from a accepted within the life of probe p:
// client ports are reused within a run.
func (s *sightings) saw(a string, p probe) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return within(s.seen[a], p)
}

// within reports whether one of ts falls in p's lifetime.
func within(ts []time.Time, p probe) bool {
	for _, t := range ts {
		if !t.Before(p.start) && t.Before(p.start.Add(p.took+2*probeWait)) {
			return true
		}
	}
	return false
}

// sightingEcho is an echo server that remembers who connected.
func sightingEcho(t *testing.T, ns, addr string) *sightings {
	s := &sightings{seen: map[string][]time.Time{}}
	netnstest.Serve(t, ns, addr, func(c net.Conn) {
		s.mu.Lock()
		s.seen[c.RemoteAddr().String()] = append(s.seen[c.RemoteAddr().String()], time.Now())
		s.mu.Unlock()
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 64)
			if n, err := c.Read(buf); err == nil {
				_, _ = c.Write(buf[:n])
			}
		}()
	})
	return s
}

// probe is one connection attempt.
type probe struct {
	stream string
	start  time.Time
	took   time.Duration
	local  string
	echoed bool
	err    error
}

// stream dials from ns to dst every probeEvery, connections overlapping.
type stream struct {
	name string
	ns   string
	dst  string
	seen *sightings

	mu     sync.Mutex
	probes []probe
}

func (s *stream) run(stop <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	tick := time.NewTicker(probeEvery)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := probe{stream: s.name, start: time.Now()}
			c, err := netnstest.Dial(s.ns, "tcp", s.dst, probeWait)
			p.took, p.err = time.Since(p.start), err
			if err == nil {
				p.local = c.LocalAddr().String()
				_ = c.SetDeadline(time.Now().Add(probeWait))
				_, _ = c.Write([]byte("probe\n"))
				_, rerr := c.Read(make([]byte, 16))
				p.echoed = rerr == nil
				_ = c.Close()
			}
			s.mu.Lock()
			s.probes = append(s.probes, p)
			s.mu.Unlock()
		}()
	}
}

// TestTransitionsNeverLeak drives the dataplane through every capture
// transition many times while clients dial every 15 ms, and classifies every
// connection: captured by a ztunnel, reset fast, or reaching its destination
// directly — which only fail-open without a ztunnel, or cleanup, allows.
func TestTransitionsNeverLeak(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) { transitions(t, fam.v6) })
	}
}

// TestTransitionsNeverLeakCoexist is the same with the marks, priorities
// and tables documented for running next to Cilium, on a node with
// Cilium's rules, routes and marks.
func TestTransitionsNeverLeakCoexist(t *testing.T) {
	transitionsWith(t, false, func(n *node) {
		coexist.Cilium(n.ambient[1].IP.String()).Write(t, n.NS)
	}, func(c *dataplane.Config) { coexist.Settings(c); c.IPTablesMode = dataplane.IPTablesNFT })
}

func transitions(t *testing.T, v6 bool) { transitionsWith(t, v6, nil, nil) }

// transitionsWith runs the transitions on a node that setup prepares,
// with every agent configured by mutate.
func transitionsWith(t *testing.T, v6 bool, setup func(*node), mutate func(*dataplane.Config)) {
	const rounds = 10
	_, nodes := cluster(t, 1, 3, 1)
	n := nodes[0]
	if setup != nil {
		setup(n)
	}
	a1, a2, a3, p1 := n.ambient[0], n.ambient[1], n.ambient[2], n.plain[0]
	n.ambient = []*netnstest.Pod{a1, a2} // a3 joins and leaves
	// Clients take ports apart from the ztunnels' (which dial upstream with
	// the client's IP): otherwise a direct connection can reuse the 4-tuple
	// a ztunnel just left in TIME_WAIT, and be judged by its ghost.
	for _, p := range []*netnstest.Pod{a1, a2, a3, p1} {
		if err := netnstest.SetSysctl(p.NS, "net.ipv4.ip_local_port_range", "20000 29999"); err != nil {
			t.Fatal(err)
		}
	}
	// A fail-mode change is an agent restart with other flags: a new
	// Dataplane that knows only what it reads back.
	restart := func(mode dataplane.FailMode) *dataplane.Dataplane {
		return newDataplane(t, n, func(c *dataplane.Config) {
			if mutate != nil {
				mutate(c)
			}
			c.FailMode = mode
		})
	}
	dp := restart(dataplane.FailClosed)
	// An agent restarted with the other backend (fail closed).
	restartWith := func(b dataplane.Backend) *dataplane.Dataplane {
		return newDataplane(t, n, func(c *dataplane.Config) {
			if mutate != nil {
				mutate(c)
			}
			c.Backend = b
		})
	}
	first, _ := dp.Backend()
	other := map[dataplane.Backend]dataplane.Backend{dataplane.BackendIPTables: dataplane.BackendNFTables, dataplane.BackendNFTables: dataplane.BackendIPTables}[first]
	var zts []*ztunnel
	startZt := func(name string) *ztunnel {
		pod := n.AddPod(t, name)
		if err := os.Symlink(netnstest.NsPath(pod.NS), filepath.Join(n.nsDir, pod.NS)); err != nil {
			t.Fatal(err)
		}
		z := startZtunnel(t, pod)
		zts = append(zts, z)
		return z
	}
	cur := startZt("zt0")
	n.zt = cur.pod

	streams := []*stream{
		{name: "ambient->ambient", ns: a1.NS, dst: ipPort(podIP(a2, v6), echoPort), seen: sightingEcho(t, a2.NS, ipPort(podIP(a2, v6), echoPort))},
		{name: "plain->ambient", ns: p1.NS, dst: ipPort(podIP(a1, v6), echoPort)},
		{name: "ambient->plain", ns: a2.NS, dst: ipPort(podIP(p1, v6), echoPort), seen: sightingEcho(t, p1.NS, ipPort(podIP(p1, v6), echoPort))},
	}
	streams[1].seen = sightingEcho(t, a1.NS, ipPort(podIP(a1, v6), echoPort))

	state := func(zt *ztunnel, withA3 bool) dataplane.State {
		n.ambient = []*netnstest.Pod{a1, a2}
		if withA3 {
			n.ambient = append(n.ambient, a3)
		}
		n.zt = nil
		if zt != nil {
			n.zt = zt.pod
		}
		return n.state(zt != nil)
	}
	ctx := context.Background()
	applyWith := func(d *dataplane.Dataplane, st dataplane.State) func() error {
		return func() error {
			dp = d
			_, err := d.Apply(ctx, st)
			return err
		}
	}
	viaZtunnel, failClosed, failOpen := allow(captured), allow(reset), allow(direct)

	var tl timeline
	tl.set("no agent yet", failOpen)
	tl.transition(t, "first apply", viaZtunnel, applyWith(dp, state(cur, false)))

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, s := range streams {
		wg.Add(1)
		go s.run(stop, &wg)
	}
	settle := func() { time.Sleep(60 * time.Millisecond) }
	for i := range rounds {
		// Surge: a new ztunnel (new IP, new netns) next to the running one.
		// The old one keeps its connections (slot) while it runs.
		next := startZt(fmt.Sprintf("zt%d", i+1))
		surge := func(withA3 bool) dataplane.State {
			st := state(next, withA3)
			st.Draining = []*dataplane.Ztunnel{ztunnelOf(cur.pod)}
			return st
		}
		tl.transition(t, "ztunnel A -> B (surge)", viaZtunnel, applyWith(dp, surge(false)))
		settle()
		tl.transition(t, "pod joins", viaZtunnel, applyWith(dp, surge(true)))
		settle()
		tl.transition(t, "pod leaves", viaZtunnel, applyWith(dp, surge(false)))
		settle()
		// The old one goes away for good: process killed, netns removed.
		cur.proc.Stop()
		cur.pod.Delete(t)
		cur = next
		tl.transition(t, "ztunnel -> none (closed)", failClosed, applyWith(dp, state(nil, false)))
		settle()
		tl.transition(t, "pod joins, no ztunnel", failClosed, applyWith(dp, state(nil, true)))
		settle()
		tl.transition(t, "pod leaves, no ztunnel", failClosed, applyWith(dp, state(nil, false)))
		settle()
		tl.transition(t, "fail closed -> open", failOpen, applyWith(restart(dataplane.FailOpen), state(nil, false)))
		settle()
		tl.transition(t, "fail open -> closed", failClosed, applyWith(restart(dataplane.FailClosed), state(nil, false)))
		settle()
		tl.transition(t, "none -> ztunnel", viaZtunnel, applyWith(dp, state(cur, false)))
		settle()
		if i%2 == 0 {
			// Fail-open with a ztunnel, then the ztunnel goes: capture stops.
			tl.transition(t, "fail-open agent adopts", viaZtunnel, applyWith(restart(dataplane.FailOpen), state(cur, false)))
			settle()
			tl.transition(t, "ztunnel -> none (open)", failOpen, applyWith(dp, state(nil, false)))
			settle()
			tl.transition(t, "none -> ztunnel (open)", viaZtunnel, applyWith(dp, state(cur, false)))
			settle()
			tl.transition(t, "fail-closed agent adopts", viaZtunnel, applyWith(restart(dataplane.FailClosed), state(cur, false)))
			settle()
			// A backend switch writes the new backend's rules before it
			// removes the old one's: no gap, and nothing of the old left.
			for _, b := range []dataplane.Backend{other, first} {
				tl.transition(t, "agent restarted with backend "+string(b), viaZtunnel, applyWith(restartWith(b), state(cur, false)))
				requireOnlyBackend(t, n, b)
				settle()
			}
		} else {
			tl.transition(t, "cleanup", failOpen, func() error { _, err := dp.Cleanup(ctx); return err })
			settle()
			tl.transition(t, "apply after cleanup", viaZtunnel, applyWith(dp, state(cur, false)))
			settle()
		}
	}
	close(stop)
	wg.Wait()
	time.Sleep(200 * time.Millisecond) // the servers' last accepts

	captures := map[string][]time.Time{}
	for _, z := range zts {
		for _, r := range z.all(t) {
			at, err := time.Parse(time.RFC3339Nano, r.Time)
			if err != nil {
				t.Fatalf("record time %q: %v", r.Time, err)
			}
			captures[r.Client] = append(captures[r.Client], at)
		}
	}
	counts := map[outcome]int{}
	var bad []string
	escapes := 0
	for _, s := range streams {
		for _, p := range s.probes {
			o := classify(p, s.seen, captures)
			counts[o]++
			ok, segs := tl.at(p.start, p.start.Add(p.took))
			if ok[o] || o == both && (ok[captured] || ok[direct]) {
				continue
			}
			if o == direct {
				escapes++
			}
			bad = append(bad, fmt.Sprintf("%s %s at +%v: %s after %v (err %v, echoed %v, recorded %v, seen %v) during %s", p.stream, p.local,
				p.start.Sub(tl.segs[0].from).Round(time.Millisecond), o, p.took.Round(time.Millisecond), p.err, p.echoed, within(captures[p.local], p), s.seen.saw(p.local, p), strings.Join(segs, " / ")))
		}
	}
	t.Logf("%d transitions, outcomes %v, escapes %d", len(tl.segs), counts, escapes)
	if nbad := len(bad); nbad > 0 {
		if nbad > 40 {
			bad = append(bad[:40], fmt.Sprintf("... and %d more", len(bad)-40))
		}
		t.Fatalf("%d connections (%d escaped capture) had an outcome their state does not allow:\n%s", nbad, escapes, strings.Join(bad, "\n"))
	}
	if counts[captured] == 0 || counts[reset] == 0 || counts[direct] == 0 {
		t.Fatalf("every outcome must occur for the test to mean anything: %v", counts)
	}
}

func classify(p probe, seen *sightings, captures map[string][]time.Time) outcome {
	switch {
	case p.err == nil && within(captures[p.local], p) && seen.saw(p.local, p):
		return both
	case p.err == nil && within(captures[p.local], p):
		return captured
	case p.err == nil && seen.saw(p.local, p):
		return direct
	case p.err == nil:
		// Accepted, but not by the destination: only a ztunnel's TPROXY
		// listener accepts for another address (its record may be lost if
		// it was killed before writing it).
		return captured
	case (errors.Is(p.err, syscall.ECONNREFUSED) || errors.Is(p.err, syscall.ECONNRESET)) && p.took < resetWithin:
		// A reset before or right after the handshake: failed fast.
		return reset
	}
	return stalled
}

// requireOnlyBackend fails unless the node holds rules of backend b alone.
func requireOnlyBackend(t *testing.T, n *node, b dataplane.Backend) {
	t.Helper()
	_, err := netnstest.ExecErr(n.NS, "nft", "list", "table", "inet", dataplane.NFTTable)
	hasNFT := err == nil
	var ipt []string
	for _, save := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		if strings.Contains(netnstest.Exec(t, n.NS, save), dataplane.ChainPrefix) {
			ipt = append(ipt, save)
		}
	}
	ipsets := strings.Contains(netnstest.Exec(t, n.NS, "ipset", "list", "-n"), "ztunnel-pods-ips")
	switch {
	case b == dataplane.BackendNFTables && (!hasNFT || len(ipt) > 0 || ipsets):
		t.Fatalf("after a switch to nftables: our table %v, iptables chains in %v, ipsets %v", hasNFT, ipt, ipsets)
	case b == dataplane.BackendIPTables && (hasNFT || len(ipt) == 0 || !ipsets):
		t.Fatalf("after a switch to iptables: our nftables table %v, iptables chains in %v, ipsets %v", hasNFT, ipt, ipsets)
	}
}
