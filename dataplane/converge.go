package dataplane

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
)

// converge makes the kernel hold st: a pod-only change on the fast path;
// otherwise prepare reads back the managers with a resync queued, renders
// and hands each manager its desired objects, before the first write;
// then the phases write, in the make-before-break order of transition.go,
// and retired ztunnels are cleaned out.
func (d *Dataplane) converge(ctx context.Context, st State, w *writer) error {
	if err := st.Validate(); err != nil {
		return err
	}
	// Sidecar pods' netns are converged apart, after the node; a resync
	// verifies them with the chains.
	verify := anyResyncQueued(d.mgr.filters())
	defer func() { d.syncSidecars(ctx, st.Sidecars, verify, w) }()
	if f := d.fast; f != nil && !w.dry && sameZtunnel(d.wanted.Ztunnel, st.Ztunnel) && slices.EqualFunc(d.wanted.Draining, st.Draining, sameZtunnel) &&
		slices.Equal(d.wanted.ServiceCIDRs, st.ServiceCIDRs) {
		if !anyResyncQueued(d.mgr.all()) {
			// Pod churn with the same ztunnel: only ipset members and
			// table-100 routes can differ.
			return d.applyPods(st, f, w)
		}
	} else if f != nil && !w.dry {
		// Another ztunnel: veths come and go, and their routes with them.
		queueResync(d.mgr.netlink())
	}
	c, err := d.prepare(ctx, st, w)
	if err != nil {
		return err
	}
	defer c.close()
	m := c.m
	err = d.order.run([]phase{
		{phaseMembersIn, c.each(m.setList(), manager.applyUpdates)},
		{phaseZtunnelNS, c.ztunnelNS},
		{phaseIPRules, c.each(m.ruleList(d.fams), manager.applyUpdates, manager.applyDeletes)},
		{phaseClassify, func() error { return c.writeRules(false, false) }},
		{phaseTunnels, c.tunnels},
		{phaseReach, func() error { return c.reach() }},
		{phaseCapture, func() error { return c.writeRules(true, false) }},
		{phaseInbound, func() error { return m.routes.applyUpdatesWhere(d.isInbound, w) }},
		{phaseInboundOut, func() error { return m.routes.applyDeletesWhere(d.isInbound, w) }},
		{phaseFinalRules, func() error { return c.writeRules(false, true) }},
		{phaseMembersOut, c.each(m.setList(), manager.applyDeletes)},
		{phaseRoutesOut, c.each([]manager{m.routes}, manager.applyDeletes)},
	})
	if err != nil {
		return err
	}
	c.retire()
	return nil
}

// convergence is one full convergence: what it read back and resolved
// before its first write, and what its phases hand on to each other.
type convergence struct {
	d   *Dataplane
	ctx context.Context
	st  State
	w   *writer
	// m are the managers it converges: the dataplane's, or copies (dry).
	m *managers
	// zt is the active ztunnel, live every ztunnel that holds connections
	// (the active one first), runtimes the ones opened (closed at the end).
	zt       *ztRuntime
	draining []*ztRuntime
	// port is the tunnels' UDP port: the first from the configured one
	// that no foreign device uses.
	port     int
	live     []*ztRuntime
	runtimes []*ztRuntime
	// next are the node's rule parameters to converge to, prev those the
	// transition starts from, per family.
	next, prev map[Family]NodeParams
	// objs are the node's objects, rendered before the first write.
	objs nodeObjects
}

