// Package coexist holds the policy routing and firewall state that three
// common primary CNIs write on a node, modeled on their sources (Cilium's
// linux_defaults, Calico Felix's WireGuard and iptables marks, the AWS VPC
// CNI's networkutils), and the agent settings the README documents for
// running next to them. Unit tests read it as netlink objects and
// iptables-save text; netns tests write it into a node's netns.
package coexist

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// CNI is one primary CNI's node state.
type CNI struct {
	Name string
	// LocalPriority is where it moves the kernel's `0: lookup local` rule
	// (0: left alone).
	LocalPriority int
	// Devices are devices its routes go through (veth pairs in tests).
	Devices []string
	// Rules are `ip rule add` arguments after "pref N", per family.
	Rules, Rules6 []Rule
	// Routes are `ip route add` arguments, per family.
	Routes, Routes6 []string
	// IPTables and IP6Tables are iptables-save text of its rules.
	IPTables, IP6Tables string
	// DefaultConflict is in the error our defaults get next to it.
	DefaultConflict string
}

// Rule is one ip rule: its priority and the rest of `ip rule add`.
type Rule struct {
	Prio int
	Spec string
}

// Settings are the agent settings the README documents for all three:
// marks in bits 0x77 (Cilium: 0x0F00, 0x1000 and the identity/IPsec bits
// above 0xFFFF; Calico: 0xFFFF0000; AWS: 0x80; kube-proxy: 0x4000,
// 0x8000), rule priorities 11–15 (after Cilium's 1/9/10 and AWS's 10,
// before Cilium's endpoint rule at 20, AWS's moved local rule at 20,
// Calico's WireGuard rule at 99 and Cilium's moved local rule at 100) and
// tables 5100–5103 (past Calico's 1–250, AWS's per-ENI tables from 2 and
// VLAN tables 101–4194, Cilium's 10+ENI, 200–202, 300+ and 2004/2005).
func Settings(c *dataplane.Config) {
	c.Marks.Outbound, c.Marks.Skip, c.Marks.ConnSkip, c.Marks.Proxy, c.Marks.ProxyReturn, c.Marks.Slot = 0x10, 0x20, 0x22, 0x21, 0x40, 0x04
	p := &c.Priorities
	p.ProxyReturn2, p.Skip, p.Outbound, p.ProxyReturn, p.Inbound = 11, 12, 13, 14, 15
	c.Tables.Inbound, c.Tables.Outbound, c.Tables.ProxyReturn, c.Tables.ProxyReturn2 = 5100, 5101, 5102, 5103
}

// Args are Settings as the agent's flags.
var Args = []string{
	"--mark-outbound=0x10", "--mark-skip=0x20", "--mark-conn-skip=0x22", "--mark-proxy=0x21", "--mark-proxy-return=0x40", "--mark-slot=0x4",
	"--rule-priority-proxy-return-slot1=11", "--rule-priority-skip=12", "--rule-priority-outbound=13", "--rule-priority-proxy-return=14", "--rule-priority-inbound=15",
	"--route-table-inbound=5100", "--route-table-outbound=5101", "--route-table-proxy-return=5102", "--route-table-proxy-return-slot1=5103",
}

