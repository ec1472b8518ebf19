package dataplane

// The istioin/istioout tunnel devices, their addresses and static neighbours.

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func (d *Dataplane) tunnelEnds(zt *ztRuntime, node bool) (in, out tunnelEnd) {
	inNode, inZt := tunnelAddrs(d.cfg.InNet)
	outNode, outZt := tunnelAddrs(d.cfg.OutNet)
	mk := func(name string, vni uint32, self, peer netip.Addr, remote netip.Addr, mtu int) tunnelEnd {
		return tunnelEnd{Name: name, Type: d.tunnel, VNI: vni, Port: d.port, Remote: remote, MTU: mtu - encapOverhead,
			MAC: tunnelMAC(self), Addr: netip.PrefixFrom(self, 30), PeerAddr: peer, PeerMAC: tunnelMAC(peer)}
	}
	if node {
		mtu := zt.veth.Attrs().MTU
		return mk(NodeInLink, d.cfg.InVNI, inNode, inZt, zt.ip, mtu), mk(NodeOutLink, d.cfg.OutVNI, outNode, outZt, zt.ip, mtu)
	}
	mtu := zt.eth.Attrs().MTU
	return mk(ZtunnelInLink, d.cfg.InVNI, inZt, inNode, zt.hostIP, mtu), mk(ZtunnelOutLink, d.cfg.OutVNI, outZt, outNode, zt.hostIP, mtu)
}

// syncTunnel converges one tunnel device, its address, its static neighbour
// and (vxlan) its FDB entry. It returns the link (nil in a dry run when the
// link does not exist yet).
func syncTunnel(nl kernel.Netlink, t tunnelEnd, w *writer) (netlink.Link, error) {
	l, err := nl.LinkByName(t.Name)
	if err != nil && !isLinkNotFound(err) {
		return nil, fmt.Errorf("link %s: %w", t.Name, err)
	}
	if l != nil {
		info, ok := readTunnel(l)
		if !ok {
			return nil, fmt.Errorf("link %s exists and is a %s device, not a tunnel of ours: refusing to replace it", t.Name, l.Type())
		}
		if info.Type != t.Type || info.VNI != t.VNI || info.Port != t.Port || info.Learning {
			// Not something we can change in place: re-create.
			if err := w.do(KindLink, fmt.Sprintf("del %s (have %+v, want %s vni %d port %d)", t.Name, info, t.Type, t.VNI, t.Port), func() error { return nl.LinkDel(l) }); err != nil {
				return nil, err
			}
			l = nil
		} else if t.Type == TunnelGeneve && info.Remote != t.Remote {
			mod := t.modifyLink()
			if err := w.do(KindLink, fmt.Sprintf("set %s remote %s", t.Name, t.Remote), func() error { return nl.LinkModify(mod) }); err != nil {
				return nil, err
			}
		}
	}
	if l == nil {
		link := t.link()
		link.Attrs().Flags = net.FlagUp
		if err := w.do(KindLink, fmt.Sprintf("add %s %s vni %d port %d mtu %d", t.Name, t.Type, t.VNI, t.Port, t.MTU), func() error { return nl.LinkAdd(link) }); err != nil {
			return nil, err
		}
		if w.dry {
			return nil, nil
		}
		if l, err = nl.LinkByName(t.Name); err != nil {
			return nil, fmt.Errorf("link %s after add: %w", t.Name, err)
		}
	}
	a := l.Attrs()
	if a.MTU != t.MTU {
		if err := w.do(KindLink, fmt.Sprintf("set %s mtu %d", t.Name, t.MTU), func() error { return nl.LinkSetMTU(l, t.MTU) }); err != nil {
			return nil, err
		}
	}
	if a.Flags&net.FlagUp == 0 {
		if err := w.do(KindLink, "set "+t.Name+" up", func() error { return nl.LinkSetUp(l) }); err != nil {
			return nil, err
		}
	}
	if a.HardwareAddr.String() != t.MAC.String() {
		// A foreign MAC means the peer's static neighbour entry is wrong:
		// re-create rather than carry two truths.
		return nil, fmt.Errorf("link %s has MAC %s, want %s: delete it to let it be re-created", t.Name, a.HardwareAddr, t.MAC)
	}
	if err := syncAddr(nl, l, t.Addr, w); err != nil {
		return nil, err
	}
	neighs, err := nl.NeighList(a.Index, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list neighbours of %s: %w", t.Name, err)
	}
	if !hasNeigh(neighs, ipOf(t.PeerAddr), t.PeerMAC) {
		n := &netlink.Neigh{LinkIndex: a.Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: ipOf(t.PeerAddr), HardwareAddr: t.PeerMAC}
		if err := w.do(KindNeigh, fmt.Sprintf("set %s lladdr %s dev %s", t.PeerAddr, t.PeerMAC, t.Name), func() error { return nl.NeighSet(n) }); err != nil {
			return nil, err
		}
	}
	if t.Type == TunnelVXLAN {
		fdb, err := nl.NeighList(a.Index, unix.AF_BRIDGE)
		if err != nil {
			return nil, fmt.Errorf("list fdb of %s: %w", t.Name, err)
		}
		if !hasNeigh(fdb, ipOf(t.Remote), t.PeerMAC) {
			n := &netlink.Neigh{LinkIndex: a.Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: ipOf(t.Remote), HardwareAddr: t.PeerMAC}
			if err := w.do(KindNeigh, fmt.Sprintf("fdb %s dst %s dev %s", t.PeerMAC, t.Remote, t.Name), func() error { return nl.NeighSet(n) }); err != nil {
				return nil, err
			}
		}
	}
	return l, nil
}

func hasNeigh(ns []netlink.Neigh, ip net.IP, mac net.HardwareAddr) bool {
	for _, n := range ns {
		if n.IP.Equal(ip) && n.HardwareAddr.String() == mac.String() && n.State&netlink.NUD_PERMANENT != 0 {
			return true
		}
	}
	return false
}

func syncAddr(nl kernel.Netlink, l netlink.Link, want netip.Prefix, w *writer) error {
	addrs, err := nl.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	found := false
	for _, a := range addrs {
		if a.IPNet.String() == want.String() {
			found = true
			continue
		}
		if err := w.do(KindAddr, fmt.Sprintf("del %s dev %s", a.IPNet, l.Attrs().Name), func() error { return ignoreNotExist(nl.AddrDel(l, &a)) }); err != nil {
			return err
		}
	}
	if found {
		return nil
	}
	addr := &netlink.Addr{IPNet: ipNet(want)}
	return w.do(KindAddr, fmt.Sprintf("add %s dev %s", want, l.Attrs().Name), func() error { return nl.AddrReplace(l, addr) })
}
