package dataplane

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// WatchNetlink reports drift of the node's links, addresses, routes and
// rules as it happens, instead of at the next resync: a netlink
// subscription wakes on changes to our tunnels, their addresses, routes of
// our protocol or in our tables, and ip rules; after a burst settles, the
// managers of those kinds read back into copies and say what is pending
// (our own writes leave nothing). A manager with something pending gets a
// resync queued, and drifted is called: the caller re-applies. Nothing
// runs while nothing changes. It returns when ctx is done, or at once if
// it cannot watch.
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
		if what := d.nodeDrift(ctx); len(what) > 0 {
			d.log.Info("kernel state of ours changed; repairing", zap.Strings("what", what))
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
	for _, l := range d.mgr.tunnels.links {
		if l.Attrs().Index == idx {
			return true
		}
	}
	return slices.ContainsFunc(f.live, func(z *ztRuntime) bool { return z.veth.Attrs().Index == idx })
}

// knownRoute reports a route event the route manager agrees with (see
// routeManager.agrees). Anything it cannot tell is not known.
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
	return d.mgr.routes.agrees(table, dst, proto, added)
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

// nodeDrift reads the node's routes, tunnels and rules back into copies
// of their managers and queues a resync of each whose copy has something
// pending; it lists what (nothing before the first apply).
func (d *Dataplane) nodeDrift(ctx context.Context) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fast == nil {
		return nil
	}
	type probe struct{ live, copy manager }
	probes := []probe{{d.mgr.routes, d.mgr.routes.clone()}, {d.mgr.tunnels, d.mgr.tunnels.clone()}}
	for _, f := range d.fams {
		probes = append(probes, probe{d.mgr.rules[f], d.mgr.rules[f].clone()})
	}
	var what []string
	for _, p := range probes {
		if err := p.copy.readBack(ctx); err != nil {
			p.live.queueResync()
			what = append(what, p.live.kind()+": "+err.Error())
			continue
		}
		if pending := p.copy.pending(); len(pending) > 0 {
			p.live.queueResync()
			what = append(what, p.live.kind()+": "+strings.Join(pending, ", "))
		}
	}
	return what
}