// Cilium with WireGuard, IPsec tables, the L7 proxy, ENI endpoint routes
// and VTEP: endpoints are addresses its per-endpoint rule at 20 sends to
// main (an ambient pod's, to show ours must come first).
func Cilium(endpoint string) CNI {
	return CNI{
		Name:          "cilium",
		LocalPriority: 100,
		Devices:       []string{"cilium_host", "cilium_wg0", "cilium_vxlan", "cilium_eni1"},
		Rules: []Rule{
			{1, "fwmark 0xe00/0xf00 lookup 201"},  // WireGuard (encrypt mark)
			{9, "fwmark 0x200/0xf00 lookup 2004"}, // to the L7 proxy
			{10, "fwmark 0xa00/0xf00 lookup 2005"},
			{20, "to " + endpoint + " lookup main"}, // ENI endpoint routes
			{109, "fwmark 0x80/0x80 lookup main"},   // multi-node NodePort (AWS ENI)
			{110, "from 10.255.0.9 lookup 11"},      // egress, per ENI table 10+index
			{111, "from 10.255.0.10 lookup 11"},
			{112, "to 10.255.100.0/24 lookup 202"}, // VTEP
		},
		Rules6: []Rule{
			{9, "fwmark 0x200/0xf00 lookup 2004"},
			{10, "fwmark 0xa00/0xf00 lookup 2005"},
		},
		Routes: []string{
			"local 0.0.0.0/0 dev lo table 2004",
			"default dev cilium_host table 2005",
			"blackhole 10.255.200.0/24 table 200", // IPsec
			"default dev cilium_wg0 table 201",
			"10.255.100.0/24 dev cilium_vxlan table 202",
			"default dev cilium_eni1 table 11",
		},
		Routes6: []string{
			"local ::/0 dev lo table 2004",
			"default dev cilium_host table 2005",
		},
		IPTables: `*mangle
:CILIUM_PRE_mangle - [0:0]
:CILIUM_POST_mangle - [0:0]
-A PREROUTING -m comment --comment "cilium-feeder: CILIUM_PRE_mangle" -j CILIUM_PRE_mangle
-A POSTROUTING -m comment --comment "cilium-feeder: CILIUM_POST_mangle" -j CILIUM_POST_mangle
-A CILIUM_PRE_mangle ! -o lo -m socket --transparent -m mark ! --mark 0xe00/0xf00 -m mark ! --mark 0x800/0xf00 -m comment --comment "cilium: any->pod redirect proxied traffic to host proxy" -j MARK --set-xmark 0x200/0xffffffff
-A CILIUM_PRE_mangle -p tcp -m mark --mark 0x1bd80200 -m comment --comment "cilium: TPROXY to host cilium-dns-egress proxy" -j TPROXY --on-port 36795 --on-ip 127.0.0.1 --tproxy-mark 0x200/0xffffffff
-A CILIUM_PRE_mangle -i cilium_wg0 -m comment --comment "cilium: mark decrypted WireGuard traffic" -j MARK --set-xmark 0x1000/0x1000
-A CILIUM_POST_mangle -o cilium_host -m mark --mark 0xa00/0xe00 -m comment --comment "cilium: clear proxy mark" -j MARK --set-xmark 0x0/0xf00
COMMIT
`,
		IP6Tables: `*mangle
:CILIUM_PRE_mangle - [0:0]
-A PREROUTING -m comment --comment "cilium-feeder: CILIUM_PRE_mangle" -j CILIUM_PRE_mangle
-A CILIUM_PRE_mangle ! -o lo -m socket --transparent -m mark ! --mark 0xe00/0xf00 -m comment --comment "cilium: any->pod redirect proxied traffic to host proxy" -j MARK --set-xmark 0x200/0xffffffff
COMMIT
`,
		DefaultConflict: `holds priority 100, which our skip rule needs; move ours with --rule-priority-skip`,
	}
}

