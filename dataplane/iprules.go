package dataplane

// Our ip rules, and the replacement of the kernel's unconditional local rule.

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// nlFamily is the netlink family number of f.
func nlFamily(f Family) int {
	if f == IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func newRule(f Family, prio, table int, mark, mask uint32, proto int) netlink.Rule {
	r := *netlink.NewRule()
	r.Family = nlFamily(f)
	r.Priority = prio
	r.Table = table
	if mask != 0 {
		r.Mark = mark
		r.Mask = &mask
	}
	r.Protocol = uint8(proto)
	return r
}

func (d *Dataplane) nodeRules(f Family) []netlink.Rule {
	p, t, m, proto := d.cfg.Priorities, d.cfg.Tables, d.cfg.Marks, d.cfg.RouteProtocol
	skip := newRule(f, p.Skip, -1, m.Skip, m.Skip, proto)
	skip.Goto = 32766 // the main table's rule
	rules := []netlink.Rule{
		newRule(f, p.ProxyReturn2, t.ProxyReturn2, m.ProxyReturn|m.Slot, m.ProxyReturn|m.Slot, proto),
		skip,
		newRule(f, p.Outbound, t.Outbound, m.Outbound, m.Outbound, proto),
		newRule(f, p.ProxyReturn, t.ProxyReturn, m.ProxyReturn, m.ProxyReturn, proto),
		newRule(f, p.Inbound, t.Inbound, 0, 0, proto),
	}
	if d.cfg.CaptureNodeLocal {
		rules = append([]netlink.Rule{newRule(f, 0, unix.RT_TABLE_LOCAL, 0, m.Outbound|m.ProxyReturn, proto)}, rules...)
	}
	return rules
}

func ruleString(r netlink.Rule) string {
	s := fmt.Sprintf("%d:", r.Priority)
	if r.Family == netlink.FAMILY_V6 {
		s = "-6 " + s
	}
	if r.Src != nil {
		s += " from " + r.Src.String()
	}
	if r.Dst != nil {
		s += " to " + r.Dst.String()
	}
	if r.IifName != "" {
		s += " iif " + r.IifName
	}
	if r.OifName != "" {
		s += " oif " + r.OifName
	}
	if r.Mask != nil {
		s += fmt.Sprintf(" fwmark %#x/%#x", r.Mark, *r.Mask)
	} else if r.Mark != 0 {
		s += fmt.Sprintf(" fwmark %#x", r.Mark)
	}
	if r.Goto > 0 {
		s += fmt.Sprintf(" goto %d", r.Goto)
	} else if r.Table > 0 {
		s += fmt.Sprintf(" lookup %d", r.Table)
	}
	if r.Invert {
		s += " not"
	}
	return s
}

// isLocalRule reports the kernel's unconditional `from all lookup local`.
func isLocalRule(r netlink.Rule) bool {
	return r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL && r.Mark == 0 && (r.Mask == nil || *r.Mask == 0) &&
		r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && !r.Invert
}

// ruleManager owns our ip rules (by protocol) of one family in one netns,
// and the swap of the kernel's unconditional local rule for ours.
type ruleManager struct {
	resyncFlag
	nl    kernel.Netlink
	fam   Family
	proto int
	t     *deltaTracker[string, netlink.Rule]
	// all is every rule of the family as last read back, kept up to date
	// with our writes (the local rule swap looks at the ones not ours).
	all []netlink.Rule
	// swapLocal: ours replaces the kernel's unconditional local rule.
	swapLocal bool
}

func newRuleManager(nl kernel.Netlink, f Family, proto int) *ruleManager {
	return &ruleManager{resyncFlag: resyncFlag{true}, nl: nl, fam: f, proto: proto,
		t: newDeltaTracker(func(_, _ netlink.Rule) bool { return true }, compareRuleKeys)} // the key is the whole rule
}

func (m *ruleManager) kind() string { return fmt.Sprintf("%s %v", KindRule, m.fam) }

func (m *ruleManager) clone() *ruleManager {
	c := *m
	c.t = m.t.clone()
	c.all = slices.Clone(m.all)
	return &c
}

// compareRuleKeys orders rule keys (ruleString) by priority: rules are
// added lowest first, so a more specific one (99) is in place before the
// one it must precede (102) matches.
func compareRuleKeys(a, b string) int {
	prio := func(k string) int {
		k = strings.TrimPrefix(k, "-6 ")
		p, _ := strconv.Atoi(k[:max(strings.IndexByte(k, ':'), 0)])
		return p
	}
	return cmp.Or(cmp.Compare(prio(a), prio(b)), strings.Compare(a, b))
}

// readBack records our rules as the kernel holds them.
func (m *ruleManager) readBack(context.Context) error {
	all, err := m.nl.RuleList(nlFamily(m.fam))
	if err != nil {
		return fmt.Errorf("list %v rules: %w", m.fam, err)
	}
	ours := map[string]netlink.Rule{}
	for _, r := range all {
		if int(r.Protocol) == m.proto {
			ours[ruleString(r)] = r
		}
	}
	m.all, m.queued = all, false
	m.t.ReplaceActual(ours)
	return nil
}

// setDesired makes rules our only rules; with swapLocal, ours replaces the
// kernel's unconditional local rule.
func (m *ruleManager) setDesired(rules []netlink.Rule, swapLocal bool) {
	want := make(map[string]netlink.Rule, len(rules))
	for _, r := range rules {
		want[ruleString(r)] = r
	}
	m.t.ReplaceDesired(want)
	m.swapLocal = swapLocal
}

// kernelLocal is the kernel's unconditional local rule ours replaces, if
// it is there.
func (m *ruleManager) kernelLocal() (netlink.Rule, bool) {
	i := slices.IndexFunc(m.all, func(r netlink.Rule) bool { return int(r.Protocol) != m.proto && isLocalRule(r) })
	if i < 0 || !m.swapLocal {
		return netlink.Rule{}, false
	}
	return m.all[i], true
}

func (m *ruleManager) pending() []string {
	var out []string
	for _, k := range m.t.PendingUpdates() {
		out = append(out, "add "+k)
	}
	if r, ok := m.kernelLocal(); ok {
		out = append(out, "del "+ruleString(r)+" (replaced by ours)")
	}
	for _, k := range m.t.PendingDeletes() {
		out = append(out, "del "+k)
	}
	return out
}

// applyUpdates adds the pending rules, then, with swapLocal, removes the
// kernel's unconditional local rule ours replaces (ours is in place now).
func (m *ruleManager) applyUpdates(_ context.Context, w *writer) error {
	for _, k := range m.t.PendingUpdates() {
		r, _ := m.t.Desired(k)
		if err := w.do(KindRule, "add "+k, func() error { return m.nl.RuleAdd(&r) }); err != nil {
			return err
		}
		m.t.Written(k, r)
		m.all = append(m.all, r)
	}
	r, ok := m.kernelLocal()
	if !ok {
		return nil
	}
	if r.Protocol == 0 {
		return fmt.Errorf("the unconditional local rule has no protocol; cannot delete it without risking ours")
	}
	// The delete names the rule's protocol so it cannot match ours.
	del := newRule(m.fam, 0, unix.RT_TABLE_LOCAL, 0, 0, int(r.Protocol))
	if err := w.do(KindRule, "del "+ruleString(r)+" (replaced by ours)", func() error { return ignoreNotExist(m.nl.RuleDel(&del)) }); err != nil {
		return err
	}
	m.forgetRule(r)
	return nil
}

// applyDeletes deletes ours that are not desired, putting the kernel's
// local rule back first when ours goes, so the node is never without one.
func (m *ruleManager) applyDeletes(_ context.Context, w *writer) error {
	// A local rule of ours that stays (added with a new key, say) keeps
	// the node covered: the kernel's is not put back for it.
	restored := false
	for _, r := range m.t.desired {
		restored = restored || r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL
	}
	for _, k := range m.t.PendingDeletes() {
		r, _ := m.t.Actual(k)
		if r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL && !restored {
			restored = true
			if err := m.restoreLocal(w); err != nil {
				return err
			}
		}
		if err := w.do(KindRule, "del "+k, func() error { return ignoreNotExist(m.nl.RuleDel(&r)) }); err != nil {
			return err
		}
		m.t.Removed(k)
		m.forgetRule(r)
	}
	return nil
}

// forgetRule drops r from all after deleting it.
func (m *ruleManager) forgetRule(r netlink.Rule) {
	m.all = slices.DeleteFunc(m.all, func(o netlink.Rule) bool { return o.Protocol == r.Protocol && ruleString(o) == ruleString(r) })
}

// syncRules makes our rules of family f in a netns exactly want, at once.
func (d *Dataplane) syncRules(nl kernel.Netlink, f Family, want []netlink.Rule, w *writer) error {
	m := newRuleManager(nl, f, d.cfg.RouteProtocol)
	m.setDesired(want, false)
	return convergeNow(context.Background(), m, w)
}

// restoreLocal adds `0: from all lookup local` unless a rule that is not
// ours already does that, at 0 or where another agent moved it (Cilium
// keeps it at 100, the AWS VPC CNI at 20).
func (m *ruleManager) restoreLocal(w *writer) error {
	if slices.ContainsFunc(m.all, func(r netlink.Rule) bool {
		return (isLocalRule(r) || isMovedLocalRule(r)) && int(r.Protocol) != m.proto
	}) {
		return nil
	}
	local := newRule(m.fam, 0, unix.RT_TABLE_LOCAL, 0, 0, unix.RTPROT_KERNEL)
	if err := w.do(KindRule, "add 0: from all lookup local (restore)", func() error { return m.nl.RuleAdd(&local) }); err != nil {
		return err
	}
	m.all = append(m.all, local)
	return nil
}
