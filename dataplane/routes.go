package dataplane

// Our routes (protocol 97) in the node's tables and the ztunnel netns.

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

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipOf(a netip.Addr) net.IP {
	if !a.IsValid() {
		return nil
	}
	return net.IP(a.AsSlice())
}

// route is one of our routes as rendered: its device by name (Dev), which
// the route manager that writes it resolves to an index (LinkIndex). A
// route read back carries the kernel's index, and the name the manager
// knows for it. Dev "" means LinkIndex is all there is (an unreachable
// route, or one read back on a device the manager has no name for).
type route struct {
	netlink.Route
	Dev string
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

func (d *Dataplane) nodeRoutes(st State, zt *ztRuntime, live []*ztRuntime) []route {
	t := d.cfg.Tables
	proto := netlink.RouteProtocol(d.cfg.RouteProtocol)
	var rs []route
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
			if r, ok := d.podRoute(a, zt); ok {
				rs = append(rs, r)
			}
		}
		_, outPeer := d.tunnelPeers(f)
		rs = append(rs, route{Route: netlink.Route{Table: t.Outbound, Dst: ipNet(defaultPrefix(f)), Gw: ipOf(outPeer), Type: unix.RTN_UNICAST, Protocol: proto},
			Dev: NodeOutLink})
	}
	return rs
}

// podRoute is a pod address's inbound route through istioin; none when the
// ztunnel has no address of its family (or there is no ztunnel).
func (d *Dataplane) podRoute(a netip.Addr, zt *ztRuntime) (route, bool) {
	f := FamilyOf(a)
	if zt == nil || !zt.ips[f].IsValid() || !slices.Contains(d.fams, f) {
		return route{}, false
	}
	inPeer, _ := d.tunnelPeers(f)
	return route{Route: netlink.Route{Table: d.cfg.Tables.Inbound, Dst: ipNet(netip.PrefixFrom(a, a.BitLen())), Gw: ipOf(inPeer),
		Src: ipOf(zt.hostIPs[f]), Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)}, Dev: NodeInLink}, true
}

// slotRoutes send the later packets of a ztunnel's connections
// (proxy-return) to it, in its slot's table, per family.
func (d *Dataplane) slotRoutes(z *ztRuntime) []route {
	var rs []route
	for _, f := range d.fams {
		if ip, ok := z.ips[f]; ok {
			rs = append(rs, route{Route: netlink.Route{Table: d.slotTable(z.slot), Dst: ipNet(defaultPrefix(f)), Gw: ipOf(ip),
				Flags: int(netlink.FLAG_ONLINK), Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)}, Dev: z.veth.Attrs().Name})
		}
	}
	return rs
}

