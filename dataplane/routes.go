package dataplane

// Our routes (protocol 97) in the node's tables and the ztunnel netns.

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipOf(a netip.Addr) net.IP {
	if !a.IsValid() {
		return nil
	}
	return net.IP(a.AsSlice())
}

func linkIndex(l netlink.Link) int {
	if l == nil {
		return 0
	}
	return l.Attrs().Index
}

// defaultPrefix is 0.0.0.0/0 or ::/0.
func defaultPrefix(f Family) netip.Prefix {
	if f == IPv6 {
		return netip.MustParsePrefix("::/0")
	}
	return netip.MustParsePrefix("0.0.0.0/0")
}

// routeScope is scope for IPv4; the kernel keeps IPv6 routes at universe.
func routeScope(f Family, scope netlink.Scope) netlink.Scope {
	if f == IPv6 {
		return netlink.SCOPE_UNIVERSE
	}
	return scope
}

// tunnelPeers are the ztunnel-side addresses of istioin and istioout.
func (d *Dataplane) tunnelPeers(f Family) (in, out netip.Addr) {
	if f == IPv6 {
		_, in = tunnelAddrs(d.cfg.InNet6)
		_, out = tunnelAddrs(d.cfg.OutNet6)
		return in, out
	}
	_, in = tunnelAddrs(d.cfg.InNet)
	_, out = tunnelAddrs(d.cfg.OutNet)
	return in, out
}

func (d *Dataplane) nodeRoutes(st State, zt *ztRuntime, live []*ztRuntime, in, out netlink.Link) []netlink.Route {
	t := d.cfg.Tables
	proto := netlink.RouteProtocol(d.cfg.RouteProtocol)
	var rs []netlink.Route
	for _, z := range live {
		// Every ztunnel that holds connections gets their packets back
		// through its slot's table.
		rs = append(rs, d.ztunnelRoutes(z)...)
		rs = append(rs, d.slotRoutes(z)...)
	}
	if zt == nil {
		// No ztunnel for new connections: lookups fall through to main.
		// Fail open lets traffic flow; fail closed rejects it with TCP
		// resets in filter FORWARD. (Not unreachable routes: their ICMP
		// errors are rate-limited per host, so a busy pod's connects would
		// hang instead of failing.)
		return rs
	}
	for _, f := range d.fams {
		if !zt.ips[f].IsValid() {
			continue // no ztunnel for this family: as above
		}
		members, _ := st.members(f)
		for _, a := range sortedAddrs(members) {
			if r, ok := d.podRoute(a, zt, in); ok {
				rs = append(rs, r)
			}
		}
		_, outPeer := d.tunnelPeers(f)
		rs = append(rs, netlink.Route{Table: t.Outbound, Dst: ipNet(defaultPrefix(f)), Gw: ipOf(outPeer), LinkIndex: linkIndex(out), Type: unix.RTN_UNICAST, Protocol: proto})
	}
	return rs
}

// podRoute is a pod address's inbound route through istioin; none when the
// ztunnel has no address of its family (or there is no ztunnel).
func (d *Dataplane) podRoute(a netip.Addr, zt *ztRuntime, in netlink.Link) (netlink.Route, bool) {
	f := FamilyOf(a)
	if zt == nil || !zt.ips[f].IsValid() || !slices.Contains(d.fams, f) {
		return netlink.Route{}, false
	}
	inPeer, _ := d.tunnelPeers(f)
	return netlink.Route{Table: d.cfg.Tables.Inbound, Dst: ipNet(netip.PrefixFrom(a, a.BitLen())), Gw: ipOf(inPeer), LinkIndex: linkIndex(in),
		Src: ipOf(zt.hostIPs[f]), Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)}, true
}

// slotRoutes send the later packets of a ztunnel's connections
// (proxy-return) to it, in its slot's table, per family.
func (d *Dataplane) slotRoutes(z *ztRuntime) []netlink.Route {
	var rs []netlink.Route
	for _, f := range d.fams {
		if ip, ok := z.ips[f]; ok {
			rs = append(rs, netlink.Route{Table: d.slotTable(z.slot), Dst: ipNet(defaultPrefix(f)), Gw: ipOf(ip), LinkIndex: z.veth.Attrs().Index,
				Flags: int(netlink.FLAG_ONLINK), Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)})
		}
	}
	return rs
}

// ztunnelRoutes keep ZIP on its veth in each of our tables: the
// encapsulated packets inherit the inner mark and must not loop back into
// the tunnel.
func (d *Dataplane) ztunnelRoutes(zt *ztRuntime) []netlink.Route {
	t := d.cfg.Tables
	var rs []netlink.Route
	for _, f := range d.fams {
		ip, ok := zt.ips[f]
		if !ok {
			continue
		}
		for _, table := range []int{t.Inbound, t.Outbound, t.ProxyReturn, t.ProxyReturn2} {
			rs = append(rs, netlink.Route{Table: table, Dst: ipNet(netip.PrefixFrom(ip, ip.BitLen())), LinkIndex: zt.veth.Attrs().Index,
				Scope: routeScope(f, netlink.SCOPE_LINK), Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)})
		}
	}
	return rs
}

