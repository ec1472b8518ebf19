package dataplane

// Writing the node's and the ztunnel netns's iptables rules (rendered in filter_rules.go).

import (
	"context"
	"fmt"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

func (d *Dataplane) syncIPTables(ctx context.Context, s *iptables.Syncer, rs iptables.Ruleset, w *writer) error {
	rendered := rs.Render()
	if !w.dry && !d.resync && d.applied[s] == rendered {
		return nil
	}
	if !w.dry {
		delete(d.applied, s)
	}
	if err := runIPTables(ctx, s, rs, w); err != nil {
		return err
	}
	if !w.dry {
		d.applied[s] = rendered
	}
	return nil
}

// runIPTables syncs s to rs (nil removes all our chains) and records the changes.
func runIPTables(ctx context.Context, s *iptables.Syncer, rs iptables.Ruleset, w *writer) error {
	res, err := s.Sync(ctx, rs, w.dry)
	for _, c := range res.Changes {
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: %s/%s %s", KindIPTables, c.Table, c.Chain, c.Reason))
	}
	w.res.Writes[KindIPTables] += res.Restores
	return err
}

func (d *Dataplane) nodeParams(zt *ztRuntime, live []*ztRuntime) NodeParams {
	closed := zt == nil && d.cfg.FailMode == FailClosed
	p := NodeParams{TunnelPort: d.port, Capture: zt != nil || closed, FailClosed: closed, DNS: d.cfg.DNSCapture, Active: zt != nil,
		ResetUncaptured: zt != nil && d.cfg.OnEnroll == OnEnrollReset}
	for _, z := range live {
		p.Ztunnels = append(p.Ztunnels, ZtunnelRef{IP: z.ip, Veth: z.veth.Attrs().Name, Slot: z.slot})
	}
	if zt != nil {
		p.HostIP = zt.hostIP
	}
	return p
}
