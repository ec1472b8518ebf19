package dataplane

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
)

func testEnd(typ TunnelType) tunnelEnd {
	return tunnelEnd{Name: "istioin", Type: typ, VNI: 1000, Port: 6081, Remote: netip.MustParseAddr("10.244.1.2"), MTU: 1450,
		MAC: tunnelMAC(netip.MustParseAddr("192.168.126.1")), Addrs: []netip.Prefix{netip.MustParsePrefix("192.168.126.1/30")}}
}

func TestGeneveLinkAttributes(t *testing.T) {
	l, ok := testEnd(TunnelGeneve).link().(*netlink.Geneve)
	if !ok {
		t.Fatalf("geneve end built %T", l)
	}
	if l.Type() != "geneve" || l.ID != 1000 || l.Dport != 6081 || !l.Remote.Equal(net.ParseIP("10.244.1.2")) || l.MTU != 1450 {
		t.Fatalf("geneve attributes: %+v", l)
	}
	// Collect-metadata (external) mode would swallow every geneve packet on
	// the port; inner-proto-inherit would make it L3. Both must be off.
	if l.FlowBased || l.InnerProtoInherit {
		t.Fatalf("geneve must be a plain L2 point-to-point device: %+v", l)
	}
	if l.HardwareAddr.String() != "02:a1:c0:a8:7e:01" {
		t.Fatalf("fixed MAC: %s", l.HardwareAddr)
	}
	mod := testEnd(TunnelGeneve).modifyLink().(*netlink.Geneve)
	if mod.Dport != 0 || mod.ID != 1000 || !mod.Remote.Equal(net.ParseIP("10.244.1.2")) || mod.MTU != 0 {
		t.Fatalf("changelink must carry only VNI and remote (the kernel refuses a port): %+v", mod)
	}
}

func TestVXLANLinkAttributes(t *testing.T) {
	e := testEnd(TunnelVXLAN)
	e.Port = 4789
	l, ok := e.link().(*netlink.Vxlan)
	if !ok {
		t.Fatalf("vxlan end built %T", l)
	}
	if l.Type() != "vxlan" || l.VxlanId != 1000 || l.Port != 4789 || l.MTU != 1450 {
		t.Fatalf("vxlan attributes: %+v", l)
	}
	// No learning (a restarted ztunnel's MAC is never learnt against its old
	// IP) and no default remote: the peer is a static FDB entry.
	if l.Learning || l.Group != nil || l.FlowBased {
		t.Fatalf("vxlan must not learn nor carry a default remote: %+v", l)
	}
}

func TestReadTunnelRoundTrip(t *testing.T) {
	for _, typ := range []TunnelType{TunnelGeneve, TunnelVXLAN} {
		info, ok := readTunnel(testEnd(typ).link())
		if !ok || info.Type != typ || info.VNI != 1000 || info.Port != 6081 {
			t.Fatalf("%s: %+v", typ, info)
		}
	}
	if _, ok := readTunnel(&netlink.Veth{}); ok {
		t.Fatal("a veth is not a tunnel")
	}
}

func TestPickPort(t *testing.T) {
	links := []netlink.Link{
		&netlink.Geneve{LinkAttrs: netlink.LinkAttrs{Name: "genev_sys_6081"}, Dport: 6081},
		&netlink.Geneve{LinkAttrs: netlink.LinkAttrs{Name: "other"}, Dport: 6082},
		&netlink.Geneve{LinkAttrs: netlink.LinkAttrs{Name: "istioin"}, Dport: 6083},
	}
	if p := pickPort(6081, links, map[string]bool{"istioin": true}); p != 6083 {
		t.Fatalf("port %d, want 6083 (ours does not block)", p)
	}
	if p := pickPort(4789, links, nil); p != 4789 {
		t.Fatalf("port %d, want 4789", p)
	}
}

func TestTunnelMACsAreDistinct(t *testing.T) {
	seen := map[string]bool{}
	for _, p := range []netip.Prefix{DefaultConfig().InNet, DefaultConfig().OutNet} {
		n, z := tunnelAddrs(p)
		for _, a := range []netip.Addr{n, z} {
			m := tunnelMAC(a)
			if seen[m.String()] || m[0]&1 != 0 || m[0]&2 == 0 {
				t.Fatalf("MAC %s is duplicate, multicast or not locally administered", m)
			}
			seen[m.String()] = true
		}
	}
}
