package dataplane

// The istioin/istioout tunnel devices, their addresses and static neighbours.

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// tunnelEnds are the node's (node) or the ztunnel netns's tunnel devices
// towards zt: inner addresses for each family zt has, whatever the
// underlay's family (zt.ip's).
func (d *Dataplane) tunnelEnds(zt *ztRuntime, node bool, port int) (in, out tunnelEnd) {
	mk := func(name string, vni uint32, local, remote netip.Addr, mtu int, nets ...netip.Prefix) tunnelEnd {
		t := tunnelEnd{Name: name, Type: d.tunnel, VNI: vni, Port: port, Local: local, Remote: remote, MTU: mtu - encapOverhead(remote)}
		for i, n := range nets {
			self, peer := tunnelAddrs(n)
			if !node {
				self, peer = peer, self
			}
			if i == 0 {
				// The MACs derive from the IPv4 addresses, whatever families
				// are on, so the peer's static entries stay right.
				t.MAC, t.PeerMAC = tunnelMAC(self), tunnelMAC(peer)
			}
			if zt.ips[FamilyOf(n.Addr())].IsValid() {
				t.Addrs = append(t.Addrs, netip.PrefixFrom(self, n.Bits()))
				t.PeerAddrs = append(t.PeerAddrs, peer)
			}
		}
		return t
	}
	if node {
		mtu := zt.veth.Attrs().MTU
		return mk(NodeInLink, d.cfg.InVNI, zt.hostIP, zt.ip, mtu, d.cfg.InNet, d.cfg.InNet6), mk(NodeOutLink, d.cfg.OutVNI, zt.hostIP, zt.ip, mtu, d.cfg.OutNet, d.cfg.OutNet6)
	}
	mtu := zt.eth.Attrs().MTU
	return mk(ZtunnelInLink, d.cfg.InVNI, zt.ip, zt.hostIP, mtu, d.cfg.InNet, d.cfg.InNet6), mk(ZtunnelOutLink, d.cfg.OutVNI, zt.ip, zt.hostIP, mtu, d.cfg.OutNet, d.cfg.OutNet6)
}

