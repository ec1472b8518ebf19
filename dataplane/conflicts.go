package dataplane

// Coexistence with the node's other network agents (the primary CNI,
// kube-proxy, a VPN): before programming, and again whenever rules or
// routes change, the node's policy routing and firewall are read and
// checked against what we need for ourselves.
//
// What counts as ours: rules and routes carrying our protocol
// (Config.RouteProtocol), iptables chains with ChainPrefix. Everything
// else is another agent's, and it conflicts when it
//   - holds one of our rule priorities (two rules at one priority: the
//     order between them is the kernel's whim);
//   - sits in one of our route tables (we would route through it, and
//     our read-back would fight it);
//   - matches or sets a mark bit we use (an ip rule's fwmark/mask, an
//     iptables MARK/CONNMARK/TPROXY target or mark/connmark match): our
//     bit set by them steers their packets through ztunnel; theirs set
//     or cleared on ours steers ours elsewhere;
//   - moves the kernel's `lookup local` rule in front of ours (Cilium
//     and the AWS VPC CNI do): captured traffic to the node's own
//     addresses would be delivered before it reaches our rules.
// A conflict is refused, never overwritten: the error names the other
// agent's object and the flag that moves ours out of its way.
//
// Cost: the pure check (findConflicts) runs over data read back: the ip
// rules of both families, one route dump, and the iptables-save text the
// node's filter managers read last (one iptables-save per family only
// when none was read yet, i.e. at start). nftables rulesets of other
// agents (nft list ruleset) are not read: only iptables (legacy or nft
// backend) rules are checked for marks.

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// Conflict kinds.
const (
	ConflictPriority = "rule-priority"
	ConflictTable    = "route-table"
	ConflictMark     = "mark"
	ConflictLocal    = "local-rule"
)

// Conflict is one object of another agent that is in our way.
type Conflict struct {
	Kind string `json:"kind"`
	// Where is "node" or "ztunnel netns".
	Where string `json:"where"`
	// Foreign is the other agent's rule or route, as ip or iptables-save
	// print it.
	Foreign string `json:"foreign"`
	// Detail says what of ours it is in the way of.
	Detail string `json:"detail"`
	// Flags move ours out of its way (with the leading "--").
	Flags []string `json:"flags"`
}

func (c Conflict) String() string {
	return fmt.Sprintf("%s: %s %s; move ours with %s", c.Where, c.Foreign, c.Detail, strings.Join(c.Flags, " / "))
}

// ConflictError is the refusal to program next to conflicting objects.
type ConflictError struct{ Conflicts []Conflict }

// maxListed is how many conflicts an error spells out.
const maxListed = 4

func (e *ConflictError) Error() string {
	var parts []string
	for i, c := range e.Conflicts {
		if i == maxListed {
			parts = append(parts, fmt.Sprintf("and %d more (see /debug/state)", len(e.Conflicts)-maxListed))
			break
		}
		parts = append(parts, c.String())
	}
	return "another network agent is in the way, not programming: " + strings.Join(parts, "; ")
}

// KernelView is what the conflict check reads back from one netns.
type KernelView struct {
	// Rules are the ip rules of every family.
	Rules []netlink.Rule
	// Routes are the routes of every table and family.
	Routes []netlink.Route
	// Links names devices by index (for messages; may be nil).
	Links map[int]string
	// IPTables is the full iptables-save (IPv4) and ip6tables-save (IPv6)
	// text; a family without one is not checked for marks.
	IPTables map[Family]string
}

type named struct {
	v     int
	what  string
	flags []string
}

func flags(names ...string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = "--" + n
	}
	return out
}

func nodePriorityNames(c Config) []named {
	p := c.Priorities
	return []named{
		{p.ProxyReturn2, "slot-1 proxy-return rule", flags(FlagPriorityProxyReturnSlot1)},
		{p.Skip, "skip rule", flags(FlagPrioritySkip)},
		{p.Outbound, "outbound rule", flags(FlagPriorityOutbound)},
		{p.ProxyReturn, "proxy-return rule", flags(FlagPriorityProxyReturn)},
		{p.Inbound, "inbound rule", flags(FlagPriorityInbound)},
	}
}

