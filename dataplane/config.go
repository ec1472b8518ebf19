// Package dataplane converges a node's kernel state (ipsets, iptables chains,
// policy routing, tunnels, sysctls) and the ztunnel pod's network namespace to
// a plain desired State. It never imports client-go: the controller computes
// the State, this package diffs it against what it reads back from the kernel
// and changes only what differs.
//
// Make before break: a change of capture state is a sequence of writes, and
// a connection can start between any two of them. Every transition (ztunnel
// gone, new, replaced, two at once; fail mode; pods in and out; cleanup)
// writes everything that captures or blocks before it removes anything that
// allowed capture, in one order decided in one place (transition.go, and
// converge, which follows it). Capture itself is decided on a connection's
// first packet: replies never start one, so a connection keeps the path it
// began with while the rules around it change.
package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
)

// TunnelType selects the encapsulation used between the node and ztunnel.
type TunnelType string

// Tunnel types. Auto picks geneve when the kernel has it, else vxlan.
const (
	TunnelAuto   TunnelType = "auto"
	TunnelGeneve TunnelType = "geneve"
	TunnelVXLAN  TunnelType = "vxlan"
)

// FailMode says what happens to enrolled pods while no ztunnel is present.
type FailMode string

const (
	// FailClosed keeps capture but makes it fail fast (TCP resets for new
	// connections): nothing of an ambient pod escapes to its destination
	// unproxied.
	FailClosed FailMode = "closed"
	// FailOpen withdraws capture so traffic flows directly.
	FailOpen FailMode = "open"
)

// OnEnroll says what happens to the connections a pod has open when it is
// enrolled (or that began while capture was off, e.g. failing open).
type OnEnroll string

const (
	// OnEnrollKeep lets them flow directly until they close: capture is
	// decided on a connection's first packet.
	OnEnrollKeep OnEnroll = "keep"
	// OnEnrollReset resets them (TCP RST to both ends at their next packet)
	// so that nothing unmeshed remains.
	OnEnrollReset OnEnroll = "reset"
)

// IPTablesMode selects the iptables backend.
type IPTablesMode string

// iptables backends. Auto detects the one kubelet uses.
const (
	IPTablesAuto   IPTablesMode = "auto"
	IPTablesNFT    IPTablesMode = "nft"
	IPTablesLegacy IPTablesMode = "legacy"
)

// Backend picks how our packet-filter rules are written: iptables (in the
// flavour IPTablesMode picks) or our own nftables table. Auto picks
// nftables where kube-proxy runs in nftables mode or no iptables works.
type Backend string

// Backends.
const (
	BackendAuto     Backend = "auto"
	BackendIPTables Backend = "iptables"
	BackendNFTables Backend = "nftables"
)

// Default tunnel ports.
const (
	DefaultGenevePort = 6081
	DefaultVXLANPort  = 4789
)

// Marks are the packet marks of the node and ztunnel namespaces (value/mask, mask = value on the node).
type Marks struct {
	Outbound    uint32 // 0x100: TCP from an ambient pod, to ztunnel via istioout
	Skip        uint32 // 0x200: bypass, rule 100 sends it to main
	ConnSkip    uint32 // 0x220: skip, saved to connmark (contains Skip)
	Proxy       uint32 // 0x210: from ztunnel with a spoofed source (contains Skip)
	ProxyReturn uint32 // 0x040: replies to ztunnel's spoofed connections, back to ztunnel
	// Slot (0x1000), in the connection mark next to Proxy, pins a connection
	// to the ztunnel in slot 1 (a surge rollout's second ztunnel); slot 0
	// has no bit.
	Slot        uint32
	TProxy      uint32 // 0x400 inside the ztunnel netns
	OrigSrc     uint32 // 0x4d3 inside the ztunnel netns: reply to an original-source socket
	ZtunnelMask uint32 // 0xfff: mask for TProxy and OrigSrc
}

// Tables are the route tables on the node.
type Tables struct {
	Inbound     int // 100
	Outbound    int // 101
	ProxyReturn int // 102
	// ProxyReturn2 (103) is the proxy-return table of slot 1.
	ProxyReturn2 int
	// ZtunnelLocal is the table inside the ztunnel netns holding `local 0.0.0.0/0 dev lo`.
	ZtunnelLocal int // 100
}

// Priorities are ip rule priorities.
type Priorities struct {
	Skip        int // 100
	Outbound    int // 101
	ProxyReturn int // 102
	Inbound     int // 103
	// ProxyReturn2 (99) sends slot 1's proxy-return packets to its table;
	// it must come before Inbound, whose table would send them to the
	// active ztunnel's tunnel instead.
	ProxyReturn2 int
	// ZtunnelTProxy and ZtunnelOrigSrc live inside the ztunnel netns.
	ZtunnelTProxy  int // 20000
	ZtunnelOrigSrc int // 20003
}

