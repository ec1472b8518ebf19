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
