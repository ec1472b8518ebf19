package dataplane

// The pure render: a State plus the facts read from the kernel become the
// node's desired objects, per family. Nothing here reads or writes the
// kernel; converge hands the result to the managers.

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
)

// facts are what the render needs from the kernel: the ztunnels as found
// (addresses, HOSTIP per family, veth, slot). Nothing the convergence
// writes: objects name the devices they use (routes their device, by
// name), so the render runs before the first write.
type facts struct {
	zt   *ztRuntime   // the active ztunnel; nil: none
	live []*ztRuntime // every ztunnel holding a slot, the active one first
	port int          // the tunnels' UDP port
}

// nodeObjects are the node's desired kernel objects.
type nodeObjects struct {
	Members map[Family]map[netip.Addr]string
	Routes  []route
	Rules   map[Family][]netlink.Rule
	// Params are what the chains (Filter) are rendered from: a transition
	// writes unions of the params before and after it (unionParams).
	Params  map[Family]NodeParams
	Filter  map[Family]ruleset
	Tunnels []tunnelEnd
	Sysctls [][2]string
}

// render computes the node's desired objects for st given fx.
func (d *Dataplane) render(st State, fx facts) (nodeObjects, error) {
	o := nodeObjects{Members: map[Family]map[netip.Addr]string{}, Rules: map[Family][]netlink.Rule{},
		Params: map[Family]NodeParams{}, Filter: map[Family]ruleset{}}
	for _, f := range []Family{IPv4, IPv6} {
		m, err := st.members(f)
		if err != nil {
			return o, err
		}
		o.Members[f] = m
	}
	for _, f := range d.fams {
		o.Rules[f] = d.nodeRules(f)
		p := d.nodeParams(fx.zt, fx.live, fx.port, f)
		p.ServiceCIDRs = st.serviceCIDRs(f)
		o.Params[f] = p
		o.Filter[f] = d.nodeChains(o.Params[f])
	}
	if fx.zt != nil {
		in, out := d.tunnelEnds(fx.zt, true, fx.port)
		o.Tunnels = []tunnelEnd{in, out}
	}
	o.Sysctls = d.nodeSysctls(fx.zt, fx.live)
	o.Routes = d.nodeRoutes(st, fx.zt, fx.live)
	return o, nil
}

// String is a stable dump of the objects (golden tests).
func (o nodeObjects) String() string {
	var b strings.Builder
	for _, f := range []Family{IPv4, IPv6} {
		for _, a := range sortedAddrs(o.Members[f]) {
			fmt.Fprintf(&b, "member %v %s %s\n", f, a, o.Members[f][a])
		}
	}
	for _, t := range o.Tunnels {
		fmt.Fprintf(&b, "tunnel %s %s vni %d port %d local %v remote %v mtu %d mac %s peer-mac %s addrs %v peers %v\n",
			t.Name, t.Type, t.VNI, t.Port, t.Local, t.Remote, t.MTU, t.MAC, t.PeerMAC, t.Addrs, t.PeerAddrs)
	}
	for _, kv := range o.Sysctls {
		fmt.Fprintf(&b, "sysctl %s=%s\n", kv[0], kv[1])
	}
	for _, f := range []Family{IPv4, IPv6} {
		for _, r := range o.Rules[f] {
			fmt.Fprintf(&b, "rule %s\n", ruleString(r))
		}
	}
	for _, r := range o.Routes {
		fmt.Fprintf(&b, "route %s\n", r)
	}
	for _, f := range []Family{IPv4, IPv6} {
		if rs, ok := o.Filter[f]; ok {
			fmt.Fprintf(&b, "filter %v\n%s", f, rs.Render())
		}
	}
	return b.String()
}
