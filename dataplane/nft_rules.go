package dataplane

// The nftables backend's rules: the same rules as filter_rules.go renders
// for iptables, in our own inet table, one set of base chains per family
// (a chain's first rule sends the other family on). Each base chain runs
// just before the iptables table it stands for (mangle-1, dstnat-1, ...),
// so that our marks are set first, as a jump at position 1 of the
// built-in chain does. An accept ends only our chain: where the iptables
// rules ACCEPT to stop another agent's NAT, these set up an identity NAT,
// which ends every NAT chain of the hook.

import (
	"net/netip"
	"slices"

	"github.com/google/nftables"

	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

// NFTTable is our table in every netns we write, family inet.
const NFTTable = "ambient-redirect"

var (
	prioRaw    = nftables.ChainPriority(-301) // before conntrack (-200) and iptables' raw (-300)
	prioMangle = nftables.ChainPriority(-151) // before iptables' mangle (-150)
	prioDstNAT = nftables.ChainPriority(-101) // before kube-proxy's DNAT (-100)
	prioFilter = nftables.ChainPriority(-1)   // before iptables' filter (0)
	prioSrcNAT = nftables.ChainPriority(99)   // before masquerading (100)
)

// nftChainName is a base chain of family f: each family's manager owns
// the chains with its suffix.
func nftChainName(name string, f Family) string {
	if f == IPv6 {
		return name + "-ip6"
	}
	return name + "-ip"
}

func nftSet(cfg Config, f Family) nft.Set { return nft.Set{Name: setName(cfg, f), V6: f == IPv6} }

func baseChain(name string, f Family, typ nftables.ChainType, hook *nftables.ChainHook, prio nftables.ChainPriority, rules ...nft.Rule) *nft.Chain {
	p := prio
	// The other family's packets are not this chain's.
	rules = append([]nft.Rule{nft.R(nft.NotFamily(f == IPv6), nft.Return())}, rules...)
	return &nft.Chain{Name: nftChainName(name, f), Type: typ, Hook: hook, Priority: &p, Rules: rules}
}

// NFTRuleset is one family's chains in one netns's table.
type NFTRuleset struct {
	Family Family
	Sets   []nft.Set
	Chains []*nft.Chain
}

// Render is the chains as their rules' texts (golden tests; what a
// manager compares with what it last wrote).
func (r NFTRuleset) Render() string {
	return nft.Table{Name: NFTTable, Chains: r.Chains}.String()
}

func mk(v, mask uint32) nft.Term { return nft.SetMarkX(v, mask) }

// NodeChains renders the node's chains of p.Family for the nftables backend.
func NodeChains(cfg Config, p NodeParams) NFTRuleset {
	m := cfg.Marks
	v6 := p.Family == IPv6
	act, zt := p.active()
	set := setName(cfg, p.Family)
	tcp, ret := nft.TCP(), nft.Return()
	skip := func(ts ...nft.Term) nft.Rule { return append(nft.R(ts...), mk(m.Skip, m.Skip)) }
	returnIf := func(v uint32) nft.Rule { return nft.R(nft.MarkHas(v), ret) }

	var pre []nft.Rule
	for _, dev := range []string{NodeInLink, NodeOutLink} {
		pre = append(pre, skip(nft.IIF(dev)), nft.R(nft.IIF(dev), ret))
	}
	pre = append(pre,
		nft.R(nft.UDP(), nft.DPort("udp", uint16(p.TunnelPort)), ret),
		nft.R(tcp, nft.Syn(false), nft.SetCtMarkX(0, m.ConnSkip|m.Proxy|m.Slot)),
		skip(nft.CtMarkHas(m.ConnSkip)),
		returnIf(m.Skip),
	)
	fromZtunnel := func(z ZtunnelRef) nft.Rule {
		return nft.R(nft.Addr(true, true, nft.Host(z.IP)), nft.IIF(z.Veth), mk(m.Proxy|slotBit(m, z.Slot), m.Proxy|m.Slot))
	}
	switch len(p.Ztunnels) {
	case 0:
		pre = append(pre, returnIf(m.ProxyReturn), returnIf(m.Skip))
	case 1:
		z := p.Ztunnels[0]
		pre = append(pre,
			nft.R(nft.NotIIF(z.Veth), nft.CtMarkHas(m.Proxy|m.Slot), mk(m.Slot, m.Slot)),
			nft.R(nft.NotIIF(z.Veth), nft.CtMarkHas(m.Proxy), mk(m.ProxyReturn, m.ProxyReturn)),
			returnIf(m.ProxyReturn),
			fromZtunnel(z),
			returnIf(m.Skip),
			nft.R(nft.IIF(z.Veth), mk(m.ConnSkip, m.ConnSkip)),
		)
	default:
		for _, z := range p.Ztunnels {
			pre = append(pre, fromZtunnel(z))
		}
		pre = append(pre, returnIf(m.Skip))
		for _, z := range p.Ztunnels {
			pre = append(pre, nft.R(nft.IIF(z.Veth), mk(m.ConnSkip, m.ConnSkip)))
		}
		pre = append(pre, returnIf(m.Skip),
			nft.R(nft.CtMarkHas(m.Proxy|m.Slot), mk(m.Slot, m.Slot)),
			nft.R(nft.CtMarkHas(m.Proxy), mk(m.ProxyReturn, m.ProxyReturn)),
			returnIf(m.ProxyReturn))
	}
	pre = append(pre,
		skip(tcp, nft.Syn(true), nft.CtNew(true)),
		skip(nft.NotL4Proto(6, "tcp"), nft.CtNew(true)),
		nft.R(nft.UDP(), mk(m.ConnSkip, m.ConnSkip)),
		returnIf(m.Skip),
	)
	if p.Capture {
		pre = append(pre, nft.R(tcp, nft.Syn(false), nft.InSet(true, v6, set), mk(m.Outbound, m.Outbound)))
	}

	save := []nft.Rule{
		nft.R(nft.MarkHas(m.ConnSkip), nft.SetCtMarkX(m.ConnSkip, m.ConnSkip)),
		nft.R(nft.MarkMasked(m.Proxy|m.Slot, m.Proxy|m.Slot), nft.SetCtMarkX(m.Proxy|m.Slot, m.Proxy|m.Slot)),
		nft.R(nft.MarkMasked(m.Proxy, m.Proxy|m.Slot), nft.SetCtMarkX(m.Proxy, m.Proxy|m.Slot)),
	}

	out := []nft.Rule{
		nft.R(nft.CtMarkHas(m.Proxy|m.Slot), mk(m.Slot, m.Slot)),
		nft.R(nft.CtMarkHas(m.Proxy), mk(m.ProxyReturn, m.ProxyReturn)),
		returnIf(m.ProxyReturn),
		skip(tcp, nft.Syn(true), nft.InSet(false, v6, set), nft.CtNew(true)),
	}
	// Resets the node makes itself and kubelet probes from HOSTIP go
	// straight to the pod (see NodeRuleset); any other local socket's
	// connection to a pod is captured.
	if p.HostIP.IsValid() {
		out = append(out, nft.R(tcp, nft.InSet(false, v6, set), nft.SocketExists(), nft.Addr(true, true, nft.Host(p.HostIP)), ret))
	}
	out = append(out, nft.R(tcp, nft.InSet(false, v6, set), mk(m.ConnSkip, m.ConnSkip)), save[0])

	natPre := []nft.Rule{nft.R(nft.MarkHas(m.Outbound), nft.KeepDestination(v6))} // ztunnel sees the VIP
	if p.DNS && zt {
		natPre = append(natPre, nft.R(nft.UDP(), nft.InSet(true, v6, set), nft.DPort("udp", 53), nft.DNAT(netip.AddrPortFrom(act.IP, uint16(cfg.DNSPort)))))
	}
	natPost := []nft.Rule{nft.R(nft.MarkHas(m.Outbound), nft.KeepSource(v6))} // no masquerade

	fwd := []nft.Rule{returnIf(m.Outbound)}
	if p.ResetUncaptured {
		for _, src := range []bool{true, false} {
			fwd = append(fwd, nft.R(tcp, nft.Syn(true), nft.InSet(src, v6, set), nft.CtMarkLacks(m.Proxy), nft.RejectReset()))
		}
	}
	if p.FailClosed {
		fwd = []nft.Rule{
			nft.R(tcp, nft.MarkHas(m.Outbound), nft.RejectReset()),
			nft.R(tcp, nft.Syn(false), nft.InSet(false, v6, set), nft.RejectReset()),
		}
	}

	f := p.Family
	raw, vip := vipRules(cfg, p)
	return NFTRuleset{Family: f, Sets: []nft.Set{nftSet(cfg, f), vipFlows(f)}, Chains: []*nft.Chain{
		baseChain("raw-prerouting", f, nftables.ChainTypeFilter, nftables.ChainHookPrerouting, prioRaw, raw...),
		{Name: vipChainName(f), Rules: vip},
		baseChain("prerouting", f, nftables.ChainTypeFilter, nftables.ChainHookPrerouting, prioMangle, pre...),
		baseChain("input", f, nftables.ChainTypeFilter, nftables.ChainHookInput, prioMangle, save...),
		baseChain("forward", f, nftables.ChainTypeFilter, nftables.ChainHookForward, prioMangle, save...),
		// A route chain: a mark set here re-routes the packet, as iptables' mangle OUTPUT does.
		baseChain("output", f, nftables.ChainTypeRoute, nftables.ChainHookOutput, prioMangle, out...),
		baseChain("nat-prerouting", f, nftables.ChainTypeNAT, nftables.ChainHookPrerouting, prioDstNAT, natPre...),
		baseChain("nat-postrouting", f, nftables.ChainTypeNAT, nftables.ChainHookPostrouting, prioSrcNAT, natPost...),
		baseChain("filter-forward", f, nftables.ChainTypeFilter, nftables.ChainHookForward, prioFilter, fwd...),
	}}
}

// vipFlows is the flow map of family f's captured connections to Service
// VIPs.
func vipFlows(f Family) nft.Set {
	return nft.Set{Name: nftChainName("vip-flows", f), V6: f == IPv6, Flows: true}
}

// vipChainName is the regular chain the raw chain sends a family's TCP to
// Service ranges to.
func vipChainName(f Family) string { return nftChainName("vip", f) }

// vipRules keep an ambient pod's captured connections to a Service VIP
// out of conntrack, so that no kube-proxy mode NATs or rejects them before
// ztunnel sees the VIP: kube-proxy's nftables mode DNATs in a table of its
// own, which nothing of ours can end, and rejects forwarded packets still
// addressed to a ClusterIP while their connection is new. The flow map
// stands in for the connection mark: a connection's first packet (a pure
// SYN) records its 4-tuple with the proxy-return mark of the ztunnel
// (slot) it goes to; its later packets take that mark (straight back to
// that ztunnel, as a connmark would send them) and renew it, and the
// ztunnel's answers are untracked too. Connections that began before
// their pod was captured are not in the map and stay tracked (and
// DNATed) as they were. The first chain is the raw base chain's rules,
// the second the regular chain they jump to.
func vipRules(cfg Config, p NodeParams) (raw, vip []nft.Rule) {
	if len(p.ServiceCIDRs) == 0 || len(p.Ztunnels) == 0 {
		return nil, nil
	}
	m, v6, flows := cfg.Marks, p.Family == IPv6, vipFlows(p.Family)
	tcp := nft.TCP()
	for _, svc := range p.ServiceCIDRs {
		r := nft.R(tcp, nft.Addr(false, false, svc))
		for _, z := range p.Ztunnels {
			r = append(r, nft.NotIIF(z.Veth)) // a ztunnel's own (original-source) connections are kube-proxy's
		}
		raw = append(raw, append(r, nft.Jump(vipChainName(p.Family))))
	}
	for _, z := range p.Ztunnels {
		for _, svc := range p.ServiceCIDRs {
			raw = append(raw, nft.R(nft.IIF(z.Veth), tcp, nft.Addr(true, false, svc), nft.ReplyOfFlow(flows), nft.Notrack()))
		}
	}
	if act, ok := p.active(); ok && p.Capture && !p.FailClosed {
		mark := m.ProxyReturn | slotBit(m, act.Slot)
		opening := nft.R(tcp, nft.Syn(false), nft.InSet(true, v6, setName(cfg, p.Family)))
		vip = append(vip,
			append(slices.Clone(opening), nft.ForgetFlow(flows, mark)), // an older connection's, on the same 4-tuple
			append(slices.Clone(opening), nft.RememberFlow(flows, mark, nft.FlowClosing), nft.Notrack(), nft.Return()))
	}
	// The family match only lets nft print the 4-tuple (the base chain
	// already sent the other family on).
	fam := nft.NFProto(v6)
	vip = append(vip, nft.R(fam, nft.MarkFromFlow(flows), nft.Notrack()))
	for slot := range Slots {
		mark := m.ProxyReturn | slotBit(m, slot)
		flow := nft.MarkMasked(mark, m.ProxyReturn|m.Slot)
		vip = append(vip,
			nft.R(nft.CtUntracked(), flow, fam, tcp, nft.FinOrRst(), nft.RenewFlow(flows, mark, nft.FlowClosing), nft.Return()),
			nft.R(nft.CtUntracked(), flow, fam, nft.RenewFlow(flows, mark, 0)))
	}
	return raw, vip
}

// ZtunnelChains renders the TPROXY rules inside the ztunnel netns for the
// nftables backend. iptables' TPROXY drops a packet it finds no socket
// for; a tproxy statement goes on to the next rule, so each is followed
// by that drop.
func ZtunnelChains(cfg Config, p ZtunnelParams) NFTRuleset {
	m, pp := cfg.Marks, cfg.ProxyPorts
	listen := cfg.ZtunnelListenIP
	if p.Family == IPv6 {
		listen = cfg.ZtunnelListenIP6
	}
	var rules []nft.Rule
	tproxy := func(port int, match ...nft.Term) {
		rules = append(rules,
			append(nft.R(match...), nft.TProxyTo(netip.AddrPortFrom(listen, uint16(port))), mk(m.TProxy, m.ZtunnelMask), nft.Accept()),
			append(nft.R(match...), nft.Drop()))
	}
	tproxy(pp.HBONE, nft.IIF(ZtunnelInLink), nft.TCP(), nft.DPort("tcp", uint16(pp.HBONE)))
	tproxy(pp.Outbound, nft.IIF(ZtunnelOutLink), nft.TCP())
	tproxy(pp.Inbound, nft.IIF(ZtunnelInLink), nft.TCP())
	// Replies to ztunnel's original-source sockets are delivered locally.
	rules = append(rules, nft.R(nft.Addr(false, true, nft.Host(p.ZtunnelIP)), nft.IIF(p.Eth), nft.TCP(), mk(m.OrigSrc, m.ZtunnelMask)))
	return NFTRuleset{Family: p.Family, Chains: []*nft.Chain{
		baseChain("prerouting", p.Family, nftables.ChainTypeFilter, nftables.ChainHookPrerouting, prioMangle, rules...),
	}}
}