// syncTunnel converges one tunnel device, its address, its static neighbour
// and (vxlan) its FDB entry. It returns the link (nil in a dry run when the
// link does not exist yet).
func syncTunnel(k *kernel.Kernel, t tunnelEnd, w *writer) (netlink.Link, error) {
	nl := k.NL
	l, err := nl.LinkByName(t.Name)
	if err != nil && !isLinkNotFound(err) {
		return nil, fmt.Errorf("link %s: %w", t.Name, err)
	}
	if l != nil {
		info, ok := readTunnel(l)
		if !ok {
			return nil, fmt.Errorf("link %s exists and is a %s device, not a tunnel of ours: refusing to replace it", t.Name, l.Type())
		}
		if info.Type != t.Type || info.VNI != t.VNI || info.Port != t.Port || info.Learning || info.Underlay6 != t.Remote.Is6() {
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
		// Created down: IPv6 duplicate address detection goes off before
		// the device comes up, or its addresses (and the link-local that
		// forwarding answers from) stay tentative for 1-2 s.
		link := t.link()
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
	if t.hasIPv6() {
		if err := syncSysctls(k.Sysctl, [][2]string{{"net.ipv6.conf." + t.Name + ".accept_dad", "0"}}, w); err != nil {
			return nil, err
		}
	}
	a := l.Attrs()
	if a.MTU != t.MTU {
		if err := w.do(KindLink, fmt.Sprintf("set %s mtu %d", t.Name, t.MTU), func() error { return nl.LinkSetMTU(l, t.MTU) }); err != nil {
			return nil, err
		}
	}
	if a.HardwareAddr.String() != t.MAC.String() {
		// A foreign MAC means the peer's static neighbour entry is wrong:
		// re-create rather than carry two truths.
		return nil, fmt.Errorf("link %s has MAC %s, want %s: delete it to let it be re-created", t.Name, a.HardwareAddr, t.MAC)
	}
	if err := syncAddrs(nl, l, t.Addrs, w); err != nil {
		return nil, err
	}
	for _, peer := range t.PeerAddrs {
		fam := nlFamily(FamilyOf(peer))
		neighs, err := nl.NeighList(a.Index, fam)
		if err != nil {
			return nil, fmt.Errorf("list neighbours of %s: %w", t.Name, err)
		}
		if !hasNeigh(neighs, ipOf(peer), t.PeerMAC) {
			n := &netlink.Neigh{LinkIndex: a.Index, Family: fam, State: netlink.NUD_PERMANENT, IP: ipOf(peer), HardwareAddr: t.PeerMAC}
			if err := w.do(KindNeigh, fmt.Sprintf("set %s lladdr %s dev %s", peer, t.PeerMAC, t.Name), func() error { return nl.NeighSet(n) }); err != nil {
				return nil, err
			}
		}
	}
	if a.Flags&net.FlagUp == 0 {
		if err := w.do(KindLink, "set "+t.Name+" up", func() error { return nl.LinkSetUp(l) }); err != nil {
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

// syncAddrs makes the device's addresses exactly want, leaving IPv6
// link-local ones (the kernel's) alone.
func syncAddrs(nl kernel.Netlink, l netlink.Link, want []netip.Prefix, w *writer) error {
	addrs, err := nl.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	found := map[string]bool{}
	for _, a := range addrs {
		if slices.ContainsFunc(want, func(p netip.Prefix) bool { return p.String() == a.IPNet.String() }) {
			found[a.IPNet.String()] = true
			continue
		}
		if a.IP.IsLinkLocalUnicast() {
			continue
		}
		if err := w.do(KindAddr, fmt.Sprintf("del %s dev %s", a.IPNet, l.Attrs().Name), func() error { return ignoreNotExist(nl.AddrDel(l, &a)) }); err != nil {
			return err
		}
	}
	for _, p := range want {
		if found[p.String()] {
			continue
		}
		addr := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := w.do(KindAddr, fmt.Sprintf("add %s dev %s", p, l.Attrs().Name), func() error { return nl.AddrReplace(l, addr) }); err != nil {
			return err
		}
	}
	return nil
}

// tunnelState is a tunnel device as desired (end alone) or as read back.
type tunnelState struct {
	end tunnelEnd
	// Read back only: whether the device is ours at all, up, learning,
	// carrying an IPv6 underlay; its static neighbours and (vxlan) FDB
	// entries, MAC by address.
	foreign              bool
	up, learning, under6 bool
	neigh, fdb           map[netip.Addr]string
}

// tunnelSynced reports a device that already is what want describes.
func tunnelSynced(want, have *tunnelState) bool {
	t, h := want.end, have.end
	if have.foreign || !have.up || have.learning || have.under6 != t.Remote.Is6() || h.Type != t.Type || h.VNI != t.VNI ||
		h.Port != t.Port || h.MTU != t.MTU || h.MAC.String() != t.MAC.String() {
		return false
	}
	if t.Type == TunnelGeneve && h.Remote != t.Remote || t.Type == TunnelVXLAN && have.fdb[t.Remote] != t.PeerMAC.String() {
		return false
	}
	for _, p := range t.PeerAddrs {
		if have.neigh[p] != t.PeerMAC.String() {
			return false
		}
	}
	return slices.Equal(sortedPrefixes(t.Addrs), sortedPrefixes(h.Addrs))
}

func sortedPrefixes(ps []netip.Prefix) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	slices.Sort(out)
	return out
}

// tunnelManager owns the node's tunnel devices with their addresses,
// static neighbours and FDB entries. A device outlives its ztunnel (the
// next one reuses it), so nothing is pending deletion: cleanup removes
// them.
type tunnelManager struct {
	resyncFlag
	k     *kernel.Kernel
	names []string
	t     *deltaTracker[string, *tunnelState]
	// links are the devices as last read back or written.
	links map[string]netlink.Link
}

func newTunnelManager(k *kernel.Kernel, names ...string) *tunnelManager {
	return &tunnelManager{resyncFlag: resyncFlag{true}, k: k, names: names, links: map[string]netlink.Link{},
		t: newDeltaTracker(tunnelSynced, strings.Compare)}
}

func (m *tunnelManager) kind() string { return KindLink }

func (m *tunnelManager) clone() *tunnelManager {
	c := *m
	c.t = m.t.clone()
	c.links = maps.Clone(m.links)
	return &c
}

// setDesired makes ends the tunnels wanted (none: keep what is there).
func (m *tunnelManager) setDesired(ends []tunnelEnd) {
	want := map[string]*tunnelState{}
	for _, t := range ends {
		want[t.Name] = &tunnelState{end: t}
	}
	m.t.ReplaceDesired(want)
}

// readBack reads each of our device names: the device, its addresses,
// neighbours and FDB.
func (m *tunnelManager) readBack(context.Context) error {
	actual := map[string]*tunnelState{}
	clear(m.links)
	for _, name := range m.names {
		l, err := m.k.NL.LinkByName(name)
		if isLinkNotFound(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("link %s: %w", name, err)
		}
		s, err := readTunnelState(m.k.NL, l)
		if err != nil {
			return err
		}
		actual[name], m.links[name] = s, l
	}
	m.queued = false
	m.t.ReplaceActual(actual)
	return nil
}

func readTunnelState(nl kernel.Netlink, l netlink.Link) (*tunnelState, error) {
	info, ok := readTunnel(l)
	if !ok {
		return &tunnelState{foreign: true}, nil
	}
	a := l.Attrs()
	s := &tunnelState{end: tunnelEnd{Name: a.Name, Type: info.Type, VNI: info.VNI, Port: info.Port, Remote: info.Remote, MTU: a.MTU, MAC: a.HardwareAddr},
		up: a.Flags&net.FlagUp != 0, learning: info.Learning, under6: info.Underlay6, neigh: map[netip.Addr]string{}, fdb: map[netip.Addr]string{}}
	addrs, err := nl.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", a.Name, err)
	}
	for _, ad := range addrs {
		if p, ok := netipPrefix(ad.IPNet); ok && !ad.IP.IsLinkLocalUnicast() {
			s.end.Addrs = append(s.end.Addrs, p)
		}
	}
	fams := map[int]map[netip.Addr]string{netlink.FAMILY_V4: s.neigh, netlink.FAMILY_V6: s.neigh}
	if info.Type == TunnelVXLAN {
		fams[unix.AF_BRIDGE] = s.fdb
	}
	for fam, into := range fams {
		ns, err := nl.NeighList(a.Index, fam)
		if err != nil {
			return nil, fmt.Errorf("list neighbours of %s: %w", a.Name, err)
		}
		for _, n := range ns {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
				into[ip.Unmap()] = n.HardwareAddr.String()
			}
		}
	}
	return s, nil
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), ok
}

func (m *tunnelManager) pending() []string {
	var out []string
	for _, k := range m.t.PendingUpdates() {
		t, _ := m.t.Desired(k)
		out = append(out, fmt.Sprintf("sync %s %s vni %d port %d remote %v", k, t.end.Type, t.end.VNI, t.end.Port, t.end.Remote))
	}
	return out
}

// applyUpdates brings every pending device to what is desired (syncTunnel
// reads each one and writes only what differs).
func (m *tunnelManager) applyUpdates(_ context.Context, w *writer) error {
	for _, k := range m.t.PendingUpdates() {
		t, _ := m.t.Desired(k)
		l, err := syncTunnel(m.k, t.end, w)
		if err != nil {
			return err
		}
		if l == nil { // dry, and not created
			delete(m.links, k)
			continue
		}
		m.links[k] = l
		m.t.Written(k, t)
	}
	return nil
}

// applyDeletes does nothing: see tunnelManager.
func (m *tunnelManager) applyDeletes(context.Context, *writer) error { return nil }