func nodeTableNames(c Config) []named {
	t := c.Tables
	return []named{
		{t.Inbound, "inbound table", flags(FlagTableInbound)},
		{t.Outbound, "outbound table", flags(FlagTableOutbound)},
		{t.ProxyReturn, "proxy-return table", flags(FlagTableProxyReturn)},
		{t.ProxyReturn2, "slot-1 proxy-return table", flags(FlagTableProxyReturnSlot1)},
	}
}

// markBits are the node's mark bits we use, each with its name and flags.
func markBits(c Config) []struct {
	bits  uint32
	what  string
	flags []string
} {
	m := c.Marks
	return []struct {
		bits  uint32
		what  string
		flags []string
	}{
		{m.Outbound, "outbound", flags(FlagMarkOutbound)},
		{m.Skip, "skip", flags(FlagMarkSkip, FlagMarkConnSkip, FlagMarkProxy)},
		{m.ConnSkip &^ m.Skip, "conn-skip", flags(FlagMarkConnSkip)},
		{m.Proxy &^ m.Skip, "proxy", flags(FlagMarkProxy)},
		{m.ProxyReturn, "proxy-return", flags(FlagMarkProxyReturn)},
		{m.Slot, "slot", flags(FlagMarkSlot)},
	}
}

// NodeMarkBits is every mark bit we use on the node (packet and
// connection marks).
func NodeMarkBits(c Config) uint32 {
	m := c.Marks
	return m.Outbound | m.Skip | m.ConnSkip | m.Proxy | m.ProxyReturn | m.Slot
}

// FindNodeConflicts is the check of the node's netns, pure over what was
// read back.
func FindNodeConflicts(c Config, v KernelView) []Conflict {
	const where = "node"
	var out []Conflict
	out = append(out, priorityConflicts(c, v.Rules, nodePriorityNames(c), where)...)
	out = append(out, tableConflicts(c, v, nodeTableNames(c), where)...)
	ours := NodeMarkBits(c)
	for _, r := range v.Rules {
		if int(r.Protocol) == c.RouteProtocol {
			continue
		}
		if bits := ruleMarkBits(r); bits&ours != 0 {
			what, fl := markOwners(c, bits)
			out = append(out, Conflict{Kind: ConflictMark, Where: where, Foreign: "ip rule " + strconv.Quote(describeRule(r)),
				Detail: fmt.Sprintf("matches mark bits %#x, which our %s use", bits&ours, what), Flags: fl})
		}
		if c.CaptureNodeLocal && isMovedLocalRule(r) {
			p := c.Priorities
			if last := max(p.Outbound, p.ProxyReturn, p.ProxyReturn2); r.Priority < last {
				out = append(out, Conflict{Kind: ConflictLocal, Where: where, Foreign: "ip rule " + strconv.Quote(describeRule(r)),
					Detail: fmt.Sprintf("delivers to the node's own addresses at priority %d, before our outbound and proxy-return rules (up to %d): captured connections to node addresses would escape", r.Priority, last),
					Flags:  flags(FlagPrioritySkip, FlagPriorityOutbound, FlagPriorityProxyReturn, FlagPriorityProxyReturnSlot1, FlagPriorityInbound)})
			}
		}
	}
	for _, f := range []Family{IPv4, IPv6} {
		text, ok := v.IPTables[f]
		if !ok {
			continue
		}
		out = append(out, iptablesMarkConflicts(c, f, text, where)...)
	}
	return out
}