// Config is the static configuration of the dataplane.
type Config struct {
	Tunnel TunnelType
	// TunnelPort is the UDP port of the tunnels; 0 means the type's default.
	// When a device we do not own already uses it, the next free port is taken.
	TunnelPort   int
	FailMode     FailMode
	OnEnroll     OnEnroll
	IPTablesMode IPTablesMode
	Backend      Backend
	// DNSCapture DNATs ambient pods' UDP/53 to ztunnel's DNS proxy on DNSPort.
	DNSCapture bool
	DNSPort    int
	// CaptureNodeLocal replaces the kernel's `0: from all lookup local` rule
	// with `0: fwmark 0/<Outbound|ProxyReturn> lookup local` so that ambient
	// pods' TCP to node addresses is captured too.
	CaptureNodeLocal bool
	Marks            Marks
	Tables           Tables
	Priorities       Priorities
	// RouteProtocol marks every route and rule we create as ours.
	RouteProtocol int
	IPSetName     string // inet set
	IPSetNameV6   string // inet6 set (IPv6 not wired up yet)
	// InVNI/OutVNI and the /30 networks of the istioin/istioout tunnels.
	InVNI, OutVNI uint32
	InNet, OutNet netip.Prefix
	// InNet6/OutNet6 are the tunnels' IPv6 /126 networks (ULA): the inner
	// family does not depend on the underlay's.
	InNet6, OutNet6 netip.Prefix
	NetNSDir        string
	ProxyPorts      ProxyPorts
	ZtunnelListenIP netip.Addr
	// ZtunnelListenIP6 is where ztunnel listens for IPv6 (TPROXY --on-ip).
	ZtunnelListenIP6 netip.Addr
}

// ProxyPorts are ztunnel's listeners.
type ProxyPorts struct {
	Outbound int // 15001
	Inbound  int // 15006
	HBONE    int // 15008
}

// DefaultConfig returns the reference configuration.
func DefaultConfig() Config {
	return Config{
		Tunnel:           TunnelAuto,
		FailMode:         FailClosed,
		OnEnroll:         OnEnrollKeep,
		IPTablesMode:     IPTablesAuto,
		Backend:          BackendAuto,
		DNSPort:          15053,
		CaptureNodeLocal: true,
		Marks: Marks{
			Outbound: 0x100, Skip: 0x200, ConnSkip: 0x220, Proxy: 0x210, ProxyReturn: 0x040, Slot: 0x1000,
			TProxy: 0x400, OrigSrc: 0x4d3, ZtunnelMask: 0xfff,
		},
		Tables:           Tables{Inbound: 100, Outbound: 101, ProxyReturn: 102, ProxyReturn2: 103, ZtunnelLocal: 100},
		Priorities:       Priorities{ProxyReturn2: 99, Skip: 100, Outbound: 101, ProxyReturn: 102, Inbound: 103, ZtunnelTProxy: 20000, ZtunnelOrigSrc: 20003},
		RouteProtocol:    0x61, // 97: unassigned in /etc/iproute2/rt_protos
		IPSetName:        "ztunnel-pods-ips",
		IPSetNameV6:      "ztunnel-pods-ips-v6",
		InVNI:            1000,
		OutVNI:           1001,
		InNet:            netip.MustParsePrefix("192.168.126.0/30"),
		OutNet:           netip.MustParsePrefix("192.168.127.0/30"),
		InNet6:           netip.MustParsePrefix("fd00:a17:126::/126"),
		OutNet6:          netip.MustParsePrefix("fd00:a17:127::/126"),
		NetNSDir:         "/var/run/netns",
		ProxyPorts:       ProxyPorts{Outbound: 15001, Inbound: 15006, HBONE: 15008},
		ZtunnelListenIP:  netip.MustParseAddr("127.0.0.1"),
		ZtunnelListenIP6: netip.MustParseAddr("::1"),
	}
}

