package dataplane

// The manager contract, and the managers the agent keeps across applies.
//
// Every kind of kernel object we own is converged by one manager per netns
// (and per family where the kernel keeps families apart), as Felix's
// int_dataplane does: the render hands each manager its desired objects
// (setDesired, typed per kind); the manager compares them with what it
// read back or wrote since, and the difference is pending; converge has it
// write its updates and, later, its deletes, in the make-before-break
// order of transition.go. A watcher that sees a kind drift queues a resync
// of that kind's manager alone: the next convergence reads it back first.
// Between resyncs a manager trusts what it wrote, so a convergence reads
// only what may have changed under it.

import (
	"context"
	"maps"
	"slices"
)

// manager is what every kind of kernel object we own implements.
type manager interface {
	kind() string
	// readBack records what the kernel holds of ours (the actual state).
	readBack(ctx context.Context) error
	// pending lists the writes applyUpdates and applyDeletes would make.
	pending() []string
	applyUpdates(ctx context.Context, w *writer) error
	applyDeletes(ctx context.Context, w *writer) error
	// queueResync makes the next convergence read this manager back first.
	queueResync()
	resyncQueued() bool
}

// resyncFlag is the queued read-back every manager embeds.
type resyncFlag struct{ queued bool }

func (r *resyncFlag) queueResync()       { r.queued = true }
func (r *resyncFlag) resyncQueued() bool { return r.queued }

// readBackIfQueued reads m back when a resync of it is queued.
func readBackIfQueued(ctx context.Context, m manager) error {
	if !m.resyncQueued() {
		return nil
	}
	return m.readBack(ctx)
}

// convergeNow reads m back if a resync is queued (a new manager's is) and
// writes everything pending: for objects that go in at once (a ztunnel
// netns's, cleanup's).
func convergeNow(ctx context.Context, m manager, w *writer) error {
	if err := readBackIfQueued(ctx, m); err != nil {
		return err
	}
	if err := m.applyUpdates(ctx, w); err != nil {
		return err
	}
	return m.applyDeletes(ctx, w)
}

type managers struct {
	sets    map[Family]*setManager
	routes  *routeManager
	rules   map[Family]*ruleManager
	tunnels *tunnelManager
	sysctls *sysctlManager
	// nodeFilter are the node's chains, ztFilter each ztunnel netns's, by
	// path and family.
	nodeFilter map[Family]*filterManager
	// A netns is in ztFilter from before our first write there until
	// cleanup took everything of ours out of it.
	ztFilter map[string]map[Family]*filterManager
	// sidecars are the sidecar pods' netns, by pod UID: apart from the
	// node's managers (a pod's failure is its own; see syncSidecars).
	sidecars map[string]*sidecarManager
}

func newManagers() managers {
	return managers{sets: map[Family]*setManager{}, rules: map[Family]*ruleManager{},
		nodeFilter: map[Family]*filterManager{}, ztFilter: map[string]map[Family]*filterManager{}, sidecars: map[string]*sidecarManager{}}
}

// ztunnelNetNS are the netns of every ztunnel we have written into and
// not cleaned out yet, sorted.
func (m *managers) ztunnelNetNS() []string { return slices.Sorted(maps.Keys(m.ztFilter)) }

// netlink are the node's managers that netlink reads back: every kind but
// the chains (reading those back costs a process per table).
func (m *managers) netlink() []manager {
	out := []manager{m.routes, m.tunnels, m.sysctls}
	for _, f := range []Family{IPv4, IPv6} {
		if s := m.sets[f]; s != nil {
			out = append(out, s)
		}
		if r := m.rules[f]; r != nil {
			out = append(out, r)
		}
	}
	return out
}

// filters are every chain manager, the node's and the ztunnel netns's.
func (m *managers) filters() []manager {
	var out []manager
	for _, f := range []Family{IPv4, IPv6} {
		if n := m.nodeFilter[f]; n != nil {
			out = append(out, n)
		}
	}
	for _, fs := range m.ztFilter {
		for _, n := range fs {
			out = append(out, n)
		}
	}
	return out
}

// all are every manager.
func (m *managers) all() []manager { return append(m.netlink(), m.filters()...) }

// queueResync queues a read-back of ms.
func queueResync(ms []manager) {
	for _, m := range ms {
		m.queueResync()
	}
}

// anyResyncQueued reports a manager with a read-back queued.
func anyResyncQueued(ms []manager) bool {
	return slices.ContainsFunc(ms, manager.resyncQueued)
}

// clone copies the managers for a dry run (Diff): it converges the copies,
// recording instead of writing, so what it records is exactly what is
// pending, and what the next apply starts from stays as it was. Every copy
// reads back: a dry run shows the kernel, not what was last written.
func (m *managers) clone() *managers {
	c := newManagers()
	for f, s := range m.sets {
		c.sets[f] = s.clone()
	}
	for f, r := range m.rules {
		c.rules[f] = r.clone()
	}
	c.routes, c.tunnels, c.sysctls = m.routes.clone(), m.tunnels.clone(), m.sysctls.clone()
	for f, n := range m.nodeFilter {
		c.nodeFilter[f] = n.clone()
	}
	for path, fs := range m.ztFilter {
		c.ztFilter[path] = map[Family]*filterManager{}
		for f, n := range fs {
			c.ztFilter[path][f] = n.clone()
		}
	}
	for uid, s := range m.sidecars {
		cp := *s
		c.sidecars[uid] = &cp
	}
	queueResync(c.all())
	return &c
}

// setList are the set managers, IPv4 first; with nftables, one manager
// writing both (see nftSets).
func (m *managers) setList() []manager {
	if m.sets[IPv4].nft != nil {
		return []manager{nftSets{[]*setManager{m.sets[IPv4], m.sets[IPv6]}}}
	}
	return []manager{m.sets[IPv4], m.sets[IPv6]}
}

// ruleList are the rule managers of fams.
func (m *managers) ruleList(fams []Family) []manager {
	out := make([]manager, 0, len(fams))
	for _, f := range fams {
		out = append(out, m.rules[f])
	}
	return out
}
