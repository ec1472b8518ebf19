package dataplane

import (
	"fmt"
	"net/netip"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// NodeParams are the inputs of the node's iptables rules.
type NodeParams struct {
	// Family picks iptables or ip6tables, the set and the host prefixes.
	Family Family
	// Ztunnels are the ztunnels whose connections the node carries, each
	// with its slot; the active one (new connections) first when Active.
	Ztunnels []ZtunnelRef
	Active   bool
	// HostIP is the node's address towards the active ztunnel.
	HostIP     netip.Addr
	TunnelPort int
	// Capture marks ambient pods' TCP for ztunnel (false = fail open, no ztunnel).
	Capture bool
	// FailClosed rejects ambient pods' new TCP, both ways, while there is no ztunnel.
	FailClosed bool
	// ResetUncaptured resets ambient pods' TCP connections that no ztunnel
	// carries (opened before enrolment), both ways (--on-enroll=reset).
	ResetUncaptured bool
	DNS             bool
	// ServiceCIDRs are the cluster's Service ranges of the family: the
	// nftables backend keeps captured connections to them untracked.
	ServiceCIDRs []netip.Prefix
}

// active returns the ztunnel new connections go to.
func (p NodeParams) active() (ZtunnelRef, bool) {
	if !p.Active || len(p.Ztunnels) == 0 {
		return ZtunnelRef{}, false
	}
	return p.Ztunnels[0], true
}

// syn matches a connection's opening packet (a pure SYN), as iptables-save
// prints it. Capture is decided on it rather than on conntrack's NEW: a
// pod reusing the 4-tuple of a connection still in TIME_WAIT sends a SYN
// that conntrack files under the old entry (not NEW), old connmark
// included.
const syn = "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN"

// notSyn is every TCP packet but a pure SYN.
const notSyn = "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN"

// mark renders "0x100/0x100" as iptables-save prints marks.
func mark(v, mask uint32) string { return fmt.Sprintf("%#x/%#x", v, mask) }

func setMark(v uint32) string { return "-j MARK --set-xmark " + mark(v, v) }

func matchMark(v uint32) string { return "-m mark --mark " + mark(v, v) }

func matchConnmark(v uint32) string { return "-m connmark --mark " + mark(v, v) }

func saveMark(v uint32) string {
	return fmt.Sprintf("%s -j CONNMARK --save-mark --nfmask %#x --ctmask %#x", matchMark(v), v, v)
}

// NodeRuleset renders the node's chains, in the reference order and in the
// form iptables-save prints them.
func NodeRuleset(cfg Config, p NodeParams) iptables.Ruleset {
	m := cfg.Marks
	act, zt := p.active()
	set := setName(cfg, p.Family)

	var pre []string
	for _, dev := range []string{NodeInLink, NodeOutLink} {
		pre = append(pre, "-i "+dev+" "+setMark(m.Skip), "-i "+dev+" -j RETURN")
	}
	// The tunnel copies the inner mark to the outer packet: never re-mark it.
	pre = append(pre,
		fmt.Sprintf("-p udp -m udp --dport %d -j RETURN", p.TunnelPort),
		// A new connection starts with no connection mark of ours, even on
		// a reused 4-tuple whose old entry conntrack still keeps.
		fmt.Sprintf("%s -j CONNMARK --set-xmark 0x0/%#x", syn, m.ConnSkip|m.Proxy|m.Slot),
		matchConnmark(m.ConnSkip)+" "+setMark(m.Skip),
		matchMark(m.Skip)+" -j RETURN",
	)
	switch len(p.Ztunnels) {
	case 0:
		pre = append(pre, matchMark(m.ProxyReturn)+" -j RETURN", matchMark(m.Skip)+" -j RETURN")
	case 1:
		z := p.Ztunnels[0]
		// Replies to ztunnel's spoofed-source connections go back to the
		// ztunnel (its slot) that made them.
		pre = append(pre,
			"! -i "+z.Veth+" "+matchConnmark(m.Proxy|m.Slot)+" "+setMark(m.Slot),
			"! -i "+z.Veth+" "+matchConnmark(m.Proxy)+" "+setMark(m.ProxyReturn),
			matchMark(m.ProxyReturn)+" -j RETURN",
			fmt.Sprintf("! -s %s -i %s %s", host(z.IP), z.Veth, proxyMark(m, z.Slot)),
			matchMark(m.Skip)+" -j RETURN",
			// ztunnel's own traffic (xDS, HBONE to other nodes).
			"-i "+z.Veth+" "+setMark(m.ConnSkip),
		)
	default:
		pre = append(pre, multiRules(m, p.Ztunnels)...)
	}
	pre = append(pre,
		// Only a connection's first packet can start a capture: what is
		// left here of a later one was not captured at its start (begun
		// before its pod was enrolled, or mid-transition), so it stays
		// direct, both ways, instead of going to a ztunnel that has no
		// socket for it.
		notSyn+" -m conntrack ! --ctstate NEW "+setMark(m.Skip),
		"! -p tcp -m conntrack ! --ctstate NEW "+setMark(m.Skip),
		"-p udp "+setMark(m.ConnSkip), // UDP is not captured
		matchMark(m.Skip)+" -j RETURN",
	)
	if p.Capture {
		// Capture is decided on a connection's first packet; later ones
		// follow the connmark its ztunnel set (0x210 -> 0x040).
		pre = append(pre, syn+" -m set --match-set "+set+" src "+setMark(m.Outbound))
	}

	save := []string{saveMark(m.ConnSkip), saveProxy(m)}

	out := []string{
		// A node process answering a connection that came through ztunnel answers ztunnel.
		matchConnmark(m.Proxy|m.Slot) + " " + setMark(m.Slot),
		matchConnmark(m.Proxy) + " " + setMark(m.ProxyReturn),
		matchMark(m.ProxyReturn) + " -j RETURN",
		// A node connection to an ambient pod keeps the path it began with
		// (one opened before the pod was enrolled stays direct).
		fmt.Sprintf("%s -m set --match-set %s dst -m conntrack ! --ctstate NEW %s", notSyn, set, setMark(m.Skip)),
	}
	// TCP resets the node makes itself (REJECT; no socket) for an ambient
	// pod go straight to it: through table 100 they would vanish into the
	// tunnel, e.g. while fail-closed REJECTs and new pod routes overlap in a
	// ztunnel switch, and the pod would wait for a SYN retransmit.
	out = append(out, fmt.Sprintf("-p tcp -m owner ! --socket-exists -m set --match-set %s dst %s", set, setMark(m.ConnSkip)))
	// Kubelet probes from HOSTIP are not captured, nor are the pod's replies.
	// With no ztunnel there is no HOSTIP and all host-originated TCP to
	// ambient pods goes directly, so probes keep working in either fail mode.
	probe := fmt.Sprintf("-p tcp -m owner --socket-exists -m set --match-set %s dst %s", set, setMark(m.ConnSkip))
	if p.HostIP.IsValid() {
		probe = fmt.Sprintf("-s %s %s", host(p.HostIP), probe)
	}
	out = append(out, probe)
	out = append(out, saveMark(m.ConnSkip))

	natPre := []string{matchMark(m.Outbound) + " -j ACCEPT"} // skip kube-proxy DNAT: ztunnel sees the VIP
	if p.DNS && zt {
		natPre = append(natPre, fmt.Sprintf("-p udp -m set --match-set %s src -m udp --dport 53 -j DNAT --to-destination %s", set, netip.AddrPortFrom(act.IP, uint16(cfg.DNSPort))))
	}

	// Accept captured traffic before kube-proxy's REJECT of endpoint-less VIPs.
	filterFwd := []string{matchMark(m.Outbound) + " -j ACCEPT"}
	if p.ResetUncaptured {
		// A later packet of a connection no ztunnel carries (no proxy
		// connmark): it began before its pod was enrolled.
		for _, dir := range []string{"src", "dst"} {
			filterFwd = append(filterFwd, fmt.Sprintf("%s -m set --match-set %s %s -m connmark ! --mark %s -j REJECT --reject-with tcp-reset", notSyn, set, dir, mark(m.Proxy, m.Proxy)))
		}
	}
	if p.FailClosed {
		// With no ztunnel, captured traffic is forwarded by main (our tables
		// are empty): reset it here, before it leaves, and inbound too.
		filterFwd = []string{
			"-p tcp " + matchMark(m.Outbound) + " -j REJECT --reject-with tcp-reset",
			// New connections only: a direct one begun while capture was
			// off (fail open) keeps flowing, replies included.
			syn + " -m set --match-set " + set + " dst -j REJECT --reject-with tcp-reset",
		}
	}

	return iptables.Ruleset{
		{Table: "mangle", Name: ChainPrefix + "PREROUTING", Parent: "PREROUTING", Rules: pre},
		{Table: "mangle", Name: ChainPrefix + "INPUT", Parent: "INPUT", Rules: save},
		{Table: "mangle", Name: ChainPrefix + "FORWARD", Parent: "FORWARD", Rules: save},
		{Table: "mangle", Name: ChainPrefix + "OUTPUT", Parent: "OUTPUT", Rules: out},
		{Table: "mangle", Name: ChainPrefix + "POSTROUTING", Parent: "POSTROUTING"},
		{Table: "nat", Name: ChainPrefix + "PREROUTING", Parent: "PREROUTING", Rules: natPre},
		{Table: "nat", Name: ChainPrefix + "POSTROUTING", Parent: "POSTROUTING", Rules: []string{matchMark(m.Outbound) + " -j ACCEPT"}},
		{Table: "filter", Name: ChainPrefix + "FORWARD", Parent: "FORWARD", Rules: filterFwd},
	}
}

// ZtunnelRef names one ztunnel's address, host veth and slot: the
// connection-mark bit and proxy-return table that pin its connections to it.
type ZtunnelRef struct {
	IP   netip.Addr
	Veth string
	Slot int
}

// Slots is how many ztunnels can hold connections at once: the active one
// and one draining (a surge rollout's old ztunnel).
const Slots = 2

// slotBit is the mark bit of a slot (slot 0 has none).
func slotBit(m Marks, slot int) uint32 {
	if slot == 1 {
		return m.Slot
	}
	return 0
}

// proxyMark marks a ztunnel's spoofed-source packets with the proxy mark
// and its slot bit (clearing the other slot's).
func proxyMark(m Marks, slot int) string {
	return "-j MARK --set-xmark " + mark(m.Proxy|slotBit(m, slot), m.Proxy|m.Slot)
}

// saveProxy saves the proxy mark and the slot bit to the connection.
func saveProxy(m Marks) string {
	return fmt.Sprintf("%s -j CONNMARK --save-mark --nfmask %#x --ctmask %#x", matchMark(m.Proxy), m.Proxy|m.Slot, m.Proxy|m.Slot)
}

// multiRules are rules 6-10 of the reference for several ztunnels at once
// (a surge rollout). "! -i ZVETH" cannot name two devices, so every
// ztunnel's own packets are classified (and returned) first; what is left
// is not from any ztunnel, which is what rule 6 asks. For one ztunnel this
// order is equivalent to the reference's.
func multiRules(m Marks, zs []ZtunnelRef) []string {
	var out []string
	for _, z := range zs {
		out = append(out, fmt.Sprintf("! -s %s -i %s %s", host(z.IP), z.Veth, proxyMark(m, z.Slot)))
	}
	out = append(out, matchMark(m.Skip)+" -j RETURN")
	for _, z := range zs {
		out = append(out, "-i "+z.Veth+" "+setMark(m.ConnSkip))
	}
	return append(out,
		matchMark(m.Skip)+" -j RETURN",
		matchConnmark(m.Proxy|m.Slot)+" "+setMark(m.Slot),
		matchConnmark(m.Proxy)+" "+setMark(m.ProxyReturn),
		matchMark(m.ProxyReturn)+" -j RETURN",
	)
}

// host renders an address as iptables-save prints a host: a /32 or /128.
func host(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// setName is the ipset of family f.
func setName(cfg Config, f Family) string {
	if f == IPv6 {
		return cfg.IPSetNameV6
	}
	return cfg.IPSetName
}

// ZtunnelParams are the inputs of the ztunnel netns rules.
type ZtunnelParams struct {
	Family    Family
	ZtunnelIP netip.Addr
	// Eth is the pod side of the ztunnel's veth (usually eth0).
	Eth string
}

// ZtunnelRuleset renders the TPROXY rules inside the ztunnel netns.
func ZtunnelRuleset(cfg Config, p ZtunnelParams) iptables.Ruleset {
	m, pp := cfg.Marks, cfg.ProxyPorts
	tproxy := func(port int) string {
		listen := cfg.ZtunnelListenIP
		if p.Family == IPv6 {
			listen = cfg.ZtunnelListenIP6
		}
		return fmt.Sprintf("-j TPROXY --on-port %d --on-ip %s --tproxy-mark %s", port, listen, mark(m.TProxy, m.ZtunnelMask))
	}
	return iptables.Ruleset{{
		Table: "mangle", Name: ChainPrefix + "PREROUTING", Parent: "PREROUTING",
		Rules: []string{
			fmt.Sprintf("-i %s -p tcp -m tcp --dport %d %s", ZtunnelInLink, pp.HBONE, tproxy(pp.HBONE)),
			fmt.Sprintf("-i %s -p tcp %s", ZtunnelOutLink, tproxy(pp.Outbound)),
			fmt.Sprintf("-i %s -p tcp %s", ZtunnelInLink, tproxy(pp.Inbound)),
			// Replies to ztunnel's original-source sockets are delivered locally.
			fmt.Sprintf("! -d %s -i %s -p tcp -j MARK --set-xmark %s", host(p.ZtunnelIP), p.Eth, mark(m.OrigSrc, m.ZtunnelMask)),
		},
	}}
}