// FindZtunnelConflicts is the check of a ztunnel's netns: its rule
// priorities and its local table (nothing but ztunnel runs there, so its
// marks are not checked).
func FindZtunnelConflicts(c Config, v KernelView) []Conflict {
	const where = "ztunnel netns"
	p := c.Priorities
	out := priorityConflicts(c, v.Rules, []named{
		{p.ZtunnelTProxy, "TPROXY rule", flags(FlagPriorityZtunnelTProxy)},
		{p.ZtunnelOrigSrc, "original-source rule", flags(FlagPriorityZtunnelOrigSrc)},
	}, where)
	return append(out, tableConflicts(c, v, []named{{c.Tables.ZtunnelLocal, "local table", flags(FlagTableZtunnelLocal)}}, where)...)
}

func priorityConflicts(c Config, rules []netlink.Rule, ours []named, where string) []Conflict {
	var out []Conflict
	for _, r := range rules {
		if int(r.Protocol) == c.RouteProtocol {
			continue
		}
		for _, o := range ours {
			if r.Priority == o.v {
				out = append(out, Conflict{Kind: ConflictPriority, Where: where, Foreign: fmt.Sprintf("ip rule %q (protocol %d)", describeRule(r), r.Protocol),
					Detail: fmt.Sprintf("holds priority %d, which our %s needs", r.Priority, o.what), Flags: o.flags})
			}
		}
	}
	return out
}

func tableConflicts(c Config, v KernelView, ours []named, where string) []Conflict {
	var out []Conflict
	for _, r := range v.Routes {
		if int(r.Protocol) == c.RouteProtocol {
			continue
		}
		for _, o := range ours {
			if r.Table == o.v {
				out = append(out, Conflict{Kind: ConflictTable, Where: where, Foreign: fmt.Sprintf("route %q (protocol %d)", describeRoute(r, v.Links), r.Protocol),
					Detail: fmt.Sprintf("sits in table %d, our %s", r.Table, o.what), Flags: o.flags})
			}
		}
	}
	return out
}

// markOwners names our marks that use any of bits, and their flags.
func markOwners(c Config, bits uint32) (string, []string) {
	var whats, fl []string
	for _, m := range markBits(c) {
		if m.bits&bits == 0 {
			continue
		}
		whats = append(whats, fmt.Sprintf("%s (%#x)", m.what, m.bits))
		for _, f := range m.flags {
			if !slices.Contains(fl, f) {
				fl = append(fl, f)
			}
		}
	}
	return strings.Join(whats, ", ") + " marks", fl
}

// claimed is the mark bits a value/mask pair uses: the mask, except that
// a whole-mark mask (or none) claims only the bits of its value (an exact
// match like Cilium's identity marks, or a plain --set-mark 0x1).
func claimed(value, mask uint32) uint32 {
	if mask == 0xffffffff || mask == 0 {
		return value
	}
	return mask
}

// ruleMarkBits are the mark bits an ip rule's fwmark selector looks at.
func ruleMarkBits(r netlink.Rule) uint32 {
	switch {
	case r.Mask != nil:
		return claimed(r.Mark, *r.Mask)
	default:
		return r.Mark
	}
}

// isMovedLocalRule reports an unconditional `lookup local` away from
// priority 0 (the kernel's own one is ours to replace).
func isMovedLocalRule(r netlink.Rule) bool {
	return r.Priority > 0 && r.Table == unix.RT_TABLE_LOCAL && r.Mark == 0 && (r.Mask == nil || *r.Mask == 0) &&
		r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && !r.Invert
}

func describeRule(r netlink.Rule) string {
	s := ruleString(r)
	for n, name := range map[int]string{unix.RT_TABLE_LOCAL: "local", unix.RT_TABLE_MAIN: "main", unix.RT_TABLE_DEFAULT: "default"} {
		s = strings.Replace(s, fmt.Sprintf(" lookup %d", n), " lookup "+name, 1)
	}
	if r.Invert {
		// ruleString appends it; ip prints it first.
		s = strings.Replace(strings.TrimSuffix(s, " not"), ": ", ": not ", 1)
	}
	if !strings.Contains(s, " from ") && !strings.Contains(s, ": not") {
		s = strings.Replace(s, ": ", ": from all ", 1)
	}
	return s
}

