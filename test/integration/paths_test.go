package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

const echoPort = 8080

// TestPacketPaths programs two ptp nodes and proves each packet path of the
// reference with real sockets through the test ztunnel, for IPv4 and IPv6
// on dual-stack nodes and for IPv6 on IPv6-only ones.
func TestPacketPaths(t *testing.T) {
	for _, c := range []struct {
		name string
		fam  netnstest.Family
		v6   bool
	}{
		{"dual-stack, IPv4", netnstest.DualStack, false},
		{"dual-stack, IPv6", netnstest.DualStack, true},
		{"IPv6-only", netnstest.IPv6Only, true},
	} {
		t.Run(c.name, func(t *testing.T) { packetPaths(t, c.fam, c.v6) })
	}
}

func packetPaths(t *testing.T, fam netnstest.Family, v6 bool) {
	packetPathsWith(t, fam, v6, nil, nil)
}

// packetPathsWith is packetPaths on nodes that setup prepares (another
// agent's state, say) before the dataplane, configured by mutate, starts;
// it returns the nodes.
func packetPathsWith(t *testing.T, fam netnstest.Family, v6 bool, setup func(*node), mutate func(*dataplane.Config)) []*node {
	_, nodes := clusterOf(t, fam, 2, 2, 2)
	n1, n2 := nodes[0], nodes[1]
	// ip is a pod's address of the family under test.
	ip := func(p *netnstest.Pod) net.IP {
		if v6 {
			return p.IP6
		}
		return p.IP
	}
	zt := map[*node]*ztunnel{}
	for i, n := range nodes {
		other := nodes[1-i]
		var cidrs []string
		for _, c := range other.PodCIDRs {
			cidrs = append(cidrs, c.String())
		}
		zt[n] = startZtunnel(t, n.zt, cidrs...)
		if setup != nil {
			setup(n)
		}
		n.dp = newDataplane(t, n, mutate)
		apply(t, n, n.state(true))
		for _, p := range append(append([]*netnstest.Pod{}, n.ambient...), n.plain...) {
			netnstest.EchoServer(t, p.NS, ipPort(ip(p), echoPort))
			netnstest.UDPEcho(t, p.NS, ipPort(ip(p), echoPort))
		}
	}
	netnstest.EchoServer(t, n1.NS, ipPort(unspecified(v6), 9090)) // a hostNetwork service

	a1, a2 := n1.ambient[0], n1.ambient[1]
	p1, p2 := n1.plain[0], n1.plain[1]
	remote := n2.ambient[0]

	captured := func(z *ztunnel, listener int, client net.IP, dst string) func(record.Record) bool {
		return func(r record.Record) bool {
			return r.Listener == listener && hostOf(r.Client) == client.String() && r.OrigDst == dst && r.DialError == ""
		}
	}
	notSeen := func(t *testing.T, dst net.IP) {
		t.Helper()
		for z := range zt {
			for _, r := range zt[z].all(t) {
				if hostOf(r.OrigDst) == dst.String() || hostOf(r.Target) == dst.String() {
					t.Fatalf("connection to %s was captured: %+v", dst, r)
				}
			}
		}
	}

	t.Run("ambient to ambient same node is captured at 15001", func(t *testing.T) {
		dst := ipPort(ip(a2), echoPort)
		roundTrip(t, a1.NS, dst)
		if _, ok := zt[n1].find(t, captured(zt[n1], 15001, ip(a1), dst)); !ok {
			t.Fatalf("no 15001 record for %s -> %s: %+v", ip(a1), dst, zt[n1].all(t))
		}
	})

	t.Run("ambient to ambient cross node is captured on both nodes", func(t *testing.T) {
		dst := ipPort(ip(remote), echoPort)
		roundTrip(t, a1.NS, dst)
		r, ok := zt[n1].find(t, captured(zt[n1], 15001, ip(a1), dst))
		if !ok || !r.HBONE {
			t.Fatalf("node1 ztunnel: want a 15001 HBONE record for %s -> %s: %+v", ip(a1), dst, zt[n1].all(t))
		}
		if _, ok := zt[n2].find(t, func(r record.Record) bool {
			return r.Listener == 15008 && r.Target == dst && hostOf(r.HeaderClient) == ip(a1).String() && r.DialError == ""
		}); !ok {
			t.Fatalf("node2 ztunnel: want a 15008 record delivering to %s: %+v", dst, zt[n2].all(t))
		}
	})

	t.Run("non-ambient to ambient is captured at 15006", func(t *testing.T) {
		dst := ipPort(ip(a2), echoPort)
		roundTrip(t, p1.NS, dst)
		if _, ok := zt[n1].find(t, captured(zt[n1], 15006, ip(p1), dst)); !ok {
			t.Fatalf("no 15006 record for %s -> %s: %+v", ip(p1), dst, zt[n1].all(t))
		}
	})

	t.Run("dst port 15008 is captured at 15008", func(t *testing.T) {
		dst := ipPort(ip(a2), 15008)
		target := ipPort(ip(a2), echoPort)
		c, err := netnstest.Dial(p2.NS, "tcp", dst, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		msg := "hello through hbone"
		fmt.Fprintf(c, "CONNECT %s %s\n%s", target, ipPort(ip(p2), 0), msg)
		_ = c.(*net.TCPConn).CloseWrite()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(bufio.NewReader(c))
		if err != nil || string(got) != msg {
			t.Fatalf("15008 round trip: got %q, %v", got, err)
		}
		if _, ok := zt[n1].find(t, func(r record.Record) bool {
			return r.Listener == 15008 && hostOf(r.Client) == ip(p2).String() && r.Target == target
		}); !ok {
			t.Fatalf("no 15008 record: %+v", zt[n1].all(t))
		}
	})

	t.Run("host to ambient (probe) is not captured", func(t *testing.T) {
		before := len(zt[n1].all(t))
		roundTrip(t, n1.NS, ipPort(ip(a2), echoPort))
		time.Sleep(100 * time.Millisecond)
		if after := zt[n1].all(t); len(after) != before {
			t.Fatalf("probe was captured: %+v", after[before:])
		}
	})

	t.Run("ambient to hostNetwork listener is captured and completes", func(t *testing.T) {
		nodeIPs := []net.IP{n1.IP, n1.Gateway}
		if v6 {
			nodeIPs = []net.IP{n1.IP6, n1.Gateway6}
		}
		for _, nip := range nodeIPs {
			dst := ipPort(nip, 9090)
			roundTrip(t, a1.NS, dst)
			if _, ok := zt[n1].find(t, captured(zt[n1], 15001, ip(a1), dst)); !ok {
				t.Fatalf("no 15001 record for %s -> %s: %+v", ip(a1), dst, zt[n1].all(t))
			}
		}
	})

	t.Run("UDP is not captured", func(t *testing.T) {
		before := len(zt[n1].all(t))
		p := []byte("udp-payload")
		got, err := netnstest.UDPRoundTrip(a1.NS, ipPort(ip(a2), echoPort), p, 2*time.Second)
		if err != nil || string(got) != string(p) {
			t.Fatalf("udp round trip: %q %v", got, err)
		}
		if after := zt[n1].all(t); len(after) != before {
			t.Fatalf("UDP captured: %+v", after[before:])
		}
	})

	t.Run("non-ambient to non-ambient is untouched", func(t *testing.T) {
		roundTrip(t, p1.NS, ipPort(ip(p2), echoPort))
		roundTrip(t, p1.NS, ipPort(ip(n2.plain[0]), echoPort))
		time.Sleep(100 * time.Millisecond)
		notSeen(t, ip(p2))
		notSeen(t, ip(n2.plain[0]))
	})

	t.Run("ambient pods' source address is preserved end to end", func(t *testing.T) {
		// The echo server is plain; ask it who connected via a listener that reports the peer.
		netnstest.WhoAmI(t, p2.NS, ipPort(ip(p2), 7070))
		c, err := netnstest.Dial(a1.NS, "tcp", ipPort(ip(p2), 7070), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		got, _ := io.ReadAll(c)
		if hostOf(string(got)) != ip(a1).String() {
			t.Fatalf("server saw %q, want the ambient pod's IP %s", got, ip(a1))
		}
		if _, ok := zt[n1].find(t, captured(zt[n1], 15001, ip(a1), ipPort(ip(p2), 7070))); !ok {
			t.Fatal("not captured")
		}
	})
	return nodes
}

func unspecified(v6 bool) net.IP {
	if v6 {
		return net.IPv6unspecified
	}
	return net.IPv4zero
}
