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
// otherwise everything is read back, resolved and rendered first
// (prepare), then written in the make-before-break order of
// transition.go, one phase after another, each picking its objects from
// the render, then retired ztunnels are cleaned out.
func (d *Dataplane) converge(ctx context.Context, st State, w *writer) error {
	if err := st.Validate(); err != nil {
		return err
	}
	if f := d.fast; f != nil && !w.dry && !d.resync && !d.resyncIPT && sameZtunnel(f.spec, st.Ztunnel) &&
		slices.EqualFunc(f.draining, st.Draining, sameZtunnel) {
		// Pod churn with the same ztunnel: only ipset members and table-100
		// routes can differ. Everything else is verified by the resync.
		return d.applyPods(st, f, w)
	}
	c, err := d.prepare(ctx, st, w)
	if err != nil {
		return err
	}
	defer c.close()
	err = d.order.run([]phase{
		{phaseMembersIn, c.membersIn},
		{phaseZtunnelNS, c.ztunnelNS},
		{phaseIPRules, c.ipRules},
		{phaseClassify, func() error { return c.writeRules(false, false) }},
		{phaseTunnels, c.tunnels},
		{phaseReach, c.reach},
		{phaseCapture, func() error { return c.writeRules(true, false) }},
		{phaseInbound, func() error { return c.m.routes.applyUpdates(d.isInbound, w) }},
		{phaseInboundOut, func() error { return c.m.routes.applyDeletes(d.isInbound, w) }},
		{phaseFinalRules, func() error { return c.writeRules(false, true) }},
		{phaseMembersOut, c.membersOut},
		{phaseRoutesOut, func() error { return c.m.routes.applyDeletes(nil, w) }},
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
	live     []*ztRuntime
	runtimes []*ztRuntime
	// next are the node's rule parameters to converge to, prev those the
	// transition starts from, rules their writers, per family.
	next, prev map[Family]NodeParams
	rules      map[Family]*ruleWriter
	// objs are the node's objects, rendered before the first write.
	objs nodeObjects
	// inLink and outLink are the node's tunnel devices once written.
	inLink, outLink netlink.Link
}

// prepare checks the node, resolves the ztunnels, reads back the set and
// route managers and what the node's rules were written from, assigns
// slots, renders the node's objects and makes the managers' desired state
// theirs: everything before the first write.
func (d *Dataplane) prepare(ctx context.Context, st State, w *writer) (_ *convergence, err error) {
	c := &convergence{d: d, ctx: ctx, st: st, w: w, m: &d.mgr,
		next: map[Family]NodeParams{}, prev: map[Family]NodeParams{}, rules: map[Family]*ruleWriter{}}
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
	if c.zt, err = d.resolveZtunnel(st.Ztunnel); err != nil {
		return nil, err
	}
	if c.zt != nil {
		c.runtimes = append(c.runtimes, c.zt)
	}
	var draining []*ztRuntime
	for _, z := range st.Draining {
		r, err := d.resolveZtunnel(z)
		if isGone(err) {
			// Its veth or netns is gone: so are its connections.
			d.log.Debug("draining ztunnel gone", zap.String("pod", z.Pod), zap.Error(err))
			continue
		}
		if err != nil {
			// Anything else may pass: dropping it would reset every
			// connection it holds, for good (its slot would be freed).
			return nil, err
		}
		c.runtimes = append(c.runtimes, r)
		draining = append(draining, r)
	}
	for _, f := range []Family{IPv4, IPv6} {
		if err := c.m.sets[f].readBack(d, w); err != nil {
			return nil, err
		}
	}
	links, err := d.node.NL.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	if err := c.m.routes.readBack(links); err != nil {
		return nil, err
	}
	d.port = pickPort(d.startPort(), links, map[string]bool{NodeInLink: true, NodeOutLink: true})
	c.live = d.assignSlots(c.zt, draining, c.m.routes.t.actual)
	if c.objs, err = d.render(st, facts{zt: c.zt, live: c.live}); err != nil {
		return nil, err
	}
	for _, f := range []Family{IPv4, IPv6} {
		c.m.sets[f].t.ReplaceDesired(c.objs.Members[f])
	}
	c.m.routes.replaceDesired(c.objs.Routes)
	return c, c.readRuleParams()
}

// readRuleParams sets the node's rule parameters to converge to and those
// the transition starts from: what this process last wrote, or, written
// by another process (or not at all), what the chains hold.
func (c *convergence) readRuleParams() error {
	d, m := c.d, c.m
	for _, f := range d.fams {
		c.next[f] = c.objs.Params[f]
		if d.resyncIPT {
			m.nodeFilter[f].s.Forget() // verified by what this convergence reads back
		}
		c.rules[f] = &ruleWriter{d: d, m: m.nodeFilter[f], ctx: c.ctx, w: c.w}
		switch {
		case c.w.dry:
			c.prev[f] = c.next[f]
		case m.nodeFilter[f].params != nil:
			c.prev[f] = *m.nodeFilter[f].params
		}
	}
	if c.w.dry {
		return nil
	}
	var mu sync.Mutex
	return eachFamily(d.fams, c.w, func(f Family, _ *writer) error {
		if m.nodeFilter[f].params != nil {
			return nil
		}
		// Not kept as params: that is only ever what this process wrote.
		actual, err := m.nodeFilter[f].s.Actual(c.ctx)
		if err != nil {
			return err
		}
		mu.Lock()
		c.prev[f] = adoptedParams(d.cfg, c.next[f], actual, c.slotOwners(f))
		mu.Unlock()
		c.rules[f].read = true
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

func (c *convergence) membersIn() error {
	for _, f := range []Family{IPv4, IPv6} {
		if err := c.m.sets[f].applyAdds(c.w); err != nil {
			return err
		}
	}
	return nil
}

func (c *convergence) membersOut() error {
	for _, f := range []Family{IPv4, IPv6} {
		if err := c.m.sets[f].applyDeletes(c.w); err != nil {
			return err
		}
	}
	return nil
}

// ztunnelNS programs every live ztunnel's netns, the new one's first: the
// node must never point at a ztunnel that cannot answer yet. Each one's IP
// stays on its veth in our tables (encapsulated packets carry the inner
// mark and must not loop into the tunnel), and its return path (slot
// table) is in place before the tunnels point at it: the routes through
// its veth.
func (c *convergence) ztunnelNS() error {
	for _, z := range c.live {
		if err := c.d.syncZtunnelNS(c.ctx, c.m, z, c.w); err != nil {
			return err
		}
		veth := z.veth.Attrs().Name
		if err := c.m.routes.applyUpdates(func(r route) bool { return r.Dev == veth }, c.w); err != nil {
			return err
		}
	}
	return nil
}

func (c *convergence) ipRules() error {
	for _, f := range c.d.fams {
		if err := c.d.syncRules(c.d.node.NL, f, c.objs.Rules[f], c.d.cfg.CaptureNodeLocal, c.w); err != nil {
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
		c.rules[f].w = w
		return c.rules[f].write(p)
	})
}

// tunnels points the node's tunnel devices at the active ztunnel (none
// rendered without one), and tells the route manager what they are now:
// routes through a re-created device are written again.
func (c *convergence) tunnels() error {
	for _, t := range c.objs.Tunnels {
		l, err := syncTunnel(c.d.node, t, c.w)
		if err != nil {
			return err
		}
		c.m.routes.linkIs(t.Name, l)
		switch t.Name {
		case NodeInLink:
			c.inLink = l
		case NodeOutLink:
			c.outLink = l
		}
	}
	return nil
}

// reach writes the rendered sysctls and every rendered route but the
// inbound ones.
func (c *convergence) reach() error {
	if err := syncSysctls(c.d.node.Sysctl, c.objs.Sysctls, c.w); err != nil {
		return err
	}
	return c.m.routes.applyUpdates(func(r route) bool { return !c.d.isInbound(r) }, c.w)
}

// retire takes our state out of the netns of ztunnels that hold no
// connections any more (they may still run: it stops them intercepting;
// best effort, they may be gone; dry, it lists what is left there), then
// records what a pod-only apply needs.
func (c *convergence) retire() {
	d := c.d
	newNS, liveNS := "", []string{}
	if c.zt != nil {
		newNS = c.zt.spec.NetNS
	}
	for _, z := range c.live {
		liveNS = append(liveNS, z.spec.NetNS)
	}
	for _, old := range d.liveNS { // the active one's (lastZtNS) among them
		if slices.Contains(liveNS, old) {
			continue
		}
		if err := d.cleanupZtunnelNS(c.ctx, old, c.w); err != nil && !c.w.dry {
			d.log.Info("old ztunnel netns not cleaned (likely gone)", zap.String("netns", old), zap.Error(err))
		}
	}
	if c.w.dry {
		return
	}
	d.lastZtNS, d.liveNS = newNS, liveNS
	drain := make([]*Ztunnel, len(c.st.Draining))
	for i, z := range c.st.Draining {
		drain[i] = cloneZtunnel(z)
	}
	d.fast = &fastPath{spec: cloneZtunnel(c.st.Ztunnel), draining: drain, zt: c.zt, live: c.live, in: c.inLink, out: c.outLink,
		rules: c.objs.Rules, tunnels: c.objs.Tunnels}
}
