//go:build linux

package netnstest

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
)

// TestDualStack proves the default cluster carries IPv4 and IPv6 between
// pods on one node and across nodes, wired by the real ptp plugin.
func TestDualStack(t *testing.T) {
	RequireRoot(t)
	c := NewCluster(t, 2)
	n1, n2 := c.Node(1), c.Node(2)
	for _, n := range c.Nodes {
		n.AddPod(t, "a")
		n.AddPod(t, "b")
	}
	if c.Family != DualStack || !n1.IP6.Equal(net.ParseIP("fd00:172:18::2")) ||
		n1.PodCIDR6.String() != "fd00:10:244:1::/64" || !n1.Gateway6.Equal(net.ParseIP("fd00:10:244:1::1")) ||
		len(n1.PodCIDRs) != 2 || n1.PodCIDR.String() != "10.244.1.0/24" {
		t.Fatalf("node1 = %+v", n1)
	}
	p := n2.Pods[1]
	if !p.IP.Equal(net.ParseIP("10.244.2.3")) || !p.IP6.Equal(net.ParseIP("fd00:10:244:2::3")) ||
		len(p.IPs) != 2 || !p.IPs[0].Equal(p.IP) || !p.IPs[1].Equal(p.IP6) || p.IP.To4() == nil {
		t.Fatalf("pod = %+v", p)
	}
	for _, n := range c.Nodes {
		if v := strings.TrimSpace(Exec(t, n.NS, "sysctl", "-n", "net.ipv6.conf.all.forwarding")); v != "1" {
			t.Errorf("%s: IPv6 forwarding = %q", n.NS, v)
		}
		routes := Exec(t, n.NS, "ip", "-6", "route")
		for _, p := range n.Pods {
			if want := fmt.Sprintf("%s dev %s", p.IP6, p.HostVeth); !strings.Contains(routes, want) {
				t.Errorf("%s: no %q in\n%s", n.NS, want, routes)
			}
		}
		for _, o := range c.Nodes {
			if want := fmt.Sprintf("%s via %s dev eth0", o.PodCIDR6, o.IP6); o != n && !strings.Contains(routes, want) {
				t.Errorf("%s: no %q in\n%s", n.NS, want, routes)
			}
		}
	}

	const port = 8080
	for _, n := range c.Nodes {
		for _, p := range n.Pods {
			for _, ip := range p.IPs {
				EchoServer(t, p.NS, hostPort(ip, port))
			}
		}
	}
	a1, b1, a2 := n1.Pods[0], n1.Pods[1], n2.Pods[0]
	for _, tc := range []struct {
		name     string
		from, to *Pod
	}{{"same node", a1, b1}, {"cross node", a1, a2}, {"cross node back", a2, b1}} {
		t.Run(tc.name, func(t *testing.T) {
			checkRoundTrip(t, tc.from.NS, hostPort(tc.to.IP, port))
			checkRoundTrip(t, tc.from.NS, hostPort(tc.to.IP6, port))
		})
	}
	t.Run("IPv6 source preserved", func(t *testing.T) {
		checkSourcePreserved(t, a1.NS, a1.IP6, a2.NS, a2.IP6)
	})
	t.Run("node to pod over IPv6", func(t *testing.T) {
		checkRoundTrip(t, n1.NS, hostPort(a2.IP6, port)) // via the v6 underlay
	})
}

