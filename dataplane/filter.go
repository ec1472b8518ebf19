package dataplane

// Writing the node's and the ztunnel netns's iptables rules (rendered in filter_rules.go).

import (
	"context"
	"fmt"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// filterManager owns our iptables chains of one family in one netns: the
// ruleset last converged to (what the kernel holds as far as this process
// knows; "" unknown) and, on the node, the parameters it was rendered
// from, which a transition starts from. The chains themselves (ownership
// by prefix, read-back, learned kernel formats) are the Syncer's.
type filterManager struct {
	s       *iptables.Syncer
	written string
	params  *NodeParams
	// owner is the ztunnel whose netns holds the chains ("" on the node).
	owner string
}

func newFilterManager(r iptables.Runner) *filterManager {
	return &filterManager{s: iptables.NewSyncer(r, ChainPrefix)}
}

// apply converges the chains to rs. A ruleset equal to the one last
// converged to costs nothing unless verify (the resync reads back: reading
// costs a process per table).
func (m *filterManager) apply(ctx context.Context, rs iptables.Ruleset, verify bool, w *writer) error {
	rendered := rs.Render()
	if !verify && m.written == rendered {
		return nil
	}
	m.written = "" // a table may be written, another not
	if err := runIPTables(ctx, m.s, rs, w); err != nil {
		return err
	}
	m.written = rendered
	return nil
}

// update converges the chains to rs starting from the tables as this
// convergence last read them back (see iptables.Syncer.Update): the later
// steps of a transition do not read them again.
func (m *filterManager) update(ctx context.Context, rs iptables.Ruleset, w *writer) error {
	rendered := rs.Render()
	m.written = ""
	res, err := m.s.Update(ctx, rs)
	recordIPTables(res, w)
	if err != nil {
		return err
	}
	m.written = rendered
	return nil
}

// clone is a copy that verifies the chains on its first apply (Diff).
func (m *filterManager) clone() *filterManager {
	c := *m
	c.written = ""
	return &c
}

// forget makes the next apply read back.
func (m *filterManager) forget() { m.written, m.params = "", nil }

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
func (d *Dataplane) nodeParams(zt *ztRuntime, live []*ztRuntime, f Family) NodeParams {
	active := zt != nil && zt.ips[f].IsValid()
	closed := !active && d.cfg.FailMode == FailClosed
	p := NodeParams{Family: f, TunnelPort: d.port, Capture: active || closed, FailClosed: closed, DNS: d.cfg.DNSCapture, Active: active,
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
