package kerneltest

import (
	"net"
	"testing"

	"github.com/vishvananda/netlink"
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
