package dataplane

import (
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestIPVSClusterIPsStayCaptured reasons about kube-proxy's IPVS mode,
// which this kernel cannot run (no IP_VS): IPVS binds every ClusterIP to
// its kube-ipvs0 device, so the local table holds `local <VIP>` and IPVS
// balances at LOCAL_IN. Istio's node-level mode lost VIPs there
// (istio/istio#46354, istio/ztunnel#621): the kernel's `0: from all lookup
// local` delivered a captured packet locally before its mark was looked
// at. Our rule 0 looks up local only for packets without the outbound and
// proxy-return marks, so a captured connection's first packet (0x100) and
// later ones (0x040, 0x1040 for slot 1) reach our tables, and the VIP
// reaches ztunnel unbalanced; an unmarked packet (a non-ambient client)
// still meets the local table, where IPVS balances it.
func TestIPVSClusterIPsStayCaptured(t *testing.T) {
	d := newFakeNode(t).dataplane(t, nil)
	m, tb := d.cfg.Marks, d.cfg.Tables
	// What the kernel adds beside ours: main and default.
	rules := append(d.nodeRules(IPv4), netlink.Rule{Priority: 32766, Table: unix.RT_TABLE_MAIN}, netlink.Rule{Priority: 32767, Table: unix.RT_TABLE_DEFAULT})
	slices.SortFunc(rules, func(a, b netlink.Rule) int { return a.Priority - b.Priority })
	// firstLookup is the table the first matching rule looks up for a
	// packet with mark (a VIP in local is found there: a lookup that
	// finds nothing would fall through, but the VIP's local route is there).
	firstLookup := func(mark uint32) int {
		for _, r := range rules {
			mask := ^uint32(0)
			if r.Mask != nil {
				mask = *r.Mask
			} else if r.Mark == 0 {
				mask = 0
			}
			if mark&mask != r.Mark {
				continue
			}
			if r.Goto > 0 {
				return unix.RT_TABLE_MAIN
			}
			return r.Table
		}
		return -1
	}
	for _, c := range []struct {
		name string
		mark uint32
		want int
	}{
		{"captured SYN (outbound)", m.Outbound, tb.Outbound},
		{"captured connection's later packet (proxy-return)", m.ProxyReturn, tb.ProxyReturn},
		{"captured connection of slot 1", m.ProxyReturn | m.Slot, tb.ProxyReturn2},
		{"non-ambient client (unmarked): IPVS balances it", 0, unix.RT_TABLE_LOCAL},
	} {
		if got := firstLookup(c.mark); got != c.want {
			t.Errorf("%s: mark %#x first looks up table %d, want %d", c.name, c.mark, got, c.want)
		}
	}
	// Without our rule 0 (--capture-node-local=false) the kernel's own
	// would hand the captured SYN to IPVS: the README says so.
	off := newFakeNode(t).dataplane(t, func(c *Config) { c.CaptureNodeLocal = false })
	if slices.ContainsFunc(off.nodeRules(IPv4), func(r netlink.Rule) bool { return r.Priority == 0 }) {
		t.Fatal("rule 0 rendered with CaptureNodeLocal off")
	}
}
