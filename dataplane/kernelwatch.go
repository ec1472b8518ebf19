package dataplane

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// WatchNetlink reports drift of the node's links, addresses, routes and
// rules as it happens, instead of at the next resync: a netlink
// subscription wakes on changes to our tunnels, their addresses, routes of
// our protocol or in our tables, and ip rules; after a burst settles, what
// the last apply left is read back and compared (our own writes leave no
// difference). When something of ours differs, the netlink managers are
// queued to read back and drifted is called: the caller re-applies. Nothing runs while nothing
// changes. It returns when ctx is done, or at once if it cannot watch.
func (d *Dataplane) WatchNetlink(ctx context.Context, drifted func()) error {
	groups := []int{unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV4_RULE}
	if slices.Contains(d.fams, IPv6) {
		groups = append(groups, unix.RTNLGRP_IPV6_IFADDR, unix.RTNLGRP_IPV6_ROUTE, unix.RTNLGRP_IPV6_RULE)
	}
	changed, err := subscribe(ctx, d.node.InNS, unix.NETLINK_ROUTE, groups, d.aboutOurs, d.log)
	if err != nil {
		return fmt.Errorf("watch netlink: %w", err)
	}
	for settle(ctx, changed) {
		if what := d.nodeDrift(); what != "" {
			d.log.Info("kernel state of ours changed; repairing", zap.String("what", what))
			d.queueNetlinkResync() // only the netlink managers read back
			drifted()
		}
	}
	if ctx.Err() == nil {
		return fmt.Errorf("netlink change events stopped")
	}
	return nil
}

// aboutOurs selects the netlink messages that may concern our objects,
// leaving out the echoes of our own writes: a route event that agrees with
// what the last apply left (read under the lock, so an apply in progress
// has finished), and device or address events of devices that are not
// ours (pods coming and going).
func (d *Dataplane) aboutOurs(m syscall.NetlinkMessage) bool {
	switch m.Header.Type {
	case unix.RTM_NEWLINK, unix.RTM_DELLINK:
		if len(m.Data) < unix.SizeofIfInfomsg {
			return true
		}
		idx := int(binary.NativeEndian.Uint32(m.Data[4:8]))
		name := attrString(m.Data[unix.SizeofIfInfomsg:], unix.IFLA_IFNAME)
		return slices.Contains([]string{NodeInLink, NodeOutLink}, name) || d.ourDevice(idx)
	case unix.RTM_NEWADDR, unix.RTM_DELADDR:
		if len(m.Data) < unix.SizeofIfAddrmsg {
			return true
		}
		return d.ourDevice(int(binary.NativeEndian.Uint32(m.Data[4:8])))
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		if len(m.Data) < unix.SizeofRtMsg {
			return true
		}
		t := d.cfg.Tables
		table, proto := int(m.Data[4]), int(m.Data[5])
		if proto != d.cfg.RouteProtocol && !slices.Contains([]int{t.Inbound, t.Outbound, t.ProxyReturn, t.ProxyReturn2}, table) {
			return false
		}
		return !d.knownRoute(m, m.Header.Type == unix.RTM_NEWROUTE)
	case unix.RTM_NEWRULE, unix.RTM_DELRULE:
		return true // rare; the comparison decides
	}
	return false
}

// ourDevice reports a device the last apply uses: a tunnel or the veth of
// a ztunnel that holds connections.
func (d *Dataplane) ourDevice(idx int) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.fast
	if f == nil {
		return false
	}
	for _, l := range []netlink.Link{f.in, f.out} {
		if l != nil && l.Attrs().Index == idx {
			return true
		}
	}
	return slices.ContainsFunc(f.live, func(z *ztRuntime) bool { return z.veth.Attrs().Index == idx })
}

// knownRoute reports a route event that agrees with what the last apply
// left: an added route of ours it holds, or a deleted one it no longer
// holds. Anything it cannot tell is not known.
func (d *Dataplane) knownRoute(m syscall.NetlinkMessage, added bool) bool {
	family, dstLen, table, proto := int(m.Data[0]), int(m.Data[1]), int(m.Data[4]), int(m.Data[5])
	dst := defaultPrefix(IPv4)
	if family == unix.AF_INET6 {
		dst = defaultPrefix(IPv6)
	}
	if raw := attrBytes(m.Data[unix.SizeofRtMsg:], unix.RTA_DST); raw != nil {
		a, ok := netip.AddrFromSlice(raw)
		if !ok {
			return false
		}
		dst = netip.PrefixFrom(a.Unmap(), dstLen)
	}
	if t := attrBytes(m.Data[unix.SizeofRtMsg:], unix.RTA_TABLE); len(t) == 4 {
		table = int(binary.NativeEndian.Uint32(t))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fast == nil {
		return true // no apply to compare with: the next one reads everything
	}
	_, held := d.mgr.routes.t.Actual(routeKey(netlink.Route{Table: table, Dst: ipNet(dst)}))
	return held == added && (proto == d.cfg.RouteProtocol || !added)
}

// attrString returns a string attribute of a netlink message body.
func attrString(b []byte, typ uint16) string {
	return string(trimNUL(attrBytes(b, typ)))
}

// attrBytes returns the payload of an attribute of a netlink message body,
// nil when absent.
func attrBytes(b []byte, typ uint16) []byte {
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		if l < 4 || l > len(b) {
			return nil
		}
		if binary.NativeEndian.Uint16(b[2:4])&0x3fff == typ {
			return b[4:l]
		}
		b = b[min(len(b), (l+3)&^3):]
	}
	return nil
}

// nodeDrift compares the node's links, addresses, routes and rules of ours
// with what the last apply left; "" when they agree (or nothing was
// applied yet).
func (d *Dataplane) nodeDrift() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.fast
	if f == nil {
		return ""
	}
	nl := d.node.NL
	have, err := ourRoutesByKey(nl, d.cfg.RouteProtocol)
	if err != nil {
		return err.Error()
	}
	for k, r := range d.mgr.routes.t.desired {
		if cur, ok := have[k]; !ok || !routeEqual(r.Route, cur) {
			return "route " + r.String()
		}
	}
	for k := range have {
		if _, ok := d.mgr.routes.t.Desired(k); !ok {
			return "route " + k + " is not ours to have"
		}
	}
	for _, fam := range d.fams {
		rules, err := nl.RuleList(nlFamily(fam))
		if err != nil {
			return err.Error()
		}
		for _, want := range f.rules[fam] {
			if !slices.ContainsFunc(rules, func(r netlink.Rule) bool {
				return int(r.Protocol) == d.cfg.RouteProtocol && ruleString(r) == ruleString(want)
			}) {
				return "rule " + ruleString(want)
			}
		}
	}
	for _, t := range f.tunnels {
		cur, err := nl.LinkByName(t.Name)
		if err != nil || cur.Attrs().Flags&net.FlagUp == 0 {
			return "link " + t.Name
		}
		addrs, err := nl.AddrList(cur, netlink.FAMILY_ALL)
		if err != nil {
			return "addresses of " + t.Name
		}
		for _, p := range t.Addrs {
			if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IPNet.String() == p.String() }) {
				return "address " + p.String() + " of " + t.Name
			}
		}
	}
	return ""
}
