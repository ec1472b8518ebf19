package dataplane

// What we keep inside a ztunnel pod's netns.

import (
	"context"
	"errors"
	"fmt"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ztFilterManager is the filter manager of a ztunnel netns's chains of
// family f.
// owner identifies the ztunnel whose netns is at path: another one behind
// a reused path starts with no chains known.
func (d *Dataplane) ztFilterManager(m *managers, path, owner string, f Family, k *kernel.Kernel) (*filterManager, error) {
	if fm, ok := m.ztFilter[path][f]; ok && fm.owner == owner {
		return fm, nil
	}
	cw, err := d.chainWriter(k, f)
	if err != nil {
		return nil, err
	}
	fm := newFilterManager(cw)
	fm.owner = owner
	if m.ztFilter[path] == nil {
		m.ztFilter[path] = map[Family]*filterManager{}
	}
	m.ztFilter[path][f] = fm
	return fm, nil
}

// syncZtunnelNS converges a ztunnel's netns, kind by kind: its tunnels,
// then their sysctls (read after the devices exist), its rules, chains
// and the local route TPROXY needs. Its managers live for one convergence
// but the chains' (reading those back costs a process per table).
func (d *Dataplane) syncZtunnelNS(ctx context.Context, mgr *managers, zt *ztRuntime, port int, w *writer) error {
	k := zt.k
	if mgr.ztFilter[zt.spec.NetNS] == nil {
		mgr.ztFilter[zt.spec.NetNS] = map[Family]*filterManager{} // known before the first write
	}
	if err := d.checkZtunnelConflicts(k.NL); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	if err := d.syncZtunnelObjects(ctx, mgr, zt, port, w); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	return nil
}

func (d *Dataplane) syncZtunnelObjects(ctx context.Context, mgr *managers, zt *ztRuntime, port int, w *writer) error {
	k := zt.k
	in, out := d.tunnelEnds(zt, false, port)
	tunnels := newTunnelManager(k, ZtunnelInLink, ZtunnelOutLink)
	tunnels.setDesired([]tunnelEnd{in, out})
	if err := convergeNow(ctx, tunnels, w); err != nil {
		return err
	}
	want := [][2]string{{"net.ipv4.conf.all.rp_filter", "0"}, {"net.ipv4.conf.default.rp_filter", "0"}}
	want = append(want, ifSysctls(zt.eth.Attrs().Name, false)...)
	for _, l := range []string{ZtunnelInLink, ZtunnelOutLink} {
		want = append(want, ifSysctls(l, true)...)
		if _, ok := zt.ips[IPv6]; ok {
			want = append(want, [2]string{"net.ipv6.conf." + l + ".accept_dad", "0"})
		}
	}
	if err := syncSysctls(k.Sysctl, want, w); err != nil {
		return err
	}
	p, m, proto := d.cfg.Priorities, d.cfg.Marks, d.cfg.RouteProtocol
	var locals []route
	filters := map[Family]*filterManager{}
	var fams []Family
	for _, f := range d.fams {
		ip, ok := zt.ips[f]
		if !ok {
			continue
		}
		rules := []netlink.Rule{
			newRule(f, p.ZtunnelTProxy, d.cfg.Tables.ZtunnelLocal, m.TProxy, m.ZtunnelMask, proto),
			newRule(f, p.ZtunnelOrigSrc, d.cfg.Tables.ZtunnelLocal, m.OrigSrc, m.ZtunnelMask, proto),
		}
		if err := d.syncRules(k.NL, f, rules, w); err != nil {
			return err
		}
		locals = append(locals, route{Route: netlink.Route{Table: d.cfg.Tables.ZtunnelLocal, Dst: ipNet(defaultPrefix(f)),
			Type: unix.RTN_LOCAL, Scope: routeScope(f, netlink.SCOPE_HOST), Protocol: netlink.RouteProtocol(proto)}, Dev: "lo"})
		fm, err := d.ztFilterManager(mgr, zt.spec.NetNS, zt.owner(), f, k)
		if err != nil {
			return err
		}
		fm.setDesired(d.ztunnelChains(ZtunnelParams{Family: f, ZtunnelIP: ip, Eth: zt.eth.Attrs().Name}), nil)
		filters[f] = fm
		fams = append(fams, f)
	}
	err := eachFamily(fams, w, func(f Family, w *writer) error { return filters[f].applyUpdates(ctx, w) })
	if err != nil {
		return err
	}
	routes := newRouteManager(k.NL, proto)
	routes.replaceDesired(locals)
	return convergeNow(ctx, routes, w)
}

// cleanupZtunnelNS removes everything we own from a ztunnel netns.
func (d *Dataplane) cleanupZtunnelNS(ctx context.Context, mgr *managers, path string, w *writer) error {
	delete(mgr.ztFilter, path)
	k, err := d.openNS(path)
	if err != nil {
		return err
	}
	defer k.Close()
	return d.cleanupNS(ctx, k, []string{ZtunnelInLink, ZtunnelOutLink}, w)
}

// cleanupNS removes our chains (both backends), rules, routes and tunnel
// links from one netns.
func (d *Dataplane) cleanupNS(ctx context.Context, k *kernel.Kernel, links []string, w *writer) error {
	errs := []error{d.removeIPTables(ctx, k, w), removeNFTTable(k, w)}
	// syncRules puts the kernel's local rule back before removing ours.
	for _, f := range d.fams {
		if err := d.syncRules(k.NL, f, nil, w); err != nil {
			errs = append(errs, err)
		}
	}
	if err := syncRoutes(k.NL, d.cfg.RouteProtocol, nil, w); err != nil {
		errs = append(errs, err)
	}
	for _, name := range links {
		l, err := k.NL.LinkByName(name)
		if err != nil {
			if !isLinkNotFound(err) {
				errs = append(errs, fmt.Errorf("link %s: %w", name, err))
			}
			continue
		}
		if _, ok := readTunnel(l); !ok {
			continue // same name, not our kind of device: not ours
		}
		errs = append(errs, w.do(KindLink, "del "+name, func() error { return ignoreNotExist(k.NL.LinkDel(l)) }))
	}
	return errors.Join(errs...)
}