// routeKey is what makes two of our routes the same: table and destination
// (whose text says the family; a default route read back has no
// destination, only its family).
func routeKey(r netlink.Route) string {
	dst := "0.0.0.0/0"
	switch {
	case r.Dst != nil:
		dst = r.Dst.String()
	case r.Family == netlink.FAMILY_V6 || r.Gw.To4() == nil && r.Gw != nil:
		dst = "::/0"
	}
	return fmt.Sprintf("table %d %s", r.Table, dst)
}

func routeString(r netlink.Route) string {
	s := routeKey(r)
	switch r.Type {
	case unix.RTN_UNREACHABLE:
		return "unreachable " + s
	case unix.RTN_LOCAL:
		s = "local " + s
	}
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	if r.LinkIndex != 0 {
		s += fmt.Sprintf(" dev#%d", r.LinkIndex)
	}
	if r.Src != nil {
		s += " src " + r.Src.String()
	}
	if r.Scope != 0 {
		s += " scope " + r.Scope.String()
	}
	if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		s += " onlink"
	}
	return s
}

func routeEqual(want, have netlink.Route) bool {
	if want.Type != have.Type || want.Scope != have.Scope || !want.Gw.Equal(have.Gw) || !want.Src.Equal(have.Src) {
		return false
	}
	if want.Type != unix.RTN_UNREACHABLE && want.LinkIndex != have.LinkIndex {
		return false
	}
	return want.Flags&int(netlink.FLAG_ONLINK) == have.Flags&int(netlink.FLAG_ONLINK)
}

// ourRoutes lists every route with our protocol, of both families, in all tables.
func ourRoutes(nl kernel.Netlink, proto int) ([]netlink.Route, error) {
	filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(proto)}
	rs, err := nl.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	return rs, nil
}

// routeManager owns our routes (by protocol, in every table) of one netns.
// Its routes are pointers: a route the kernel holds as desired is then one
// object in both the desired and the actual state (a node's pod routes are
// most of the agent's memory after its caches).
type routeManager struct {
	nl    kernel.Netlink
	proto int
	t     *deltaTracker[string, *netlink.Route]
}

func newRouteManager(nl kernel.Netlink, proto int) *routeManager {
	return &routeManager{nl: nl, proto: proto, t: newDeltaTracker(func(want, have *netlink.Route) bool { return routeEqual(*want, *have) }, strings.Compare)}
}

func (m *routeManager) clone() *routeManager {
	c := *m
	c.t = m.t.clone()
	return &c
}

// readBack records our routes as the kernel holds them.
func (m *routeManager) readBack() error {
	have, err := ourRoutesByKey(m.nl, m.proto)
	if err != nil {
		return err
	}
	actual := make(map[string]*netlink.Route, len(have))
	for k, r := range have {
		actual[k] = &r
	}
	m.t.ReplaceActual(actual)
	return nil
}

// want makes rs desired, besides what already is.
func (m *routeManager) want(rs ...netlink.Route) {
	for _, r := range rs {
		m.t.SetDesired(routeKey(r), &r)
	}
}

// replaceDesired makes rs the only desired routes.
func (m *routeManager) replaceDesired(rs []netlink.Route) {
	want := make(map[string]*netlink.Route, len(rs))
	for _, r := range rs {
		want[routeKey(r)] = &r
	}
	m.t.ReplaceDesired(want)
}

// applyUpdates writes the pending routes sel (nil: all) selects.
func (m *routeManager) applyUpdates(sel func(netlink.Route) bool, w *writer) error {
	for _, k := range m.t.PendingUpdates() {
		r, _ := m.t.Desired(k)
		if sel != nil && !sel(*r) {
			continue
		}
		if err := w.do(KindRoute, "replace "+routeString(*r), func() error { return m.nl.RouteReplace(r) }); err != nil {
			return err
		}
		m.t.Written(k, r)
	}
	return nil
}

// applyDeletes deletes the undesired routes sel (nil: all) selects.
func (m *routeManager) applyDeletes(sel func(netlink.Route) bool, w *writer) error {
	for _, k := range m.t.PendingDeletes() {
		r, _ := m.t.Actual(k)
		if sel != nil && !sel(*r) {
			continue
		}
		if err := w.do(KindRoute, "del "+routeString(*r), func() error { return ignoreNotExist(m.nl.RouteDel(r)) }); err != nil {
			return err
		}
		m.t.Removed(k)
	}
	return nil
}

// syncRoutes makes our routes (by protocol, all tables) of a netns exactly
// want.
func syncRoutes(nl kernel.Netlink, proto int, want []netlink.Route, w *writer) error {
	m := newRouteManager(nl, proto)
	if err := m.readBack(); err != nil {
		return err
	}
	m.replaceDesired(want)
	if err := m.applyUpdates(nil, w); err != nil {
		return err
	}
	return m.applyDeletes(nil, w)
}

func ourRoutesByKey(nl kernel.Netlink, proto int) (map[string]netlink.Route, error) {
	rs, err := ourRoutes(nl, proto)
	if err != nil {
		return nil, err
	}
	have := make(map[string]netlink.Route, len(rs))
	for _, r := range rs {
		have[routeKey(r)] = r
	}
	return have, nil
}

// isInbound reports a per-pod table-100 route: the inbound capture layer
// (the ztunnel's own route in that table has no gateway).
func (d *Dataplane) isInbound(r netlink.Route) bool {
	return r.Table == d.cfg.Tables.Inbound && r.Gw != nil
}
