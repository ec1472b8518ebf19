package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// oneNode builds one programmed node with a running test ztunnel and echo
// servers on every pod.
func oneNode(t *testing.T, mutate func(*dataplane.Config)) (*node, *ztunnel) {
	t.Helper()
	_, nodes := cluster(t, 1, 2, 2)
	n := nodes[0]
	z := startZtunnel(t, n.zt)
	n.dp = newDataplane(t, n, mutate)
	echoServers(t, append(append([]*netnstest.Pod{}, n.ambient...), n.plain...)...)
	return n, z
}

// echoServers starts an echo server on every address of each pod.
func echoServers(t *testing.T, pods ...*netnstest.Pod) {
	for _, p := range pods {
		for _, ip := range p.IPs {
			netnstest.EchoServer(t, p.NS, ipPort(ip, echoPort))
		}
	}
}

// families are the two families of the dual-stack test nodes.
var families = []struct {
	name string
	v6   bool
}{{"IPv4", false}, {"IPv6", true}}

// podIP is a pod's address of one family.
func podIP(p *netnstest.Pod, v6 bool) net.IP {
	if v6 {
		return p.IP6
	}
	return p.IP
}

// requireCaptured proves ambient -> ambient goes through z at 15001, for
// every family the pods have.
func requireCaptured(t *testing.T, n *node, z *ztunnel) {
	t.Helper()
	a1, a2 := n.ambient[0], n.ambient[1]
	for i, ip := range a2.IPs {
		src := a1.IPs[i]
		dst := ipPort(ip, echoPort)
		before := len(z.all(t))
		roundTrip(t, a1.NS, dst)
		if _, ok := z.find(t, func(r record.Record) bool {
			return r.Listener == 15001 && hostOf(r.Client) == src.String() && r.OrigDst == dst
		}); !ok || len(z.all(t)) == before {
			t.Fatalf("%s -> %s not captured at 15001: %+v", src, dst, z.all(t))
		}
	}
}

func TestApplyTwiceWritesNothing(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			n, z := oneNode(t, func(c *dataplane.Config) { b.set(c); c.DNSCapture = true })
			first := apply(t, n, n.state(true))
			if first.TotalWrites() == 0 {
				t.Fatal("first apply wrote nothing")
			}
			requireCaptured(t, n, z)
			n.dp.QueueResync() // also read back and compare the iptables chains
			second := apply(t, n, n.state(true))
			if second.TotalWrites() != 0 {
				t.Fatalf("second apply wrote %v:\n%s", second.Writes, strings.Join(second.Changes, "\n"))
			}
			// A fresh agent adopts the state with zero writes too.
			fresh := newDataplane(t, n, func(c *dataplane.Config) { b.set(c); c.DNSCapture = true })
			res, err := fresh.Apply(context.Background(), n.state(true))
			if err != nil || res.TotalWrites() != 0 {
				t.Fatalf("fresh dataplane: writes %v, err %v:\n%s", res.Writes, err, strings.Join(res.Changes, "\n"))
			}
			if diff, err := fresh.Diff(context.Background(), n.state(true)); err != nil || len(diff) != 0 {
				t.Fatalf("diff after convergence: %v %v", diff, err)
			}
		})
	}
}