// The command-line flags (without "--") that set each mark, rule priority
// and route table: validation and conflict errors name the one to change.
const (
	FlagMarkOutbound             = "mark-outbound"
	FlagMarkSkip                 = "mark-skip"
	FlagMarkConnSkip             = "mark-conn-skip"
	FlagMarkProxy                = "mark-proxy"
	FlagMarkProxyReturn          = "mark-proxy-return"
	FlagMarkSlot                 = "mark-slot"
	FlagMarkZtunnelTProxy        = "mark-ztunnel-tproxy"
	FlagMarkZtunnelOrigSrc       = "mark-ztunnel-orig-src"
	FlagMarkZtunnelMask          = "mark-ztunnel-mask"
	FlagPrioritySkip             = "rule-priority-skip"
	FlagPriorityOutbound         = "rule-priority-outbound"
	FlagPriorityProxyReturn      = "rule-priority-proxy-return"
	FlagPriorityInbound          = "rule-priority-inbound"
	FlagPriorityProxyReturnSlot1 = "rule-priority-proxy-return-slot1"
	FlagPriorityZtunnelTProxy    = "rule-priority-ztunnel-tproxy"
	FlagPriorityZtunnelOrigSrc   = "rule-priority-ztunnel-orig-src"
	FlagTableInbound             = "route-table-inbound"
	FlagTableOutbound            = "route-table-outbound"
	FlagTableProxyReturn         = "route-table-proxy-return"
	FlagTableProxyReturnSlot1    = "route-table-proxy-return-slot1"
	FlagTableZtunnelLocal        = "route-table-ztunnel-local"
)