// TestIPv6Only proves an IPv6-only cluster: pods have one IPv6 address and
// reach pods on other nodes over the IPv6 underlay.
func TestIPv6Only(t *testing.T) {
	RequireRoot(t)
	c := NewClusterWith(t, 2, Options{Family: IPv6Only})
	n1, n2 := c.Node(1), c.Node(2)
	a, b := n1.AddPod(t, "a"), n2.AddPod(t, "b")
	if len(a.IPs) != 1 || a.IP.To4() != nil || !a.IP.Equal(a.IP6) || !n1.PodCIDR6.Contains(a.IP) ||
		n1.PodCIDR != n1.PodCIDR6 || !n1.Gateway.Equal(n1.Gateway6) || len(n1.PodCIDRs) != 1 {
		t.Fatalf("pod %+v on node %+v", a, n1)
	}
	if addrs := Exec(t, a.NS, "ip", "-4", "-o", "addr", "show", "dev", "eth0"); strings.TrimSpace(addrs) != "" {
		t.Errorf("IPv6-only pod has IPv4: %s", addrs)
	}
	if r := Exec(t, n1.NS, "ip", "-4", "route"); strings.Contains(r, "10.244.") {
		t.Errorf("IPv4 pod routes on an IPv6-only node:\n%s", r)
	}
	EchoServer(t, b.NS, hostPort(b.IP6, 8080))
	EchoServer(t, a.NS, hostPort(a.IP6, 8080))
	checkRoundTrip(t, a.NS, hostPort(b.IP6, 8080))
	checkRoundTrip(t, b.NS, hostPort(a.IP6, 8080))
	// WithIP works for IPv6 too.
	want := net.ParseIP("fd00:10:244:1::99")
	if q := n1.AddPod(t, "q", WithIP(want)); !q.IP.Equal(want) {
		t.Errorf("WithIP(%v) gave %v", want, q.IP)
	}
	if _, err := n1.addPod("r", WithIP(net.ParseIP("10.244.1.9"))); err == nil {
		t.Error("an IPv4 address was accepted in an IPv6-only cluster")
	}
}

// TestIPv4Only keeps the pre-dual-stack shape: no IPv6 addresses or routes.
func TestIPv4Only(t *testing.T) {
	RequireRoot(t)
	c := NewClusterWith(t, 2, Options{Family: IPv4Only})
	n1, n2 := c.Node(1), c.Node(2)
	a, b := n1.AddPod(t, "a"), n2.AddPod(t, "b")
	if len(a.IPs) != 1 || a.IP6 != nil || n1.IP6 != nil || n1.PodCIDR6 != nil || a.IP.To4() == nil {
		t.Fatalf("pod %+v on node %+v", a, n1)
	}
	if addrs := Exec(t, n1.NS, "ip", "-6", "-o", "addr", "show", "scope", "global"); strings.TrimSpace(addrs) != "" {
		t.Errorf("global IPv6 addresses on an IPv4-only node:\n%s", addrs)
	}
	EchoServer(t, b.NS, hostPort(b.IP, 8080))
	checkRoundTrip(t, a.NS, hostPort(b.IP, 8080))
}

// TestCloseRemovesIPAM checks Close leaves neither namespaces nor host-local
// state, also after pods were deleted (CNI DEL) and re-added.
func TestCloseRemovesIPAM(t *testing.T) {
	RequireRoot(t)
	c := NewCluster(t, 2)
	p := c.Node(1).AddPod(t, "a")
	c.Node(2).AddPod(t, "b")
	reserved := func() []string {
		es, _ := os.ReadDir(c.IPAMDir + "/node1/kindnet")
		var out []string
		for _, e := range es {
			if n := e.Name(); net.ParseIP(n) != nil {
				out = append(out, n)
			}
		}
		return out
	}
	if r := reserved(); len(r) != 2 {
		t.Fatalf("node1 reservations = %v, want the pod's two", r)
	}
	p.Delete(t)
	if r := reserved(); len(r) != 0 {
		t.Fatalf("reservations after CNI DEL = %v", r)
	}
	c.Node(1).AddPod(t, "a")
	names := c.Namespaces()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for _, ns := range names {
		if Exists(ns) {
			t.Errorf("%s survived Close", ns)
		}
	}
	if _, err := os.Stat(c.IPAMDir); !os.IsNotExist(err) {
		t.Errorf("IPAM state %s survived Close: %v", c.IPAMDir, err)
	}
}

func TestCheckLiteral(t *testing.T) {
	for _, ok := range []string{"", ":80", "10.0.0.1:80", "[fd00::2]:8080", "[::]:0", "[fe80::1%eth0]:80"} {
		if err := checkLiteral(ok); err != nil {
			t.Errorf("checkLiteral(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"localhost:80", "fd00::2:8080", "[fd00::2]"} {
		if err := checkLiteral(bad); err == nil {
			t.Errorf("checkLiteral(%q) accepted", bad)
		}
	}
}