// ztunnelRoutes keep ZIP on its veth in each of our tables: the
// encapsulated packets inherit the inner mark and must not loop back into
// the tunnel.
func (d *Dataplane) ztunnelRoutes(zt *ztRuntime) []route {
	t := d.cfg.Tables
	var rs []route
	for _, f := range d.fams {
		ip, ok := zt.ips[f]
		if !ok {
			continue
		}
		for _, table := range []int{t.Inbound, t.Outbound, t.ProxyReturn, t.ProxyReturn2} {
			rs = append(rs, route{Route: netlink.Route{Table: table, Dst: ipNet(netip.PrefixFrom(ip, ip.BitLen())),
				Scope: routeScope(f, netlink.SCOPE_LINK), Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)}, Dev: zt.veth.Attrs().Name})
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

// routeString is a route as the kernel holds it: its device by index.
func routeString(r netlink.Route) string { return routeText(r, "") }

// String is a route by its device's name, when it has one.
func (r route) String() string { return routeText(r.Route, r.Dev) }

func routeText(r netlink.Route, dev string) string {
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
	switch {
	case dev != "":
		s += " dev " + dev
	case r.LinkIndex != 0:
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
// Desired routes name their device; the manager resolves the name to an
// index through the netns's links as it read them back (and as the
// convergence wrote them since, linkIs), so a route whose device does not
// exist yet stays pending (unresolved, LinkIndex 0) and one whose device
// was re-created is written again. Its routes are pointers: a route the
// kernel holds as desired is then one object in both the desired and the
// actual state (a node's pod routes are most of the agent's memory after
// its caches).
type routeManager struct {
	resyncFlag
	nl    kernel.Netlink
	proto int
	// links are the netns's devices: index by name, and name by index.
	links map[string]int
	names map[int]string
	t     *deltaTracker[string, *route]
}

func newRouteManager(nl kernel.Netlink, proto int) *routeManager {
	return &routeManager{resyncFlag: resyncFlag{true}, nl: nl, proto: proto, links: map[string]int{}, names: map[int]string{},
		t: newDeltaTracker(func(want, have *route) bool { return routeEqual(want.Route, have.Route) }, strings.Compare)}
}

func (m *routeManager) clone() *routeManager {
	c := *m
	c.links, c.names = maps.Clone(m.links), maps.Clone(m.names)
	c.t = m.t.clone()
	return &c
}

func (m *routeManager) kind() string { return KindRoute }

// readBack records the netns's links and our routes as the kernel holds
// them.
func (m *routeManager) readBack(context.Context) error {
	links, err := m.nl.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	return m.readBackWith(links)
}

// readBackWith is readBack with the links already listed (nil: keep those
// known).
func (m *routeManager) readBackWith(links []netlink.Link) error {
	if links != nil {
		clear(m.links)
		clear(m.names)
		for _, l := range links {
			m.links[l.Attrs().Name], m.names[l.Attrs().Index] = l.Attrs().Index, l.Attrs().Name
		}
		m.resolveAll("")
	}
	rs, err := ourRoutes(m.nl, m.proto)
	if err != nil {
		return err
	}
	actual := make(map[string]*route, len(rs))
	for _, r := range rs {
		actual[routeKey(r)] = &route{Route: r, Dev: m.names[r.LinkIndex]}
	}
	m.queued = false
	m.t.ReplaceActual(actual)
	return nil
}

// pending lists the routes to write and delete; a route through a device
// that does not exist cannot be written, so it is not pending.
func (m *routeManager) pending() []string {
	var out []string
	for _, k := range m.t.PendingUpdates() {
		if r, _ := m.t.Desired(k); r.Dev == "" || r.LinkIndex != 0 {
			out = append(out, "replace "+r.String())
		}
	}
	for _, k := range m.t.PendingDeletes() {
		r, _ := m.t.Actual(k)
		out = append(out, "del "+r.String())
	}
	return out
}

// agrees reports a route event that agrees with what the manager holds:
// an added route of ours it holds, or a deleted one it no longer holds
// (the echo of our own writes).
func (m *routeManager) agrees(table int, dst netip.Prefix, proto int, added bool) bool {
	_, held := m.t.Actual(routeKey(netlink.Route{Table: table, Dst: ipNet(dst)}))
	return held == added && (proto == m.proto || !added)
}

// linkIs records that the device name is now l (nil: it does not exist,
// or not yet), and resolves again the desired routes through it: those
// whose index changed become pending.
func (m *routeManager) linkIs(name string, l netlink.Link) {
	if old, ok := m.links[name]; ok {
		delete(m.names, old)
		delete(m.links, name)
	}
	if l != nil {
		m.links[name], m.names[l.Attrs().Index] = l.Attrs().Index, name
	}
	m.resolveAll(name)
}

// resolveAll resolves the desired routes through dev ("": every device)
// again. A route whose index changes is replaced by a new object: the old
// one may be the actual one too.
func (m *routeManager) resolveAll(dev string) {
	for k, r := range m.t.desired {
		if r.Dev == "" || dev != "" && r.Dev != dev || m.links[r.Dev] == r.LinkIndex {
			continue
		}
		m.t.SetDesired(k, m.resolve(*r))
	}
}

// resolve is r with its device's index (0: no such device yet).
func (m *routeManager) resolve(r route) *route {
	if r.Dev != "" {
		r.LinkIndex = m.links[r.Dev]
	}
	return &r
}

// want makes rs desired, besides what already is.
func (m *routeManager) want(rs ...route) {
	for _, r := range rs {
		m.t.SetDesired(routeKey(r.Route), m.resolve(r))
	}
}

// replaceDesired makes rs the only desired routes.
func (m *routeManager) replaceDesired(rs []route) {
	want := make(map[string]*route, len(rs))
	for _, r := range rs {
		want[routeKey(r.Route)] = m.resolve(r)
	}
	m.t.ReplaceDesired(want)
}

func (m *routeManager) applyUpdates(_ context.Context, w *writer) error {
	return m.applyUpdatesWhere(nil, w)
}

func (m *routeManager) applyDeletes(_ context.Context, w *writer) error {
	return m.applyDeletesWhere(nil, w)
}

// applyUpdatesWhere writes the pending routes sel (nil: all) selects. A
// route whose device does not exist stays pending (a dry run lists it).
func (m *routeManager) applyUpdatesWhere(sel func(route) bool, w *writer) error {
	for _, k := range m.t.PendingUpdates() {
		r, _ := m.t.Desired(k)
		if sel != nil && !sel(*r) {
			continue
		}
		if r.Dev != "" && r.LinkIndex == 0 && !w.dry {
			continue
		}
		if err := w.do(KindRoute, "replace "+r.String(), func() error { return m.nl.RouteReplace(&r.Route) }); err != nil {
			return err
		}
		m.t.Written(k, r)
	}
	return nil
}

// applyDeletesWhere deletes the undesired routes sel (nil: all) selects.
func (m *routeManager) applyDeletesWhere(sel func(route) bool, w *writer) error {
	for _, k := range m.t.PendingDeletes() {
		r, _ := m.t.Actual(k)
		if sel != nil && !sel(*r) {
			continue
		}
		if err := w.do(KindRoute, "del "+r.String(), func() error { return ignoreNotExist(m.nl.RouteDel(&r.Route)) }); err != nil {
			return err
		}
		m.t.Removed(k)
	}
	return nil
}

// syncRoutes makes our routes (by protocol, all tables) of a netns exactly
// want.
func syncRoutes(nl kernel.Netlink, proto int, want []route, w *writer) error {
	m := newRouteManager(nl, proto)
	m.replaceDesired(want)
	return convergeNow(context.Background(), m, w)
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
func (d *Dataplane) isInbound(r route) bool {
	return r.Table == d.cfg.Tables.Inbound && r.Gw != nil
}