func describeRoute(r netlink.Route, links map[int]string) string {
	var b strings.Builder
	if r.Family == netlink.FAMILY_V6 || r.Dst != nil && r.Dst.IP.To4() == nil {
		b.WriteString("-6 ")
	}
	switch r.Type {
	case unix.RTN_LOCAL:
		b.WriteString("local ")
	case unix.RTN_BLACKHOLE:
		b.WriteString("blackhole ")
	case unix.RTN_UNREACHABLE:
		b.WriteString("unreachable ")
	case unix.RTN_THROW:
		b.WriteString("throw ")
	}
	if r.Dst == nil {
		b.WriteString("default")
	} else {
		b.WriteString(r.Dst.String())
	}
	if r.Gw != nil {
		b.WriteString(" via " + r.Gw.String())
	}
	if r.LinkIndex > 0 {
		if n, ok := links[r.LinkIndex]; ok {
			b.WriteString(" dev " + n)
		} else {
			fmt.Fprintf(&b, " dev #%d", r.LinkIndex)
		}
	}
	fmt.Fprintf(&b, " table %d", r.Table)
	return b.String()
}

// iptablesMarkConflicts checks every rule outside our chains of an
// iptables-save text for mark bits we use.
func iptablesMarkConflicts(c Config, f Family, text, where string) []Conflict {
	ours := NodeMarkBits(c)
	tool := "iptables"
	if f == IPv6 {
		tool = "ip6tables"
	}
	var out []Conflict
	table := ""
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
			continue
		case !strings.HasPrefix(line, "-A "):
			continue
		}
		chain, _, _ := strings.Cut(line[3:], " ")
		if strings.HasPrefix(chain, ChainPrefix) {
			continue
		}
		verb, bits := iptablesMarkUse(line)
		if bits&ours == 0 {
			continue
		}
		what, fl := markOwners(c, bits)
		out = append(out, Conflict{Kind: ConflictMark, Where: where, Foreign: fmt.Sprintf("%s -t %s rule %q", tool, table, line),
			Detail: fmt.Sprintf("%s mark bits %#x, which our %s use", verb, bits&ours, what), Flags: fl})
	}
	return out
}

// iptablesMarkUse returns the mark bits an iptables-save rule line matches
// or sets ("matches", "sets", or "matches and sets").
func iptablesMarkUse(line string) (string, uint32) {
	toks := splitRule(line)
	var matched, set uint32
	var nfmask, ctmask uint32 = 0xffffffff, 0xffffffff
	saveRestore := false
	for i := 0; i < len(toks); i++ {
		arg := ""
		if i+1 < len(toks) {
			arg = toks[i+1]
		}
		switch toks[i] {
		case "--mark": // -m mark / -m connmark
			v, m := parseMarkArg(arg)
			matched |= claimed(v, m)
			i++
		case "--set-xmark", "--set-mark", "--tproxy-mark": // MARK, CONNMARK, TPROXY
			v, m := parseMarkArg(arg)
			set |= claimed(v, m)
			i++
		case "--or-mark", "--xor-mark":
			v, _ := parseMarkArg(arg)
			set |= v
			i++
		case "--and-mark":
			v, _ := parseMarkArg(arg)
			set |= ^v
			i++
		case "--save-mark", "--restore-mark":
			saveRestore = true
		case "--nfmask", "--mask":
			nfmask, _ = parseMarkArg(arg)
			i++
		case "--ctmask":
			ctmask, _ = parseMarkArg(arg)
			i++
		}
	}
	if saveRestore {
		// Copies bits between the packet and the connection mark: a whole
		// mask copies ours too.
		set |= nfmask | ctmask
	}
	switch {
	case matched != 0 && set != 0:
		return "matches and sets", matched | set
	case set != 0:
		return "sets", set
	}
	return "matches", matched
}