// Calico with WireGuard (its routing rule at 99, table 1 from its
// default route-table range 1–250) and its iptables marks (0xffff0000).
func Calico() CNI {
	return CNI{
		Name:    "calico",
		Devices: []string{"wireguard.cali"},
		Rules:   []Rule{{99, "not fwmark 0x100000/0x100000 lookup 1"}},
		Rules6:  []Rule{{99, "not fwmark 0x100000/0x100000 lookup 1"}},
		Routes: []string{
			"10.255.8.0/24 dev wireguard.cali table 1",
			"throw 10.255.9.0/24 table 1",
		},
		Routes6: []string{"fd00:255:8::/64 dev wireguard.cali table 1"},
		IPTables: `*mangle
:cali-PREROUTING - [0:0]
-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING
-A cali-PREROUTING -m comment --comment "cali:KX7AGNd6rMcDUai6" -m mark --mark 0x10000/0x10000 -j ACCEPT
COMMIT
*filter
:cali-FORWARD - [0:0]
-A FORWARD -m comment --comment "cali:wUHhoiAYhphO9Mso" -j cali-FORWARD
-A cali-FORWARD -m comment --comment "cali:vjrMJCRpqwy5oRoX" -j MARK --set-xmark 0x0/0xe0000
-A cali-FORWARD -m comment --comment "cali:MH9kMp5aNICL-Olv" -m mark --mark 0x10000/0x10000 -j ACCEPT
COMMIT
`,
		IP6Tables: `*filter
:cali-FORWARD - [0:0]
-A FORWARD -m comment --comment "cali:wUHhoiAYhphO9Mso" -j cali-FORWARD
-A cali-FORWARD -m comment --comment "cali:vjrMJCRpqwy5oRoX" -j MARK --set-xmark 0x0/0xe0000
COMMIT
`,
		DefaultConflict: `holds priority 99, which our slot-1 proxy-return rule needs; move ours with --rule-priority-proxy-return-slot1`,
	}
}

// AWSVPC is the AWS VPC CNI with a secondary ENI (table 2) and security
// groups for pods (branch ENIs on VLANs 1–3: tables 101–103, the local
// rule moved to 20), and its connmark 0x80.
func AWSVPC(pod string) CNI {
	c := CNI{
		Name:          "aws-vpc-cni",
		LocalPriority: 20,
		Devices:       []string{"eth9", "vlan.eth.1", "vlan.eth.2", "vlan.eth.3"},
		Rules: []Rule{
			{512, "to " + pod + " lookup main"},
			{1024, "fwmark 0x80/0x80 lookup main"},
			{1535, "to 10.255.200.0/24 lookup main"},
			{1536, "from 10.255.0.20 lookup 2"},
		},
		Routes: []string{"default dev eth9 table 2"},
		IPTables: `*nat
:AWS-CONNMARK-CHAIN-0 - [0:0]
-A PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-A AWS-CONNMARK-CHAIN-0 ! -d 10.255.0.0/16 -m comment --comment "AWS CONNMARK CHAIN, VPC CIDR" -j CONNMARK --set-xmark 0x80/0x80
COMMIT
*mangle
-A PREROUTING -i eth9 -m comment --comment "AWS, primary ENI" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80
-A PREROUTING -i eni+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
COMMIT
`,
		DefaultConflict: `sits in table 101, our outbound table; move ours with --route-table-outbound`,
	}
	for v := 1; v <= 3; v++ {
		n, t := strconv.Itoa(v), strconv.Itoa(100+v)
		c.Rules = append(c.Rules, Rule{10, "iif vlan.eth." + n + " lookup " + t}, Rule{10, "from 10.255.1." + n + " lookup " + t})
		c.Routes = append(c.Routes, "default dev vlan.eth."+n+" table "+t)
	}
	return c
}

// View is the CNI's state as the agent reads it back (with the kernel's
// rules and nothing of ours).
func (c CNI) View() dataplane.KernelView {
	v := dataplane.KernelView{IPTables: map[dataplane.Family]string{dataplane.IPv4: c.IPTables, dataplane.IPv6: c.IP6Tables}}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, routes := c.Rules, c.Routes
		if fam == netlink.FAMILY_V6 {
			rules, routes = c.Rules6, c.Routes6
		}
		v.Rules = append(v.Rules, rule(fam, c.LocalPriority, "lookup local"), rule(fam, 32766, "lookup main"))
		for _, r := range rules {
			v.Rules = append(v.Rules, rule(fam, r.Prio, r.Spec))
		}
		for _, r := range routes {
			v.Routes = append(v.Routes, route(fam, r))
		}
	}
	return v
}

