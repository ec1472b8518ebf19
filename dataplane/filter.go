package dataplane

// Writing the node's and the ztunnel netns's iptables rules (rendered in filter_rules.go).

import (
	"context"
	"fmt"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// ruleset is one family's chains in one netns as a backend renders them.
type ruleset interface{ Render() string }

// chainWriter writes one family's chains of ours in one netns: iptables
// tables by iptables-restore, or the chains of our nftables table through
// netlink.
type chainWriter interface {
	// read forgets what was last written and reads our chains back, by
	// table (iptables) or by table name (nftables), then chain.
	read(ctx context.Context) (map[string]map[string][]string, error)
	// update writes want where it differs from what was last read back or
	// written.
	update(ctx context.Context, want ruleset, w *writer) error
	// sync reads back, then writes want where it differs (nil: removes all
	// of ours); dry, it records what it would write.
	sync(ctx context.Context, want ruleset, w *writer) error
}

// filterManager owns our chains of one family in one netns: the ruleset
// last converged to (what the kernel holds as far as this process knows;
// "" unknown) and, on the node, the parameters it was rendered from,
// which a transition starts from. The chains themselves are the writer's.
type filterManager struct {
	resyncFlag
	cw      chainWriter
	written string
	params  *NodeParams
	// want is the ruleset to converge to, wantParams what it was rendered
	// from (nil in a ztunnel netns).
	want       ruleset
	wantParams *NodeParams
	// actual are our chains as last read back (adoption parses them).
	actual map[string]map[string][]string
	// owner is the ztunnel whose netns holds the chains ("" on the node).
	owner string
}

// syncer is the iptables writer's Syncer (nil with nftables).
func (m *filterManager) syncer() *iptables.Syncer {
	if c, ok := m.cw.(*iptChains); ok {
		return c.s
	}
	return nil
}

func newFilterManager(cw chainWriter) *filterManager {
	return &filterManager{resyncFlag: resyncFlag{true}, cw: cw}
}

func (m *filterManager) kind() string {
	if _, ok := m.cw.(*nftChains); ok {
		return KindNFT
	}
	return KindIPTables
}

// setDesired makes rs (rendered from p, nil in a ztunnel netns) the chains
// to converge to.
func (m *filterManager) setDesired(rs ruleset, p *NodeParams) { m.want, m.wantParams = rs, p }

// readBack reads our chains: the writes after it start from what it read.
func (m *filterManager) readBack(ctx context.Context) error {
	actual, err := m.cw.read(ctx)
	if err != nil {
		return err
	}
	m.actual, m.written, m.queued = actual, "", false
	return nil
}

func (m *filterManager) pending() []string {
	switch {
	case m.queued:
		return []string{"read back and converge chains"}
	case m.want.Render() != m.written:
		return []string{"write chains"}
	}
	return nil
}

// applyUpdates converges the chains to the desired ruleset: nothing when
// it is the one last converged to; otherwise the chains that differ from
// what was last read back or written (with a resync queued, read first).
// A dry run reads back and records.
func (m *filterManager) applyUpdates(ctx context.Context, w *writer) error {
	rendered := m.want.Render()
	if w.dry {
		return m.cw.sync(ctx, m.want, w)
	}
	if !m.queued && m.written == rendered {
		return nil
	}
	m.written, m.params = "", nil // a table may be written, another not
	var err error
	if m.queued {
		err = m.cw.sync(ctx, m.want, w)
	} else {
		err = m.cw.update(ctx, m.want, w)
	}
	if err != nil {
		m.queued = true
		return err
	}
	m.written, m.params, m.queued = rendered, m.wantParams, false
	return nil
}

// applyDeletes does nothing: a write replaces whole chains, so deletes
// are part of updates.
func (m *filterManager) applyDeletes(context.Context, *writer) error { return nil }

// clone is a copy for a dry run (Diff).
func (m *filterManager) clone() *filterManager {
	c := *m
	c.cw = cloneWriter(m.cw)
	return &c
}

// forget makes the next convergence read back, with nothing known.
func (m *filterManager) forget() { m.written, m.params, m.queued = "", nil, true }

// iptChains writes our chains with iptables; the Syncer owns them
// (ownership by prefix, read-back, learned kernel formats).
type iptChains struct{ s *iptables.Syncer }

func newIPTChains(r iptables.Runner) *iptChains {
	return &iptChains{iptables.NewSyncer(r, ChainPrefix)}
}

func (c *iptChains) read(ctx context.Context) (map[string]map[string][]string, error) {
	c.s.Forget()
	return c.s.Actual(ctx)
}

func (c *iptChains) update(ctx context.Context, want ruleset, w *writer) error {
	res, err := c.s.Update(ctx, want.(iptables.Ruleset))
	recordIPTables(res, w)
	return err
}

func (c *iptChains) sync(ctx context.Context, want ruleset, w *writer) error {
	rs, _ := want.(iptables.Ruleset)
	return runIPTables(ctx, c.s, rs, w)
}

func cloneWriter(cw chainWriter) chainWriter {
	switch c := cw.(type) {
	case *nftChains:
		cp := *c
		return &cp
	}
	return cw // the Syncer's learned formats are shared: a dry run reads back
}

// runIPTables syncs s to rs (nil removes all our chains) and records the changes.
func runIPTables(ctx context.Context, s *iptables.Syncer, rs iptables.Ruleset, w *writer) error {
	res, err := s.Sync(ctx, rs, w.dry)
	recordIPTables(res, w)
	return err
}

func recordIPTables(res iptables.Result, w *writer) {
	for _, c := range res.Changes {
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: %s/%s %s", KindIPTables, c.Table, c.Chain, c.Reason))
	}
	w.res.Writes[KindIPTables] += res.Restores
}

// nodeParams are the inputs of the node's rules of family f. A ztunnel
// without an address of f is no ztunnel for f: its fail mode applies.
func (d *Dataplane) nodeParams(zt *ztRuntime, live []*ztRuntime, port int, f Family) NodeParams {
	active := zt != nil && zt.ips[f].IsValid()
	closed := !active && d.cfg.FailMode == FailClosed
	p := NodeParams{Family: f, TunnelPort: port, Capture: active || closed, FailClosed: closed, DNS: d.cfg.DNSCapture, Active: active,
		ResetUncaptured: active && d.cfg.OnEnroll == OnEnrollReset}
	for _, z := range live {
		if ip, ok := z.ips[f]; ok {
			p.Ztunnels = append(p.Ztunnels, ZtunnelRef{IP: ip, Veth: z.veth.Attrs().Name, Slot: z.slot})
		}
	}
	if active {
		p.HostIP = zt.hostIPs[f]
	}
	return p
}