// prepare checks the node, resolves the ztunnels, reads back the managers
// with a resync queued, assigns slots, renders the node's objects and
// makes them the managers' desired state: everything before the first
// write.
func (d *Dataplane) prepare(ctx context.Context, st State, w *writer) (_ *convergence, err error) {
	c := &convergence{d: d, ctx: ctx, st: st, w: w, m: &d.mgr, next: map[Family]NodeParams{}, prev: map[Family]NodeParams{}}
	defer func() {
		if err != nil {
			c.close()
		}
	}()
	if w.dry {
		c.m = d.mgr.clone() // see managers.clone
	} else {
		d.fast = nil
		d.pods = podsByUID(st.Pods)
	}
	if err := d.checkForwarding(st); err != nil {
		return nil, err
	}
	if err := d.checkNodeConflicts(ctx); err != nil {
		return nil, err
	}
	if err := c.resolveZtunnels(); err != nil {
		return nil, err
	}
	links, err := d.node.NL.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, m := range c.m.netlink() {
		if m == manager(c.m.routes) && m.resyncQueued() {
			err = c.m.routes.readBackWith(links) // the links are listed already
		} else {
			err = readBackIfQueued(ctx, m)
		}
		if err != nil {
			return nil, err
		}
	}
	c.port = pickPort(d.startPort(), links, map[string]bool{NodeInLink: true, NodeOutLink: true})
	c.live = d.assignSlots(c.zt, c.draining, c.m.routes.t.actual)
	if c.objs, err = d.render(st, facts{zt: c.zt, live: c.live, port: c.port}); err != nil {
		return nil, err
	}
	for _, f := range []Family{IPv4, IPv6} {
		c.m.sets[f].setDesired(c.objs.Members[f])
	}
	for _, f := range d.fams {
		c.m.rules[f].setDesired(c.objs.Rules[f], d.cfg.CaptureNodeLocal)
	}
	c.m.routes.replaceDesired(c.objs.Routes)
	c.m.tunnels.setDesired(c.objs.Tunnels)
	c.m.sysctls.setDesired(c.objs.Sysctls)
	return c, c.readRuleParams()
}

// resolveZtunnels finds the active and the draining ztunnels in the kernel.
func (c *convergence) resolveZtunnels() (err error) {
	d := c.d
	if c.zt, err = d.resolveZtunnel(c.st.Ztunnel); err != nil {
		return err
	}
	if c.zt != nil {
		c.runtimes = append(c.runtimes, c.zt)
	}
	for _, z := range c.st.Draining {
		r, err := d.resolveZtunnel(z)
		if isGone(err) {
			// Its veth or netns is gone: so are its connections.
			d.log.Debug("draining ztunnel gone", zap.String("pod", z.Pod), zap.Error(err))
			continue
		}
		if err != nil {
			// Anything else may pass: dropping it would reset every
			// connection it holds, for good (its slot would be freed).
			return err
		}
		c.runtimes = append(c.runtimes, r)
		c.draining = append(c.draining, r)
	}
	return nil
}

// readRuleParams sets the node's rule parameters to converge to and those
// the transition starts from: what this process last wrote, or, written
// by another process (or not at all), what the chains hold, read back.
func (c *convergence) readRuleParams() error {
	d, m := c.d, c.m
	for _, f := range d.fams {
		c.next[f] = c.objs.Params[f]
		if c.w.dry {
			c.prev[f] = c.next[f] // the dry run writes the final rules only
		}
	}
	if c.w.dry {
		return nil
	}
	var mu sync.Mutex
	return eachFamily(d.fams, c.w, func(f Family, _ *writer) error {
		nf := m.nodeFilter[f]
		if nf.params == nil {
			nf.queueResync() // what the chains hold is all there is to start from
		}
		if err := readBackIfQueued(c.ctx, nf); err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		if nf.params != nil {
			c.prev[f] = *nf.params
		} else {
			c.prev[f] = adoptedParams(d.cfg, c.next[f], nf.actual, c.slotOwners(f))
		}
		return nil
	})
}

// slotOwners are the ztunnels holding a slot of family f as the kernel
// says: each slot table's default route (gateway, device).
func (c *convergence) slotOwners(f Family) []ZtunnelRef {
	var out []ZtunnelRef
	for s := range Slots {
		r, ok := c.m.routes.t.actual[routeKey(netlink.Route{Table: c.d.slotTable(s), Dst: ipNet(defaultPrefix(f))})]
		if !ok || r.Gw == nil || r.Dev == "" {
			continue
		}
		a, _ := netip.AddrFromSlice(r.Gw)
		out = append(out, ZtunnelRef{IP: a.Unmap(), Veth: r.Dev, Slot: s})
	}
	return out
}

func (c *convergence) close() {
	for _, r := range c.runtimes {
		r.k.Close()
	}
}

