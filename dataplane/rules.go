package dataplane

import (
	"fmt"
	"net/netip"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// NodeParams are the inputs of the node's iptables rules.
type NodeParams struct {
	// ZtunnelIP, ZtunnelVeth and HostIP are unset when there is no ztunnel.
	ZtunnelIP   netip.Addr
	ZtunnelVeth string
	HostIP      netip.Addr
	TunnelPort  int
	// Capture marks ambient pods' TCP for ztunnel (false = fail open, no ztunnel).
	Capture bool
	// FailClosed rejects ambient pods' TCP, both ways, while there is no ztunnel.
	FailClosed bool
	// Previous is a ztunnel still running while traffic moves to the new one
	// (surge rollout). Its pod traffic keeps its own marks during the switch.
	Previous *ZtunnelRef
	DNS      bool
}

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
	zt := p.ZtunnelIP.IsValid()
	set := cfg.IPSetName

	var pre []string
	for _, dev := range []string{NodeInLink, NodeOutLink} {
		pre = append(pre, "-i "+dev+" "+setMark(m.Skip), "-i "+dev+" -j RETURN")
	}
	// The tunnel copies the inner mark to the outer packet: never re-mark it.
	pre = append(pre,
		fmt.Sprintf("-p udp -m udp --dport %d -j RETURN", p.TunnelPort),
		matchConnmark(m.ConnSkip)+" "+setMark(m.Skip),
		matchMark(m.Skip)+" -j RETURN",
	)
	switch {
	case zt && p.Previous != nil:
		pre = append(pre, switchRules(m, append([]ZtunnelRef{*p.Previous}, ZtunnelRef{p.ZtunnelIP, p.ZtunnelVeth}))...)
	case zt:
		// Replies to ztunnel's spoofed-source connections go back to ztunnel.
		pre = append(pre,
			"! -i "+p.ZtunnelVeth+" "+matchConnmark(m.Proxy)+" "+setMark(m.ProxyReturn),
			matchMark(m.ProxyReturn)+" -j RETURN",
			fmt.Sprintf("! -s %s/32 -i %s %s", p.ZtunnelIP, p.ZtunnelVeth, setMark(m.Proxy)),
			matchMark(m.Skip)+" -j RETURN",
			// ztunnel's own traffic (xDS, HBONE to other nodes).
			"-i "+p.ZtunnelVeth+" "+setMark(m.ConnSkip),
		)
	default:
		pre = append(pre, matchMark(m.ProxyReturn)+" -j RETURN", matchMark(m.Skip)+" -j RETURN")
	}
	pre = append(pre,
		// Only a connection's first packet can start a capture: what is
		// left here of a later one was not captured at its start (begun
		// before its pod was enrolled, or mid-transition), so it stays
		// direct, both ways, instead of going to a ztunnel that has no
		// socket for it.
		"-m conntrack ! --ctstate NEW "+setMark(m.Skip),
		"-p udp "+setMark(m.ConnSkip), // UDP is not captured
		matchMark(m.Skip)+" -j RETURN",
	)
	if p.Capture {
		// Capture is decided on a connection's first packet; later ones
		// follow the connmark its ztunnel set (0x210 -> 0x040).
		pre = append(pre, "-p tcp -m set --match-set "+set+" src -m conntrack --ctstate NEW "+setMark(m.Outbound))
	}

	save := []string{saveMark(m.ConnSkip), saveMark(m.Proxy)}

	out := []string{
		// A node process answering a connection that came through ztunnel answers ztunnel.
		matchConnmark(m.Proxy) + " " + setMark(m.ProxyReturn),
		matchMark(m.ProxyReturn) + " -j RETURN",
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
		probe = fmt.Sprintf("-s %s/32 %s", p.HostIP, probe)
	}
	out = append(out, probe)
	out = append(out, saveMark(m.ConnSkip))

	natPre := []string{matchMark(m.Outbound) + " -j ACCEPT"} // skip kube-proxy DNAT: ztunnel sees the VIP
	if p.DNS && zt {
		natPre = append(natPre, fmt.Sprintf("-p udp -m set --match-set %s src -m udp --dport 53 -j DNAT --to-destination %s:%d", set, p.ZtunnelIP, cfg.DNSPort))
	}

	// Accept captured traffic before kube-proxy's REJECT of endpoint-less VIPs.
	filterFwd := []string{matchMark(m.Outbound) + " -j ACCEPT"}
	if p.FailClosed {
		// With no ztunnel, captured traffic is forwarded by main (our tables
		// are empty): reset it here, before it leaves, and inbound too.
		filterFwd = []string{
			"-p tcp " + matchMark(m.Outbound) + " -j REJECT --reject-with tcp-reset",
			// New connections only: a direct one begun while capture was
			// off (fail open) keeps flowing, replies included.
			"-p tcp -m set --match-set " + set + " dst -m conntrack --ctstate NEW -j REJECT --reject-with tcp-reset",
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

// ZtunnelRef names one ztunnel's address and host veth.
type ZtunnelRef struct {
	IP   netip.Addr
	Veth string
}

// switchRules are rules 6-10 of the reference for several ztunnels at once,
// used only while traffic moves from one to the next. "! -i ZVETH" cannot
// name two devices, so every ztunnel's own packets are classified (and
// returned) first; what is left is not from any ztunnel, which is what
// rule 6 asks. For one ztunnel this order is equivalent to the reference's.
func switchRules(m Marks, zs []ZtunnelRef) []string {
	var out []string
	for _, z := range zs {
		out = append(out, fmt.Sprintf("! -s %s/32 -i %s %s", z.IP, z.Veth, setMark(m.Proxy)))
	}
	out = append(out, matchMark(m.Skip)+" -j RETURN")
	for _, z := range zs {
		out = append(out, "-i "+z.Veth+" "+setMark(m.ConnSkip))
	}
	return append(out,
		matchMark(m.Skip)+" -j RETURN",
		matchConnmark(m.Proxy)+" "+setMark(m.ProxyReturn),
		matchMark(m.ProxyReturn)+" -j RETURN",
	)
}

// ZtunnelParams are the inputs of the ztunnel netns rules.
type ZtunnelParams struct {
	ZtunnelIP netip.Addr
	// Eth is the pod side of the ztunnel's veth (usually eth0).
	Eth string
}

// ZtunnelRuleset renders the TPROXY rules inside the ztunnel netns.
func ZtunnelRuleset(cfg Config, p ZtunnelParams) iptables.Ruleset {
	m, pp := cfg.Marks, cfg.ProxyPorts
	tproxy := func(port int) string {
		return fmt.Sprintf("-j TPROXY --on-port %d --on-ip %s --tproxy-mark %s", port, cfg.ZtunnelListenIP, mark(m.TProxy, m.ZtunnelMask))
	}
	return iptables.Ruleset{{
		Table: "mangle", Name: ChainPrefix + "PREROUTING", Parent: "PREROUTING",
		Rules: []string{
			fmt.Sprintf("-i %s -p tcp -m tcp --dport %d %s", ZtunnelInLink, pp.HBONE, tproxy(pp.HBONE)),
			fmt.Sprintf("-i %s -p tcp %s", ZtunnelOutLink, tproxy(pp.Outbound)),
			fmt.Sprintf("-i %s -p tcp %s", ZtunnelInLink, tproxy(pp.Inbound)),
			// Replies to ztunnel's original-source sockets are delivered locally.
			fmt.Sprintf("! -d %s/32 -i %s -p tcp -j MARK --set-xmark %s", p.ZtunnelIP, p.Eth, mark(m.OrigSrc, m.ZtunnelMask)),
		},
	}}
}