func TestDriftIsRepaired(t *testing.T) {
	n, z := oneNode(t, func(c *dataplane.Config) { c.Backend = dataplane.BackendIPTables }) // iptables and ipset commands below
	apply(t, n, n.state(true))
	zns := n.zt.NS
	a2 := n.ambient[1].IP.String()
	cases := []struct {
		name string
		ns   string
		cmd  string
	}{
		{"mangle capture rule", n.NS, "iptables -t mangle -D ztunnel-PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100"},
		{"jump from PREROUTING", n.NS, "iptables -t mangle -D PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING"},
		{"jump pushed from position 1", n.NS, "iptables -t mangle -I PREROUTING 1 -j ACCEPT"},
		{"nat chain flushed", n.NS, "iptables -t nat -F ztunnel-PREROUTING"},
		{"ip rule 101", n.NS, "ip rule del pref 101"},
		{"ip rule 0 (ours)", n.NS, "ip rule del pref 0 fwmark 0/0x140 lookup local"},
		{"kernel local rule re-added", n.NS, "ip rule add pref 0 lookup local proto kernel"},
		{"per-pod route", n.NS, "ip route del " + a2 + "/32 table 100"},
		{"table 102 default", n.NS, "ip route del default table 102"},
		{"ipset member", n.NS, "ipset del ztunnel-pods-ips " + a2},
		{"tunnel istioout", n.NS, "ip link del istioout"},
		{"tunnel istioin down", n.NS, "ip link set istioin down"},
		{"static neighbour", n.NS, "ip neigh del 192.168.127.2 dev istioout"},
		{"vxlan fdb entry", n.NS, "bridge fdb del 02:a1:c0:a8:7f:02 dev istioout"},
		{"sysctl rp_filter", n.NS, "sysctl -w net.ipv4.conf.istioin.rp_filter=1"},
		{"IPv6 ip rule 101", n.NS, "ip -6 rule del pref 101"},
		{"IPv6 ip rule 0 (ours)", n.NS, "ip -6 rule del pref 0 fwmark 0/0x140 lookup local"},
		{"IPv6 per-pod route", n.NS, "ip -6 route del " + n.ambient[1].IP6.String() + "/128 table 100"},
		{"IPv6 table 102 default", n.NS, "ip -6 route del default table 102"},
		{"IPv6 ipset member", n.NS, "ipset del ztunnel-pods-ips-v6 " + n.ambient[1].IP6.String()},
		{"IPv6 mangle capture rule", n.NS, "ip6tables -t mangle -D ztunnel-PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips-v6 src -j MARK --set-xmark 0x100/0x100"},
		{"IPv6 tunnel address", n.NS, "ip addr del fd00:a17:126::1/126 dev istioin"},
		{"IPv6 static neighbour", n.NS, "ip -6 neigh del fd00:a17:127::2 dev istioout"},
		{"ztunnel rule 20000", zns, "ip rule del pref 20000"},
		{"ztunnel IPv6 rule 20003", zns, "ip -6 rule del pref 20003"},
		{"ztunnel IPv6 TPROXY chain", zns, "ip6tables -t mangle -F ztunnel-PREROUTING"},
		{"ztunnel local route", zns, "ip route del local default dev lo table 100"},
		{"ztunnel TPROXY chain", zns, "iptables -t mangle -F ztunnel-PREROUTING"},
		{"ztunnel pistioin", zns, "ip link del pistioin"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			netnstest.Exec(t, c.ns, strings.Fields(c.cmd)...)
			n.dp.QueueResync()
			res := apply(t, n, n.state(true))
			if res.TotalWrites() == 0 {
				t.Fatalf("drift %q not repaired (no writes)", c.cmd)
			}
			n.dp.QueueResync()
			if again := apply(t, n, n.state(true)); again.TotalWrites() != 0 {
				t.Fatalf("not converged after repair: %v\n%s", again.Writes, strings.Join(again.Changes, "\n"))
			}
			requireCaptured(t, n, z)
		})
	}
	// The foreign rule inserted above still stands, behind our jump.
	out := netnstest.Exec(t, n.NS, "iptables", "-t", "mangle", "-S", "PREROUTING")
	if !strings.Contains(out, "-A PREROUTING -j ACCEPT") || !strings.HasPrefix(strings.Split(out, "\n")[1], "-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING") {
		t.Fatalf("PREROUTING: want our jump first and the foreign rule kept:\n%s", out)
	}
}

// countingServer accepts on addr in ns and counts connections.
func countingServer(t *testing.T, ns, addr string) *atomic.Int64 {
	var n atomic.Int64
	netnstest.Serve(t, ns, addr, func(c net.Conn) {
		n.Add(1)
		c.Close()
	})
	return &n
}

func TestFailClosedFailsFastAndLeaksNothing(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) { failClosed(t, fam.v6) })
	}
}

func failClosed(t *testing.T, v6 bool) {
	n, z := oneNode(t, nil)
	apply(t, n, n.state(true))
	requireCaptured(t, n, z)
	apply(t, n, n.state(false)) // ztunnel gone

	a1, p1 := n.ambient[0], n.plain[0]
	hits := countingServer(t, p1.NS, ipPort(podIP(p1, v6), 7171))
	nodeIP := n.IP
	if v6 {
		nodeIP = n.IP6
	}
	for _, dst := range []string{ipPort(podIP(p1, v6), 7171), ipPort(podIP(n.ambient[1], v6), echoPort), ipPort(nodeIP, 22)} {
		start := time.Now()
		c, err := netnstest.Dial(a1.NS, "tcp", dst, 3*time.Second)
		took := time.Since(start)
		if err == nil {
			c.Close()
			t.Fatalf("ambient -> %s connected with no ztunnel in fail-closed mode", dst)
		}
		if took > time.Second {
			t.Fatalf("ambient -> %s took %v to fail, want < 1s (%v)", dst, took, err)
		}
	}
	// Inbound to an ambient pod fails fast too.
	start := time.Now()
	if c, err := netnstest.Dial(p1.NS, "tcp", ipPort(podIP(a1, v6), echoPort), 3*time.Second); err == nil {
		c.Close()
		t.Fatal("non-ambient -> ambient connected with no ztunnel in fail-closed mode")
	} else if time.Since(start) > time.Second {
		t.Fatalf("inbound took %v to fail", time.Since(start))
	}
	time.Sleep(100 * time.Millisecond)
	if hits.Load() != 0 {
		t.Fatalf("destination reached %d times with no ztunnel", hits.Load())
	}
	// Non-ambient traffic is unaffected.
	roundTrip(t, p1.NS, ipPort(podIP(n.plain[1], v6), echoPort))

	apply(t, n, n.state(true)) // ztunnel back
	requireCaptured(t, n, z)
}

