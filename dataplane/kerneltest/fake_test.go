package kerneltest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// TestFamiliesAreKeptApart: a v4 and a v6 default route in one table are two
// routes, and listings filter by family, as in the kernel.
func TestFamiliesAreKeptApart(t *testing.T) {
	f := NewFakeNetlink()
	_, v4, _ := net.ParseCIDR("0.0.0.0/0")
	_, v6, _ := net.ParseCIDR("::/0")
	for _, r := range []netlink.Route{
		{Table: 101, Dst: v4, Gw: net.ParseIP("192.168.127.2"), Protocol: 97},
		{Table: 101, Dst: v6, Gw: net.ParseIP("fd00::2"), Protocol: 97},
	} {
		if err := f.RouteReplace(&r); err != nil {
			t.Fatal(err)
		}
	}
	for fam, want := range map[int]int{netlink.FAMILY_V4: 1, netlink.FAMILY_V6: 1, netlink.FAMILY_ALL: 2} {
		rs, err := f.RouteListFiltered(fam, &netlink.Route{Table: 101}, netlink.RT_FILTER_TABLE)
		if err != nil || len(rs) != want {
			t.Errorf("family %d: %d routes (%v), want %d", fam, len(rs), err, want)
		}
	}
	if err := f.RouteDel(&netlink.Route{Table: 101, Dst: v6}); err != nil {
		t.Fatal(err)
	}
	if rs, _ := f.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 101}, netlink.RT_FILTER_TABLE); len(rs) != 1 {
		t.Fatalf("deleting the v6 default took the v4 one: %v", rs)
	}
	v4Rules, _ := f.RuleList(netlink.FAMILY_V4)
	v6Rules, _ := f.RuleList(netlink.FAMILY_V6)
	if len(v4Rules) != 3 || len(v6Rules) != 2 {
		t.Fatalf("kernel default rules: %d v4, %d v6; want 3 and 2", len(v4Rules), len(v6Rules))
	}
	lo, _ := f.LinkByName("lo")
	for _, a := range []string{"127.0.0.1/8", "::1/128"} {
		ip, n, _ := net.ParseCIDR(a)
		n.IP = ip
		if err := f.AddrReplace(lo, &netlink.Addr{IPNet: n}); err != nil {
			t.Fatal(err)
		}
	}
	if as, _ := f.AddrList(lo, netlink.FAMILY_V6); len(as) != 1 || as[0].IP.To4() != nil {
		t.Fatalf("v6 addresses of lo: %v", as)
	}
}

// TestRouteGetKeepsFamilies: a v6 destination is answered from v6 routes (or
// Src6), never with an IPv4 source, and a route whose addresses are of
// another family is refused.
func TestRouteGetKeepsFamilies(t *testing.T) {
	f := NewFakeNetlink()
	f.Src = netip.MustParseAddr("10.244.1.1")
	if _, err := f.RouteGet(net.ParseIP("fd00::2")); !errors.Is(err, unix.ENETUNREACH) {
		t.Fatalf("v6 RouteGet with only a v4 source: %v, want ENETUNREACH", err)
	}
	lo, _ := f.LinkByName("lo")
	_, v6, _ := net.ParseCIDR("fd00::/64")
	if err := f.RouteReplace(&netlink.Route{Table: unix.RT_TABLE_MAIN, Dst: v6, Src: net.ParseIP("fd00::1"), LinkIndex: lo.Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	rs, err := f.RouteGet(net.ParseIP("fd00::2"))
	if err != nil || len(rs) != 1 || rs[0].Src.String() != "fd00::1" {
		t.Fatalf("v6 RouteGet: %v %v", rs, err)
	}
	rs, err = f.RouteGet(net.ParseIP("10.244.1.2"))
	if err != nil || rs[0].Src.String() != "10.244.1.1" {
		t.Fatalf("v4 RouteGet: %v %v", rs, err)
	}
	_, v4, _ := net.ParseCIDR("0.0.0.0/0")
	if err := f.RouteReplace(&netlink.Route{Table: 101, Dst: v4, Gw: net.ParseIP("fd00::2")}); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("v4 route via a v6 gateway: %v, want EINVAL", err)
	}
}

// TestSysctlKeysMustExist: interface keys exist for existing links (and
// all/default), IPv6 ones only with IPv6; anything else is ENOENT.
func TestSysctlKeysMustExist(t *testing.T) {
	nl := NewFakeNetlink()
	s := NewFakeSysctl()
	NewFakeKernel(nl, s, iptables.NewFake(), iptables.NewFake())
	for _, k := range []string{"net.ipv4.conf.lo.rp_filter", "net.ipv4.conf.all.rp_filter", "net.ipv4.ip_forward"} {
		if err := s.Set(k, "0"); err != nil {
			t.Errorf("%s: %v", k, err)
		}
	}
	for _, k := range []string{"net.ipv4.conf.nosuch.rp_filter", "net.ipv4.conf.lo.no_such_key", "net.ipv6.conf.lo.accept_dad", "net.core.nonsense"} {
		if err := s.Set(k, "0"); !errors.Is(err, unix.ENOENT) {
			t.Errorf("set %s: %v, want ENOENT", k, err)
		}
		if _, err := s.Get(k); !errors.Is(err, unix.ENOENT) {
			t.Errorf("get %s: %v, want ENOENT", k, err)
		}
	}
	nl.AddVeth("veth1", 1500, 0)
	if v, err := s.Get("net.ipv4.conf.veth1.accept_local"); err != nil || v != "0" {
		t.Errorf("a new link's key: %q %v", v, err)
	}
	nl.RemoveLink("veth1")
	if _, err := s.Get("net.ipv4.conf.veth1.accept_local"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("a gone link's key: %v", err)
	}
}

// TestJournalOrdersWritesAcrossKinds: one journal, in issue order, across
// netlink, sysctls and iptables, with the rules a restore left.
func TestJournalOrdersWritesAcrossKinds(t *testing.T) {
	j := NewJournal()
	nl := NewFakeNetlink()
	nl.Journal, nl.NS = j, "node"
	s := NewFakeSysctl()
	s.Journal, s.NS = j, "node"
	k := NewFakeKernel(nl, s, iptables.NewFake(), iptables.NewFake())
	var seen []int
	j.Observe(func(e Entry) { seen = append(seen, e.Seq) })
	_ = nl.IpsetCreate("set", "hash:ip", netlink.IpsetCreateOptions{Family: unix.AF_INET})
	_ = s.Set("net.ipv4.conf.lo.rp_filter", "0")
	r, _ := k.IPT("", 4)
	if err := r.Restore(context.Background(), "*filter\n:ztunnel-FORWARD - [0:0]\n-A ztunnel-FORWARD -j ACCEPT\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	_ = nl.IpsetDestroy("set")
	es := j.Entries()
	var got []string
	for _, e := range es {
		got = append(got, fmt.Sprintf("%s %s %s", e.Kind, e.Op, e.Object))
	}
	want := []string{"ipset add set hash:ip family 2", "sysctl replace net.ipv4.conf.lo.rp_filter=0", "iptables replace restore filter", "ipset delete set (destroy)"}
	if !slices.Equal(got, want) || len(seen) != 4 {
		t.Fatalf("journal %q, want %q (observed %v)", got, want, seen)
	}
	if !strings.Contains(es[2].Rules, "-A ztunnel-FORWARD -j ACCEPT") {
		t.Fatalf("restore entry lacks the resulting rules:\n%s", es[2].Rules)
	}
}
