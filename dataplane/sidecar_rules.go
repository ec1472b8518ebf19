package dataplane

// A sidecar pod's rules, rendered as data: one nftables table of family
// inet in the pod's netns (both families share it; IPv6 is captured only
// when the pod is dual-stack and asks for it). Each rule is a list of
// terms that carry both their nft text (golden tests, the rule's comment,
// which is how the read-back recognises it) and their netlink
// expressions. Netlink, not iptables-restore: a pod event starts no
// process.

import (
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

// SidecarTable is our table in a sidecar pod's netns.
const SidecarTable = "ambient-redirect-sidecar"

// Chains of the table.
const (
	scNatPrerouting    = "nat-prerouting"
	scNatOutput        = "nat-output"
	scManglePrerouting = "mangle-prerouting"
	scMangleOutput     = "mangle-output"
	scInbound          = "inbound"
	scInRedirect       = "in-redirect"
	scOutput           = "output"
	scRedirect         = "redirect"
	scTProxyInbound    = "tproxy-inbound"
	scDivert           = "divert"
	scTProxy           = "tproxy"
)

// passthrough is the source the proxy's inbound connections to the app use
// (never captured again), per family.
func passthrough(f Family) netip.Addr {
	if f == IPv6 {
		return netip.MustParseAddr("::6")
	}
	return netip.MustParseAddr("127.0.0.6")
}

func loopback(f Family) netip.Addr {
	if f == IPv6 {
		return netip.IPv6Loopback()
	}
	return netip.MustParseAddr("127.0.0.1")
}

// SidecarRules renders a sidecar pod's table: Istio's sidecar capture
// (see ../shared/reference/sidecar.md), in the order istio-iptables writes
// it, for the families s captures.
func SidecarRules(s Sidecar) nft.Table {
	c := s.Capture
	fams := s.families()
	tproxyMode := c.Mode == SidecarTProxy
	natPre := &nft.Chain{Name: scNatPrerouting, Hook: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Type: nftables.ChainTypeNAT}
	natOut := &nft.Chain{Name: scNatOutput, Hook: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest, Type: nftables.ChainTypeNAT}
	inRedirect := &nft.Chain{Name: scInRedirect, Rules: []nft.Rule{nft.R(nft.TCP(), nft.Redirect(SidecarInboundPort))}}
	redir := &nft.Chain{Name: scRedirect, Rules: []nft.Rule{nft.R(nft.TCP(), nft.Redirect(SidecarOutboundPort))}}
	t := nft.Table{Name: SidecarTable}

	// Packets of a family we do not capture leave every base chain at once.
	skipV6 := func(ch *nft.Chain) {
		if len(fams) == 1 {
			ch.Rules = append(ch.Rules, nft.R(nft.NFProto(true), nft.Return()))
		}
	}
	// toRedirect captures outbound traffic matching extra: every address,
	// or the included ranges.
	toRedirect := func(extra ...nft.Term) []nft.Rule {
		if c.OutboundCIDRs == nil {
			return []nft.Rule{nft.R(append(extra, nft.Jump(scRedirect))...)}
		}
		var rules []nft.Rule
		for _, p := range c.OutboundCIDRs {
			if captures(fams, p) {
				rules = append(rules, nft.R(append(append(slices.Clone(extra), nft.Addr(false, false, p)), nft.Jump(scRedirect))...))
			}
		}
		return rules
	}

	// Inbound (nat, REDIRECT mode; TPROXY mode's is in mangle).
	skipV6(natPre)
	for _, i := range c.ExcludeInterfaces {
		natPre.Rules = append(natPre.Rules, nft.R(nft.IIF(i), nft.Return()))
	}
	// Rerouted (virtual machine) interfaces: their inbound is outbound.
	for _, i := range c.RerouteInterfaces {
		natPre.Rules = append(natPre.Rules, toRedirect(nft.IIF(i))...)
		natPre.Rules = append(natPre.Rules, nft.R(nft.IIF(i), nft.Return()))
	}
	var inbound *nft.Chain
	if !tproxyMode {
		natPre.Rules = append(natPre.Rules, nft.R(nft.TCP(), nft.Jump(scInbound)))
		inbound = &nft.Chain{Name: scInbound, Rules: inboundRules(c, SidecarAlwaysExcludedInbound, func(extra ...nft.Term) nft.Rule {
			return nft.R(append(append([]nft.Term{nft.TCP()}, extra...), nft.Jump(scInRedirect))...)
		})}
	}

	// Outbound, the same in both modes: REDIRECT to the outbound listener.
	skipV6(natOut)
	for _, p := range c.ExcludeOutboundPorts {
		natOut.Rules = append(natOut.Rules, nft.R(nft.UDP(), nft.DPort("udp", p), nft.Return()))
	}
	if c.DNS {
		// The app's DNS goes to the proxy's resolver; the proxy's own does not.
		natOut.Rules = append(natOut.Rules,
			nft.R(nft.UDP(), nft.DPort("udp", 53), nft.Owner(false, false, c.ProxyUID), nft.Return()),
			nft.R(nft.UDP(), nft.DPort("udp", 53), nft.Owner(true, false, c.ProxyGID), nft.Return()),
			nft.R(nft.UDP(), nft.DPort("udp", 53), nft.Redirect(SidecarDNSPort)))
	}
	natOut.Rules = append(natOut.Rules, nft.R(nft.NotL4Proto(unix.IPPROTO_TCP, "tcp"), nft.Return()), nft.R(nft.Jump(scOutput)))
	output := &nft.Chain{Name: scOutput}
	for _, i := range c.ExcludeInterfaces {
		output.Rules = append(output.Rules, nft.R(nft.OIF(i, false), nft.Return()))
	}
	for _, p := range c.ExcludeOutboundPorts {
		output.Rules = append(output.Rules, nft.R(nft.TCP(), nft.DPort("tcp", p), nft.Return()))
	}
	for _, f := range fams {
		output.Rules = append(output.Rules, nft.R(nft.Addr(true, false, nft.Host(passthrough(f))), nft.OIF("lo", false), nft.Return()))
	}
	for _, gid := range []bool{false, true} {
		id := c.proxyID(gid)
		for _, f := range fams {
			// The proxy's own connection to this pod's address: inbound
			// (but its HBONE port).
			output.Rules = append(output.Rules, nft.R(nft.Addr(false, true, nft.Host(loopback(f))), nft.OIF("lo", false), nft.TCP(),
				nft.NotDPort("tcp", 15008), nft.Owner(gid, false, id), nft.Jump(scInRedirect)))
		}
		output.Rules = append(output.Rules,
			nft.R(nft.OIF("lo", false), nft.Owner(gid, true, id), nft.Return()), // the app's own loopback traffic
			nft.R(nft.Owner(gid, false, id), nft.Return()))                      // the proxy's upstream connections
	}
	if c.DNS {
		output.Rules = append(output.Rules, nft.R(nft.TCP(), nft.DPort("tcp", 53), nft.Redirect(SidecarDNSPort)))
	}
	for _, f := range fams {
		output.Rules = append(output.Rules, nft.R(nft.Addr(false, false, nft.Host(loopback(f))), nft.Return()))
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		if captures(fams, p) {
			output.Rules = append(output.Rules, nft.R(nft.Addr(false, false, p), nft.Return()))
		}
	}
	for _, p := range c.IncludeOutboundPorts {
		output.Rules = append(output.Rules, nft.R(nft.TCP(), nft.DPort("tcp", p), nft.Jump(scRedirect)))
	}
	output.Rules = append(output.Rules, toRedirect()...)

	t.Chains = append(t.Chains, natPre, natOut)
	if inbound != nil {
		t.Chains = append(t.Chains, inbound)
	}
	t.Chains = append(t.Chains, inRedirect, output, redir)
	if tproxyMode || c.InvalidDrop {
		t.Chains = append(t.Chains, mangleChains(c, fams, tproxyMode)...)
	}
	return t
}

// inboundRules are the inbound chain's rules: excluded ports return, then
// every other port (or the included ones) is captured by capture(match).
func inboundRules(c SidecarCapture, always []uint16, capture func(...nft.Term) nft.Rule) []nft.Rule {
	var rules []nft.Rule
	if c.InboundPorts == nil {
		for _, p := range append(slices.Clone(always), c.ExcludeInboundPorts...) {
			rules = append(rules, nft.R(nft.TCP(), nft.DPort("tcp", p), nft.Return()))
		}
		return append(rules, capture())
	}
	for _, p := range c.InboundPorts {
		rules = append(rules, capture(nft.DPort("tcp", p)))
	}
	return rules
}

// sidecarOwnMark (1338) marks the proxy's own connections to this pod's
// address over lo, which TPROXY mode captures inbound.
const sidecarOwnMark = SidecarTProxyMark + 1

// mangleChains are TPROXY mode's chains (inbound keeps the client's
// address) and the INVALID drop.
func mangleChains(c SidecarCapture, fams []Family, tproxyMode bool) []*nft.Chain {
	pre := &nft.Chain{Name: scManglePrerouting, Hook: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle, Type: nftables.ChainTypeFilter}
	if c.InvalidDrop {
		pre.Rules = append(pre.Rules, nft.R(nft.CtInvalid(), nft.Drop()))
	}
	if !tproxyMode {
		return []*nft.Chain{pre}
	}
	if len(fams) == 1 {
		pre.Rules = append(pre.Rules, nft.R(nft.NFProto(true), nft.Return()))
	}
	for _, i := range c.ExcludeInterfaces {
		pre.Rules = append(pre.Rules, nft.R(nft.IIF(i), nft.Return()))
	}
	pre.Rules = append(pre.Rules,
		nft.R(nft.TCP(), nft.Jump(scTProxyInbound)),
		nft.R(nft.TCP(), nft.MarkIs(SidecarTProxyMark), nft.SaveMark()))
	in := &nft.Chain{Name: scTProxyInbound, Rules: []nft.Rule{nft.R(nft.TCP(), nft.MarkIs(SidecarTProxyMark), nft.Return())}}
	for _, f := range fams {
		in.Rules = append(in.Rules, nft.R(nft.Addr(true, false, nft.Host(passthrough(f))), nft.IIF("lo"), nft.TCP(), nft.Return()))
	}
	// Loopback traffic stays local, but the proxy's own connections to
	// this pod's address (marked in mangle-output).
	in.Rules = append(in.Rules, nft.R(nft.IIF("lo"), nft.TCP(), nft.MarkIsNot(sidecarOwnMark), nft.Return()))
	// 15008 is not skipped in TPROXY mode (Istio's skip sits in a chain
	// that mode does not use): it reaches the proxy.
	in.Rules = append(in.Rules, inboundRules(c, SidecarAlwaysExcludedInbound[1:], func(extra ...nft.Term) nft.Rule {
		return nft.R(append(append([]nft.Term{nft.TCP()}, extra...), nft.Jump(scTProxy))...)
	})...)
	divert := &nft.Chain{Name: scDivert, Rules: []nft.Rule{nft.R(nft.SetMark(SidecarTProxyMark), nft.Accept())}}
	tp := &nft.Chain{Name: scTProxy, Rules: []nft.Rule{nft.R(nft.TCP(), nft.CtEstablished(), nft.Jump(scDivert))}}
	for _, f := range fams {
		tp.Rules = append(tp.Rules, nft.R(nft.Addr(false, true, nft.Host(loopback(f))), nft.TCP(), nft.SetMark(SidecarTProxyMark), nft.TProxy(f == IPv6, SidecarInboundPort), nft.Accept()))
	}
	// The proxy's connections to the app from the client's address carry
	// its mark; the app's replies get it back from the connection, and the
	// mark's rule delivers them to the proxy.
	out := &nft.Chain{Name: scMangleOutput, Hook: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle, Type: nftables.ChainTypeRoute,
		Rules: []nft.Rule{nft.R(nft.OIF("lo", false), nft.TCP(), nft.MarkIs(SidecarTProxyMark), nft.Return())}}
	for _, gid := range []bool{false, true} {
		id := c.proxyID(gid)
		for _, f := range fams {
			out.Rules = append(out.Rules, nft.R(nft.Addr(false, true, nft.Host(loopback(f))), nft.OIF("lo", false), nft.TCP(),
				nft.Owner(gid, false, id), nft.SetMark(sidecarOwnMark)))
		}
	}
	out.Rules = append(out.Rules, nft.R(nft.TCP(), nft.CtMarkIs(SidecarTProxyMark), nft.RestoreMark()))
	return []*nft.Chain{pre, in, divert, tp, out}
}

// proxyID is the proxy's gid (gid) or uid, which the owner matches exempt.
func (c SidecarCapture) proxyID(gid bool) uint32 {
	if gid {
		return c.ProxyGID
	}
	return c.ProxyUID
}

// captures reports a prefix of a family the rules capture.
func captures(fams []Family, p netip.Prefix) bool {
	for _, f := range fams {
		if FamilyOf(p.Addr()) == f {
			return true
		}
	}
	return false
}