func TestFailOpenFlowsDirect(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) { failOpen(t, fam.v6) })
	}
}

func failOpen(t *testing.T, v6 bool) {
	n, z := oneNode(t, func(c *dataplane.Config) { c.FailMode = dataplane.FailOpen })
	apply(t, n, n.state(true))
	requireCaptured(t, n, z)
	apply(t, n, n.state(false))
	before := len(z.all(t))
	a1, p1 := n.ambient[0], n.plain[0]
	roundTrip(t, a1.NS, ipPort(podIP(p1, v6), echoPort))
	roundTrip(t, a1.NS, ipPort(podIP(n.ambient[1], v6), echoPort))
	roundTrip(t, p1.NS, ipPort(podIP(a1, v6), echoPort))
	if after := z.all(t); len(after) != before {
		t.Fatalf("fail-open still captured: %+v", after[before:])
	}
	apply(t, n, n.state(true))
	requireCaptured(t, n, z)
}

func TestZtunnelSwitchKeepsPodState(t *testing.T) {
	n, z1 := oneNode(t, nil)
	apply(t, n, n.state(true))
	requireCaptured(t, n, z1)

	zt2 := n.AddPod(t, "ztunnel2")
	if err := os.Symlink(netnstest.NsPath(zt2.NS), filepath.Join(n.nsDir, zt2.NS)); err != nil {
		t.Fatal(err)
	}
	z2 := startZtunnel(t, zt2)
	old := n.zt
	n.zt = zt2
	// Connections opened while the switch is applied must neither fail nor
	// hang (a dropped SYN costs a 1s retransmit). One already open through
	// the old ztunnel may be cut when its packets start reaching the new one:
	// only the connect is judged.
	stop := make(chan struct{})
	slow := make(chan string, 100)
	var clients sync.WaitGroup
	clients.Add(1)
	go func() {
		defer clients.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			start := time.Now()
			c, err := netnstest.Dial(n.ambient[0].NS, "tcp", ipPort(n.ambient[1].IP, echoPort), 3*time.Second)
			if err != nil || time.Since(start) > 500*time.Millisecond {
				slow <- fmt.Sprintf("connect: %v after %s", err, time.Since(start))
			}
			if c != nil {
				c.Close()
			}
		}
	}()
	time.Sleep(50 * time.Millisecond)
	res := apply(t, n, n.state(true))
	time.Sleep(200 * time.Millisecond)
	close(stop)
	clients.Wait()
	close(slow)
	for s := range slow {
		t.Errorf("connection during the switch: %s", s)
	}
	if res.Writes[dataplane.KindIPSet] != 0 {
		t.Fatalf("switch touched ipset members: %v", res.Changes)
	}
	for _, c := range res.Changes {
		for _, p := range n.ambient {
			if strings.Contains(c, p.IP.String()+"/32") {
				t.Fatalf("switch touched a per-pod route: %s", c)
			}
		}
		if strings.Contains(c, "link: del istio") || strings.Contains(c, "link: add istio") {
			t.Fatalf("switch re-created a node tunnel: %s", c)
		}
	}
	requireCaptured(t, n, z2)
	// The old ztunnel's netns no longer intercepts.
	if _, err := netnstest.ExecErr(old.NS, "ip", "link", "show", "pistioin"); err == nil {
		t.Fatal("old ztunnel netns still has pistioin")
	}
}