// Validate reports every problem of the configuration at once.
func (c Config) Validate() error {
	var errs []error
	switch c.Tunnel {
	case TunnelAuto, TunnelGeneve, TunnelVXLAN:
	default:
		errs = append(errs, fmt.Errorf("tunnel: %q is not one of auto, geneve, vxlan", c.Tunnel))
	}
	switch c.FailMode {
	case FailClosed, FailOpen:
	default:
		errs = append(errs, fmt.Errorf("fail mode: %q is not one of closed, open", c.FailMode))
	}
	switch c.OnEnroll {
	case OnEnrollKeep, OnEnrollReset:
	default:
		errs = append(errs, fmt.Errorf("on-enroll: %q is not one of keep, reset", c.OnEnroll))
	}
	switch c.IPTablesMode {
	case IPTablesAuto, IPTablesNFT, IPTablesLegacy:
	default:
		errs = append(errs, fmt.Errorf("iptables mode: %q is not one of auto, nft, legacy", c.IPTablesMode))
	}
	switch c.Backend {
	case BackendAuto, BackendIPTables, BackendNFTables:
	default:
		errs = append(errs, fmt.Errorf("backend: %q is not one of auto, iptables, nftables", c.Backend))
	}
	if c.TunnelPort < 0 || c.TunnelPort > 65535 {
		errs = append(errs, fmt.Errorf("tunnel port: %d out of range", c.TunnelPort))
	}
	if c.DNSCapture && (c.DNSPort <= 0 || c.DNSPort > 65535) {
		errs = append(errs, fmt.Errorf("dns port: %d out of range", c.DNSPort))
	}
	m := c.Marks
	for _, x := range []struct {
		flag string
		v    uint32
	}{{FlagMarkOutbound, m.Outbound}, {FlagMarkSkip, m.Skip}, {FlagMarkProxyReturn, m.ProxyReturn}, {FlagMarkSlot, m.Slot}} {
		if x.v == 0 || x.v&(x.v-1) != 0 {
			errs = append(errs, fmt.Errorf("--%s %#x must be a single bit", x.flag, x.v))
		}
	}
	connExtra, proxyExtra := m.ConnSkip&^m.Skip, m.Proxy&^m.Skip
	if m.ConnSkip&m.Skip != m.Skip || m.Proxy&m.Skip != m.Skip {
		errs = append(errs, fmt.Errorf("--%s %#x and --%s %#x must contain the --%s bit %#x", FlagMarkConnSkip, m.ConnSkip, FlagMarkProxy, m.Proxy, FlagMarkSkip, m.Skip))
	} else if connExtra == 0 || proxyExtra == 0 || connExtra&proxyExtra != 0 {
		errs = append(errs, fmt.Errorf("--%s %#x and --%s %#x must each add bits of their own to the --%s bit %#x", FlagMarkConnSkip, m.ConnSkip, FlagMarkProxy, m.Proxy, FlagMarkSkip, m.Skip))
	}
	if m.Outbound&(m.ConnSkip|m.Proxy|m.ProxyReturn) != 0 || m.ProxyReturn&(m.ConnSkip|m.Proxy) != 0 {
		errs = append(errs, fmt.Errorf("marks: --%s %#x and --%s %#x must not overlap each other or the skip marks (--%s %#x, --%s %#x)",
			FlagMarkOutbound, m.Outbound, FlagMarkProxyReturn, m.ProxyReturn, FlagMarkConnSkip, m.ConnSkip, FlagMarkProxy, m.Proxy))
	}
	if m.Slot&(m.Outbound|m.ConnSkip|m.Proxy|m.ProxyReturn) != 0 {
		errs = append(errs, fmt.Errorf("marks: --%s %#x must not overlap any other mark", FlagMarkSlot, m.Slot))
	}
	if m.ZtunnelMask == 0 || m.TProxy&^m.ZtunnelMask != 0 || m.OrigSrc&^m.ZtunnelMask != 0 || m.TProxy == m.OrigSrc || m.TProxy == 0 || m.OrigSrc == 0 {
		errs = append(errs, fmt.Errorf("marks: --%s %#x and --%s %#x must be non-zero, differ and fit --%s %#x",
			FlagMarkZtunnelTProxy, m.TProxy, FlagMarkZtunnelOrigSrc, m.OrigSrc, FlagMarkZtunnelMask, m.ZtunnelMask))
	}
	t := c.Tables
	tables := []int{t.Inbound, t.Outbound, t.ProxyReturn, t.ProxyReturn2}
	for _, v := range append(tables, t.ZtunnelLocal) {
		if v <= 0 || v >= 253 && v <= 255 || v > 0xfffffff0 {
			errs = append(errs, fmt.Errorf("route table %d (--route-table-*) is reserved (0, 253-255) or out of range", v))
		}
	}
	if dup(tables) {
		errs = append(errs, fmt.Errorf("route tables %v (--%s, --%s, --%s, --%s) must differ", tables,
			FlagTableInbound, FlagTableOutbound, FlagTableProxyReturn, FlagTableProxyReturnSlot1))
	}
	p := c.Priorities
	prios := []int{p.ProxyReturn2, p.Skip, p.Outbound, p.ProxyReturn, p.Inbound}
	for _, v := range append(prios, p.ZtunnelTProxy, p.ZtunnelOrigSrc) {
		if v <= 0 || v >= 32766 {
			errs = append(errs, fmt.Errorf("rule priority %d (--rule-priority-*) must be in 1..32765 (0 is the local rule's, 32766 main's)", v))
		}
	}
	if dup(prios) || p.ZtunnelTProxy == p.ZtunnelOrigSrc {
		errs = append(errs, fmt.Errorf("rule priorities %v (node) and %d, %d (ztunnel netns) must differ", prios, p.ZtunnelTProxy, p.ZtunnelOrigSrc))
	}
	if !(p.Skip < p.Outbound && p.Outbound < p.Inbound && p.ProxyReturn2 < p.ProxyReturn && p.ProxyReturn < p.Inbound) {
		errs = append(errs, fmt.Errorf("rule priorities: --%s (%d) < --%s (%d) < --%s (%d) and --%s (%d) < --%s (%d) < --%s are required",
			FlagPrioritySkip, p.Skip, FlagPriorityOutbound, p.Outbound, FlagPriorityInbound, p.Inbound,
			FlagPriorityProxyReturnSlot1, p.ProxyReturn2, FlagPriorityProxyReturn, p.ProxyReturn, FlagPriorityInbound))
	}
	if c.RouteProtocol <= 4 || c.RouteProtocol > 255 {
		errs = append(errs, fmt.Errorf("route protocol %d must be in 5..255 (0-4 belong to the kernel)", c.RouteProtocol))
	}
	if c.IPSetName == "" || len(c.IPSetName) > 31 || c.IPSetNameV6 == "" || len(c.IPSetNameV6) > 31 || c.IPSetName == c.IPSetNameV6 {
		errs = append(errs, errors.New("ipset names must be distinct, non-empty and at most 31 bytes"))
	}
	for _, n := range []netip.Prefix{c.InNet, c.OutNet} {
		if !n.IsValid() || !n.Addr().Is4() || n.Bits() != 30 || n.Masked() != n {
			errs = append(errs, fmt.Errorf("tunnel network %v must be an IPv4 /30", n))
		}
	}
	for _, n := range []netip.Prefix{c.InNet6, c.OutNet6} {
		if !n.IsValid() || !n.Addr().Is6() || n.Addr().Is4In6() || n.Bits() != 126 || n.Masked() != n {
			errs = append(errs, fmt.Errorf("tunnel network %v must be an IPv6 /126", n))
		}
	}
	if c.InVNI == 0 || c.OutVNI == 0 || c.InVNI == c.OutVNI || c.InVNI > 1<<24-1 || c.OutVNI > 1<<24-1 {
		errs = append(errs, errors.New("tunnel VNIs must differ and be in 1..16777215"))
	}
	if c.NetNSDir == "" {
		errs = append(errs, errors.New("netns dir must be set"))
	}
	return errors.Join(errs...)
}

func dup(v []int) bool {
	seen := map[int]bool{}
	for _, x := range v {
		if seen[x] {
			return true
		}
		seen[x] = true
	}
	return false
}

// tunnelAddrs returns the node-side and ztunnel-side addresses of a /30.
func tunnelAddrs(p netip.Prefix) (node, ztunnel netip.Addr) {
	node = p.Addr().Next()
	return node, node.Next()
}