func rule(fam, prio int, spec string) netlink.Rule {
	r := *netlink.NewRule()
	r.Family, r.Priority = fam, prio
	f := strings.Fields(spec)
	for i := 0; i < len(f); i++ {
		switch f[i] {
		case "not":
			r.Invert = true
		case "fwmark":
			v, m, _ := strings.Cut(f[i+1], "/")
			mark, _ := strconv.ParseUint(v, 0, 32)
			mask, _ := strconv.ParseUint(m, 0, 32)
			r.Mark = uint32(mark)
			mk := uint32(mask)
			r.Mask = &mk
			i++
		case "from":
			r.Src = cidr(f[i+1])
			i++
		case "to":
			r.Dst = cidr(f[i+1])
			i++
		case "iif":
			r.IifName = f[i+1]
			i++
		case "lookup":
			r.Table = table(f[i+1])
			i++
		}
	}
	return r
}

func route(fam int, spec string) netlink.Route {
	r := netlink.Route{Family: fam, Protocol: unix.RTPROT_BOOT, Type: unix.RTN_UNICAST}
	f := strings.Fields(spec)
	for i := 0; i < len(f); i++ {
		switch f[i] {
		case "local":
			r.Type = unix.RTN_LOCAL
		case "blackhole":
			r.Type = unix.RTN_BLACKHOLE
		case "throw":
			r.Type = unix.RTN_THROW
		case "default":
		case "dev":
			r.LinkIndex = 1
			i++
		case "table":
			r.Table = table(f[i+1])
			i++
		default:
			if d := cidr(f[i]); d != nil && d.IP.IsUnspecified() {
				r.Dst = nil
			} else {
				r.Dst = d
			}
		}
	}
	return r
}

func cidr(s string) *net.IPNet {
	if !strings.Contains(s, "/") {
		if strings.Contains(s, ":") {
			s += "/128"
		} else {
			s += "/32"
		}
	}
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		return nil
	}
	return n
}

func table(s string) int {
	switch s {
	case "local":
		return unix.RT_TABLE_LOCAL
	case "main":
		return unix.RT_TABLE_MAIN
	}
	n, _ := strconv.Atoi(s)
	return n
}

// Write puts the CNI's state into netns ns (iptables through the nft
// backend), as the CNI would have before the agent starts.
func (c CNI) Write(t testing.TB, ns string) {
	t.Helper()
	for i, d := range c.Devices {
		// veth pairs: kernels without the dummy module have them.
		peer := "cnipeer" + strconv.Itoa(i)
		netnstest.Exec(t, ns, "ip", "link", "add", d, "type", "veth", "peer", "name", peer)
		netnstest.Exec(t, ns, "ip", "link", "set", peer, "up")
		netnstest.Exec(t, ns, "ip", "link", "set", d, "up")
	}
	for _, fam := range []string{"-4", "-6"} {
		rules, routes := c.Rules, c.Routes
		if fam == "-6" {
			rules, routes = c.Rules6, c.Routes6
		}
		if c.LocalPriority != 0 {
			netnstest.Exec(t, ns, "ip", fam, "rule", "add", "pref", strconv.Itoa(c.LocalPriority), "lookup", "local")
			netnstest.Exec(t, ns, "ip", fam, "rule", "del", "pref", "0", "lookup", "local")
		}
		for _, r := range rules {
			netnstest.Exec(t, ns, append([]string{"ip", fam, "rule", "add", "pref", strconv.Itoa(r.Prio)}, strings.Fields(r.Spec)...)...)
		}
		for _, r := range routes {
			netnstest.Exec(t, ns, append([]string{"ip", fam, "route", "add"}, strings.Fields(r)...)...)
		}
	}
	for tool, text := range map[string]string{"iptables-nft-restore": c.IPTables, "ip6tables-nft-restore": c.IP6Tables} {
		if text == "" {
			continue
		}
		f := filepath.Join(t.TempDir(), tool)
		if err := os.WriteFile(f, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		netnstest.Exec(t, ns, tool, "--noflush", f)
	}
}