func TestCleanupLeavesNoResidue(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			c, nodes := cluster(t, 1, 2, 1)
			n := nodes[0]
			// Two slots in use: a surge rollout's old ztunnel next to the new.
			old := n.zt
			n.zt = n.AddPod(t, "ztunnel-new")
			n.nsDir = nsDirFor(t, c)
			nodeBefore := netnstest.Dump(t, n.NS)
			ztBefore := map[string]string{old.NS: netnstest.Dump(t, old.NS), n.zt.NS: netnstest.Dump(t, n.zt.NS)}
			startZtunnel(t, old)
			z := startZtunnel(t, n.zt)
			n.dp = newDataplane(t, n, func(c *dataplane.Config) { b.set(c); c.DNSCapture = true })
			echoServers(t, n.ambient...)
			st := n.state(true)
			st.Ztunnel = ztunnelOf(old)
			apply(t, n, st)
			st.Ztunnel, st.Draining = ztunnelOf(n.zt), []*dataplane.Ztunnel{ztunnelOf(old)}
			apply(t, n, st)
			if rules := netnstest.Exec(t, n.NS, "ip", "rule"); !strings.Contains(rules, "lookup 103") || !strings.Contains(netnstest.Exec(t, n.NS, "ip", "route", "show", "table", "103"), "default") {
				t.Fatalf("slot 1 not in use:\n%s", rules)
			}
			requireCaptured(t, n, z)
			if _, err := n.dp.Cleanup(context.Background()); err != nil {
				t.Fatalf("cleanup: %v", err)
			}
			if after := netnstest.Dump(t, n.NS); after != nodeBefore {
				t.Fatalf("node residue:\n%s", netnstest.LineDiff(nodeBefore, after))
			}
			for ns, before := range ztBefore {
				if after := netnstest.Dump(t, ns); after != before {
					t.Fatalf("ztunnel netns %s residue:\n%s", ns, netnstest.LineDiff(before, after))
				}
			}
			// Traffic flows directly again.
			roundTrip(t, n.ambient[0].NS, ipPort(n.ambient[1].IP, echoPort))
			// A second cleanup is a no-op.
			res, err := n.dp.Cleanup(context.Background())
			if err != nil || res.TotalWrites() != 0 {
				t.Fatalf("second cleanup: %v %v", res.Writes, err)
			}
		})
	}
}

func TestRulePriorityConflictIsRefused(t *testing.T) {
	netnstest.RequireRoot(t)
	c := netnstest.NewCluster(t, 1)
	nn := c.Node(1)
	netnstest.Exec(t, nn.NS, "ip", "rule", "add", "pref", "101", "lookup", "main")
	before := netnstest.Dump(t, nn.NS)
	_, err := dataplane.New(context.Background(), dataplane.DefaultConfig(), dataplane.Options{NodeNetNS: netnstest.NsPath(nn.NS)})
	if err == nil || !strings.Contains(err.Error(), "priority 101") {
		t.Fatalf("want a priority-101 conflict error, got %v", err)
	}
	if after := netnstest.Dump(t, nn.NS); after != before {
		t.Fatalf("refusing touched the kernel:\n%s", netnstest.LineDiff(before, after))
	}
}

func TestIPForwardOffIsAnError(t *testing.T) {
	n, _ := oneNode(t, nil)
	if err := netnstest.SetSysctl(n.NS, "net.ipv4.ip_forward", "0"); err != nil {
		t.Fatal(err)
	}
	before := netnstest.Dump(t, n.NS)
	_, err := n.dp.Apply(context.Background(), n.state(true))
	if err == nil || !strings.Contains(err.Error(), "ip_forward") {
		t.Fatalf("want an ip_forward error, got %v", err)
	}
	if after := netnstest.Dump(t, n.NS); after != before {
		t.Fatalf("apply with ip_forward=0 wrote:\n%s", netnstest.LineDiff(before, after))
	}
}

// Several nodes on one host share /var/run/netns: cleanup of one node must
// leave the other node's ztunnel netns alone.
func TestCleanupTouchesOnlyItsNode(t *testing.T) {
	_, nodes := cluster(t, 2, 2, 0)
	zs := map[*node]*ztunnel{}
	for _, n := range nodes {
		zs[n] = startZtunnel(t, n.zt)
		n.dp = newDataplane(t, n, nil)
		echoServers(t, n.ambient...)
		apply(t, n, n.state(true))
	}
	if _, err := nodes[0].dp.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	requireCaptured(t, nodes[1], zs[nodes[1]])
	n2 := nodes[1]
	n2.dp.QueueResync()
	if res := apply(t, n2, n2.state(true)); res.TotalWrites() != 0 {
		t.Fatalf("node1's cleanup changed node2: %v", res.Changes)
	}
}