// parseMarkArg parses "value[/mask]"; no mask is the whole mark.
func parseMarkArg(s string) (value, mask uint32) {
	v, m, hasMask := strings.Cut(s, "/")
	pv, _ := strconv.ParseUint(v, 0, 32)
	if !hasMask {
		return uint32(pv), 0xffffffff
	}
	pm, _ := strconv.ParseUint(m, 0, 32)
	return uint32(pv), uint32(pm)
}

// splitRule splits an iptables-save line into words, keeping quoted
// strings (comments) whole.
func splitRule(line string) []string {
	var out []string
	var cur strings.Builder
	quoted := false
	for i := 0; i < len(line); i++ {
		ch := line[i]
		switch {
		case ch == '\\' && quoted && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case ch == '"':
			quoted = !quoted
		case ch == ' ' && !quoted:
			if cur.Len() > 0 {
				out = append(out, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteByte(ch)
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}

// readKernelView reads the rules of fams and every route of one netns.
func readKernelView(nl kernel.Netlink, fams []Family) (KernelView, error) {
	var v KernelView
	for _, f := range fams {
		rules, err := nl.RuleList(nlFamily(f))
		if err != nil {
			return v, fmt.Errorf("list %v rules: %w", f, err)
		}
		v.Rules = append(v.Rules, rules...)
	}
	routes, err := nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return v, fmt.Errorf("list routes: %w", err)
	}
	v.Routes = routes
	return v, nil
}

// nameLinks fills v.Links when a conflict names a route's device.
func nameLinks(nl kernel.Netlink, v *KernelView) {
	links, err := nl.LinkList()
	if err != nil {
		return
	}
	v.Links = map[int]string{}
	for _, l := range links {
		v.Links[l.Attrs().Index] = l.Attrs().Name
	}
}

// NodeConflicts reads the node back and returns what is in our way. The
// iptables rules are those the last full apply read (the periodic resync
// reads them anyway); only when none were read yet does it run
// iptables-save itself (once per family, at start). A family whose
// iptables cannot be read is not checked for marks.
func (d *Dataplane) NodeConflicts(ctx context.Context) ([]Conflict, error) {
	v, err := readKernelView(d.node.NL, d.fams)
	if err != nil {
		return nil, err
	}
	v.IPTables = map[Family]string{}
	for _, f := range d.fams {
		s := d.iptSyncer(f)
		if s == nil {
			continue
		}
		text := s.Saved()
		if text == "" {
			if text, err = s.Runner().Save(ctx, ""); err != nil {
				d.log.Info("cannot read iptables for the mark conflict check", zap.Stringer("family", f), zap.Error(err))
				continue
			}
			s.NoteSaved(text)
		}
		v.IPTables[f] = text
	}
	cs := FindNodeConflicts(d.cfg, v)
	if slices.ContainsFunc(cs, func(c Conflict) bool { return c.Kind == ConflictTable }) {
		nameLinks(d.node.NL, &v)
		cs = FindNodeConflicts(d.cfg, v)
	}
	return cs, nil
}

// checkNodeConflicts refuses to program the node next to another agent's
// objects in our way.
func (d *Dataplane) checkNodeConflicts(ctx context.Context) error {
	cs, err := d.NodeConflicts(ctx)
	if err != nil {
		return err
	}
	if len(cs) > 0 {
		return &ConflictError{Conflicts: cs}
	}
	return nil
}

// checkZtunnelConflicts refuses to program a ztunnel netns next to
// another agent's rules at our priorities or routes in our table.
func (d *Dataplane) checkZtunnelConflicts(nl kernel.Netlink) error {
	v, err := readKernelView(nl, d.fams)
	if err != nil {
		return err
	}
	cs := FindZtunnelConflicts(d.cfg, v)
	if len(cs) == 0 {
		return nil
	}
	nameLinks(nl, &v)
	return &ConflictError{Conflicts: FindZtunnelConflicts(d.cfg, v)}
}

// WatchConflicts reports the node's conflicts (NodeConflicts) at once,
// within a moment of any ip rule or route change, and every period: an
// agent that starts after us and takes a priority, a table or a mark is
// reported while what works keeps working (the next full apply refuses
// to write; nothing of ours is removed). report gets the whole current
// list, empty when none. It returns when ctx is done, or at once if it
// cannot watch.
func (d *Dataplane) WatchConflicts(ctx context.Context, period time.Duration, report func([]Conflict)) error {
	groups := []int{unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV4_RULE}
	if slices.Contains(d.fams, IPv6) {
		groups = append(groups, unix.RTNLGRP_IPV6_ROUTE, unix.RTNLGRP_IPV6_RULE)
	}
	changed, err := subscribe(ctx, d.node.InNS, unix.NETLINK_ROUTE, groups, d.mayConflict, d.log)
	if err != nil {
		return fmt.Errorf("watch for conflicts: %w", err)
	}
	if period <= 0 {
		period = 30 * time.Second
	}
	kick := make(chan struct{}, 1)
	go func() {
		defer close(kick)
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-changed:
				if !ok {
					return
				}
			case <-tick.C:
			}
			select {
			case kick <- struct{}{}:
			default:
			}
		}
	}()
	check := func() {
		cs, err := d.NodeConflicts(ctx)
		if err != nil {
			d.log.Info("conflict check failed; retrying at the next change", zap.Error(err))
			return
		}
		report(cs)
	}
	check()
	for settle(ctx, kick) {
		check()
	}
	if ctx.Err() == nil {
		return fmt.Errorf("netlink change events stopped")
	}
	return nil
}

// mayConflict selects rule events, and route events of another protocol
// in one of our tables.
func (d *Dataplane) mayConflict(m syscall.NetlinkMessage) bool {
	switch m.Header.Type {
	case unix.RTM_NEWRULE:
		return true
	case unix.RTM_NEWROUTE:
		if len(m.Data) < unix.SizeofRtMsg {
			return true
		}
		table, proto := int(m.Data[4]), int(m.Data[5])
		if t := attrBytes(m.Data[unix.SizeofRtMsg:], unix.RTA_TABLE); len(t) == 4 {
			table = int(binary.NativeEndian.Uint32(t))
		}
		tb := d.cfg.Tables
		return proto != d.cfg.RouteProtocol && slices.Contains([]int{tb.Inbound, tb.Outbound, tb.ProxyReturn, tb.ProxyReturn2}, table)
	case unix.RTM_DELRULE, unix.RTM_DELROUTE:
		return true // a conflict may have gone
	}
	return false
}

// ConflictReport keeps the conflicts last found, for the ready check,
// /debug/state and the metric.
type ConflictReport struct {
	mu  sync.Mutex
	cur []Conflict
	log *zap.Logger
}

// NewConflictReport returns an empty report; log may be nil.
func NewConflictReport(log *zap.Logger) *ConflictReport {
	if log == nil {
		log = zap.NewNop()
	}
	return &ConflictReport{log: log}
}

// Set records the current conflicts, logging when they change.
func (r *ConflictReport) Set(cs []Conflict) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if slices.EqualFunc(r.cur, cs, func(a, b Conflict) bool { return a.String() == b.String() }) {
		return
	}
	if len(cs) == 0 {
		r.log.Info("no more conflicts with other network agents")
	} else {
		r.log.Error("another network agent is in the way: what is programmed stays, nothing more is written until it is resolved",
			zap.Error(&ConflictError{Conflicts: cs}))
	}
	r.cur = slices.Clone(cs)
}

// Get returns the current conflicts.
func (r *ConflictReport) Get() []Conflict {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.cur)
}

// Err is nil without conflicts, else a ConflictError (a ready check).
func (r *ConflictReport) Err() error {
	if cs := r.Get(); len(cs) > 0 {
		return &ConflictError{Conflicts: cs}
	}
	return nil
}