// each is a phase that runs steps on every manager of ms in turn.
func (c *convergence) each(ms []manager, steps ...func(manager, context.Context, *writer) error) func() error {
	return func() error {
		for _, m := range ms {
			for _, step := range steps {
				if err := step(m, c.ctx, c.w); err != nil {
					return err
				}
			}
		}
		return nil
	}
}

// ztunnelNS programs every live ztunnel's netns, the new one's first: the
// node must never point at a ztunnel that cannot answer yet. Each one's IP
// stays on its veth in our tables (encapsulated packets carry the inner
// mark and must not loop into the tunnel), and its return path (slot
// table) is in place before the tunnels point at it: the routes through
// its veth.
func (c *convergence) ztunnelNS() error {
	for _, z := range c.live {
		if err := c.d.syncZtunnelNS(c.ctx, c.m, z, c.port, c.w); err != nil {
			return err
		}
		veth := z.veth.Attrs().Name
		if err := c.m.routes.applyUpdatesWhere(func(r route) bool { return r.Dev == veth }, c.w); err != nil {
			return err
		}
	}
	return nil
}

// writeRules writes the node's chains: a union of the rules before and
// after (with or without the new capture) during the transition, the
// final ones at its end. The families' chains are separate tables written
// by separate processes: one step writes them at once.
func (c *convergence) writeRules(withCapture, final bool) error {
	if !final && c.w.dry {
		return nil
	}
	vethExists := func(name string) bool {
		_, err := c.d.node.NL.LinkByName(name)
		return err == nil
	}
	return eachFamily(c.d.fams, c.w, func(f Family, w *writer) error {
		p := c.next[f]
		if !final {
			p = unionParams(c.prev[f], c.next[f], vethExists, withCapture)
		}
		nf := c.m.nodeFilter[f]
		nf.setDesired(c.d.nodeChains(p), &p)
		return nf.applyUpdates(c.ctx, w)
	})
}

// tunnels points the node's tunnel devices at the active ztunnel (none
// rendered without one), and tells the route and sysctl managers what
// they are now: routes through a re-created device are written again, as
// are its sysctls.
func (c *convergence) tunnels() error {
	m := c.m
	before := map[string]int{}
	for name, l := range m.tunnels.links {
		before[name] = l.Attrs().Index
	}
	if err := m.tunnels.applyUpdates(c.ctx, c.w); err != nil {
		return err
	}
	for _, name := range m.tunnels.names {
		l := m.tunnels.links[name]
		if _, had := before[name]; l == nil && !had {
			continue
		}
		m.routes.linkIs(name, l)
		if l == nil || before[name] != l.Attrs().Index {
			m.sysctls.forgetDevice(name)
		}
	}
	return nil
}

// reach writes the rendered sysctls and every rendered route but the
// inbound ones.
func (c *convergence) reach() error {
	if err := c.m.sysctls.applyUpdates(c.ctx, c.w); err != nil {
		return err
	}
	return c.m.routes.applyUpdatesWhere(func(r route) bool { return !c.d.isInbound(r) }, c.w)
}

// retire takes our state out of every ztunnel netns the managers know
// (see managers.ztFilter) whose ztunnel holds no connections any more
// (it may still run: this stops it intercepting; best effort, it may be
// gone; dry, it lists what is left there), then records what a pod-only
// apply needs.
func (c *convergence) retire() {
	d := c.d
	var liveNS []string
	for _, z := range c.live {
		liveNS = append(liveNS, z.spec.NetNS)
	}
	for _, old := range c.m.ztunnelNetNS() {
		if slices.Contains(liveNS, old) {
			continue
		}
		if err := d.cleanupZtunnelNS(c.ctx, c.m, old, c.w); err != nil && !c.w.dry {
			d.log.Info("old ztunnel netns not cleaned (likely gone)", zap.String("netns", old), zap.Error(err))
		}
	}
	if c.w.dry {
		return
	}
	d.wanted = State{Ztunnel: cloneZtunnel(c.st.Ztunnel), ServiceCIDRs: slices.Clone(c.st.ServiceCIDRs)}
	for _, z := range c.st.Draining {
		d.wanted.Draining = append(d.wanted.Draining, cloneZtunnel(z))
	}
	d.fast = &fastPath{zt: c.zt, live: c.live}
}
