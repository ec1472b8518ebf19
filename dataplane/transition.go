package dataplane

import (
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
	"slices"
	"strings"
)

// Make before break.
//
// A change of capture state is a sequence of kernel writes, and a
// connection can start between any two of them. Every Apply and Cleanup
// therefore writes in one fixed order, decided here and in converge only:
// everything that captures or blocks is in place before anything that
// allowed capture is removed, and inbound capture never exists without the
// outbound capture that keeps a pod's replies out of the inbound tunnel.
//
// Capture is layered, and each layer only works on top of the one below:
//
//	block     fail-closed REJECTs (filter FORWARD)
//	reach     the ztunnel netns rules, its IP routed to its veth in our
//	          tables, the tunnels, the table-101/102 defaults, ip rules
//	classify  mangle rules that tell a ztunnel's own packets from a pod's
//	outbound  the capture mark (mangle) for the set's members
//	inbound   per-pod table-100 routes (rule 103 sends anything to them
//	          into istioin, replies to a pod's direct connections included)
//
// Make (nothing is removed): set members added; the new ztunnel's netns;
// routes to its IP; classify every live ztunnel (old and new) and keep
// existing REJECTs and marks; point the tunnels at it; the other reach
// routes and rules; add outbound capture; add inbound routes.
//
// Break (nothing is added): inbound routes that go; the final iptables
// rules (REJECTs, marks and old ztunnels' classification leave); set
// members that go; the remaining routes; the old ztunnel's netns.
//
// Cleanup is all break, in the same order: inbound routes, chains, sets,
// rules, routes, tunnels, then ztunnel netns.
//
// The iptables steps of a transition are unions of the rules before and
// after it (unionParams); between transitions they equal the final rules,
// so a steady state writes each table at most once.

// The phases of converge, in the order above. Each is one step of the
// list converge hands to phaseOrder.run.
const (
	phaseMembersIn  = "members in"
	phaseZtunnelNS  = "ztunnel netns and its reach routes"
	phaseIPRules    = "ip rules"
	phaseClassify   = "classify every live ztunnel, keep REJECTs and marks"
	phaseTunnels    = "tunnels point at the active ztunnel"
	phaseReach      = "sysctls, table-101/102 routes"
	phaseCapture    = "outbound capture"
	phaseInbound    = "inbound routes in"
	phaseInboundOut = "inbound routes out"
	phaseFinalRules = "final rules"
	phaseMembersOut = "members out"
	phaseRoutesOut  = "remaining routes out"
)

// phase is one named step of a transition.
type phase struct {
	name string
	run  func() error
}

// phaseOrder runs a transition's phases in order. swap, set only by the
// package's tests, exchanges two phases by name: the journal test proves
// it can tell a broken order from the right one.
type phaseOrder struct {
	swap [2]string
}

func (o phaseOrder) run(ps []phase) error {
	if o.swap[0] != "" {
		i := slices.IndexFunc(ps, func(p phase) bool { return p.name == o.swap[0] })
		j := slices.IndexFunc(ps, func(p phase) bool { return p.name == o.swap[1] })
		if i >= 0 && j >= 0 {
			ps = slices.Clone(ps)
			ps[i], ps[j] = ps[j], ps[i]
		}
	}
	for _, p := range ps {
		if err := p.run(); err != nil {
			return err
		}
	}
	return nil
}

// unionParams renders the node's rules for the middle of a transition from
// prev to next: every ztunnel either side knows (and whose veth is still
// there) is classified, REJECTs stay while either side has them, and capture
// stays if prev had it (and is added when withCapture says the reach layer
// is ready).
func unionParams(prev, next NodeParams, vethExists func(string) bool, withCapture bool) NodeParams {
	u := next
	u.FailClosed = prev.FailClosed || next.FailClosed
	u.Capture = prev.Capture || (withCapture && next.Capture)
	u.ResetUncaptured = prev.ResetUncaptured || (withCapture && next.ResetUncaptured)
	u.Ztunnels = slices.Clone(next.Ztunnels)
	for _, z := range prev.Ztunnels {
		if !slices.ContainsFunc(u.Ztunnels, func(o ZtunnelRef) bool { return o.Veth == z.Veth }) && vethExists(z.Veth) {
			u.Ztunnels = append(u.Ztunnels, z)
		}
	}
	return u
}

// adoptedParams reads back what the node's rules were written from, for a
// transition that starts in a process that did not write them (a restart,
// perhaps with other flags): the capture mark, the REJECTs and the
// classified ztunnels are all a transition's order depends on. The
// classified ztunnels are the slot owners zts, read back into the route
// model (each slot table's default route): they are classified for as long
// as their slot routes exist (classify ⊆ slot routes in every phase order).
func adoptedParams(cfg Config, next NodeParams, actual map[string]map[string][]string, zts []ZtunnelRef) NodeParams {
	p := NodeParams{Family: next.Family, TunnelPort: next.TunnelPort, DNS: next.DNS, Ztunnels: zts, ServiceCIDRs: next.ServiceCIDRs}
	m := cfg.Marks
	// Our chains as either backend writes them: the capture rule sets the
	// outbound mark on members of the set; the forward chain's resets
	// check the proxy connmark (on enrolment) or not (fail closed).
	pre := actual["mangle"][ChainPrefix+"PREROUTING"]
	fwd := actual["filter"][ChainPrefix+"FORWARD"]
	capture, captureMark := "--match-set "+setName(cfg, next.Family)+" src", setMark(m.Outbound)
	reject, resetUncaptured := "REJECT", "-m connmark ! --mark"
	if t, ok := actual["inet "+NFTTable]; ok {
		pre, fwd = t[nftChainName("prerouting", next.Family)], t[nftChainName("filter-forward", next.Family)]
		capture, captureMark = "saddr @"+setName(cfg, next.Family), nft.SetMarkX(m.Outbound, m.Outbound).String()
		reject, resetUncaptured = "reject", nft.CtMarkLacks(m.Proxy).String()
	}
	for _, r := range pre {
		if strings.Contains(r, capture) && strings.HasSuffix(r, captureMark) {
			p.Capture = true
		}
	}
	for _, r := range fwd {
		switch {
		case strings.Contains(r, reject) && strings.Contains(r, resetUncaptured):
			p.ResetUncaptured = true
		case strings.Contains(r, reject):
			p.FailClosed = true
		}
	}
	return p
}
