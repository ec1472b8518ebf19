package dataplane

import (
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
)

// Tunnel device names. The node side is istioin/istioout, the ztunnel side
// pistioin/pistioout, as node proxies expect.
const (
	NodeInLink     = "istioin"
	NodeOutLink    = "istioout"
	ZtunnelInLink  = "pistioin"
	ZtunnelOutLink = "pistioout"
)

// encapOverhead is the outer IP + UDP + (vxlan|geneve) + inner Ethernet
// header size, for an IPv4 or an IPv6 underlay.
func encapOverhead(underlay netip.Addr) int {
	if underlay.Is6() {
		return 70
	}
	return 50
}

// tunnelEnd describes one tunnel device we want.
type tunnelEnd struct {
	Name string
	Type TunnelType
	VNI  uint32
	Port int
	// Remote is the peer's underlay address. For vxlan it is kept as a
	// static FDB entry for the peer's MAC instead of the device's default
	// remote, so that a ztunnel change is one in-place FDB replace (vxlan
	// cannot change its remote with changelink through netlink here).
	Remote netip.Addr
	// Local is our underlay address (set on vxlan devices over IPv6).
	Local netip.Addr
	MTU   int
	MAC   net.HardwareAddr
	// Addrs are our addresses (the IPv4 /30, the IPv6 /126);
	// PeerAddrs/PeerMAC the other end's, in the same order.
	Addrs     []netip.Prefix
	PeerAddrs []netip.Addr
	PeerMAC   net.HardwareAddr
}

// tunnelMAC gives every tunnel end a fixed, locally administered MAC derived
// from its address, so that neither side ever needs to ARP and a ztunnel
// change needs no neighbour re-learning.
func tunnelMAC(a netip.Addr) net.HardwareAddr {
	b := a.As4()
	return net.HardwareAddr{0x02, 0xa1, b[0], b[1], b[2], b[3]}
}

func (t tunnelEnd) hasIPv6() bool {
	return slices.ContainsFunc(t.Addrs, func(p netip.Prefix) bool { return p.Addr().Is6() })
}

// link builds the netlink object for creating the device.
func (t tunnelEnd) link() netlink.Link {
	attrs := netlink.LinkAttrs{Name: t.Name, MTU: t.MTU, HardwareAddr: t.MAC}
	switch t.Type {
	case TunnelGeneve:
		return &netlink.Geneve{
			LinkAttrs: attrs,
			ID:        t.VNI,
			Remote:    net.IP(t.Remote.AsSlice()),
			Dport:     uint16(t.Port),
		}
	default:
		v := &netlink.Vxlan{
			LinkAttrs: attrs,
			VxlanId:   int(t.VNI),
			Port:      t.Port,
			// No learning: a restarted ztunnel must never be reached through
			// a MAC learnt against its old address.
			Learning: false,
		}
		if t.Remote.Is6() {
			// A vxlan device's underlay family is fixed at creation by its
			// local address; without one it is IPv4 and refuses IPv6 FDB
			// entries.
			v.SrcAddr = ipOf(t.Local)
		}
		return v
	}
}

// modifyLink builds the changelink request that points an existing device
// at a new remote. Only geneve supports this; vxlan uses its FDB.
func (t tunnelEnd) modifyLink() netlink.Link {
	// Port must be absent: the kernel refuses any port attribute on changelink.
	return &netlink.Geneve{
		LinkAttrs: netlink.LinkAttrs{Name: t.Name},
		ID:        t.VNI,
		Remote:    net.IP(t.Remote.AsSlice()),
	}
}

// tunnelInfo is what we read back from a tunnel device.
type tunnelInfo struct {
	Type   TunnelType
	VNI    uint32
	Port   int
	Remote netip.Addr // geneve only
	// Learning is vxlan learning.
	Learning bool
	// Underlay6 says the device carries IPv6 underlay packets.
	Underlay6 bool
}

func readTunnel(l netlink.Link) (tunnelInfo, bool) {
	switch v := l.(type) {
	case *netlink.Vxlan:
		var r netip.Addr
		if v.Group != nil {
			r, _ = netip.AddrFromSlice(v.Group)
			r = r.Unmap()
		}
		return tunnelInfo{Type: TunnelVXLAN, VNI: uint32(v.VxlanId), Port: v.Port, Remote: r, Learning: v.Learning, Underlay6: v.SrcAddr.To4() == nil && v.SrcAddr != nil}, true
	case *netlink.Geneve:
		var r netip.Addr
		if v.Remote != nil {
			r, _ = netip.AddrFromSlice(v.Remote)
			r = r.Unmap()
		}
		return tunnelInfo{Type: TunnelGeneve, VNI: v.ID, Port: int(v.Dport), Remote: r, Underlay6: r.Is6()}, true
	}
	return tunnelInfo{}, false
}

// defaultPort is the IANA port of a tunnel type.
func defaultPort(t TunnelType) int {
	if t == TunnelGeneve {
		return DefaultGenevePort
	}
	return DefaultVXLANPort
}

// pickPort returns the first port from start that no foreign vxlan/geneve
// device uses (OVN's genev_sys_6081, Calico's vxlan.calico on 4789, ...).
func pickPort(start int, links []netlink.Link, ours map[string]bool) int {
	used := map[int]bool{}
	for _, l := range links {
		if ours[l.Attrs().Name] {
			continue
		}
		if info, ok := readTunnel(l); ok && info.Port != 0 {
			used[info.Port] = true
		}
	}
	p := start
	for used[p] && p < 65535 {
		p++
	}
	return p
}
