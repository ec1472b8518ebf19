package dataplane

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

func TestNodeRulesetGolden(t *testing.T) {
	cfg := DefaultConfig()
	cases := []struct {
		name string
		p    NodeParams
		want string
	}{{
		name: "ztunnel present, DNS capture",
		p: NodeParams{Ztunnels: []ZtunnelRef{{IP: netip.MustParseAddr("10.244.1.2"), Veth: "vethzt"}}, Active: true, HostIP: netip.MustParseAddr("10.244.1.1"),
			TunnelPort: 4789, Capture: true, DNS: true},
		want: `*mangle
-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING
-A INPUT -m comment --comment ambient-redirect -j ztunnel-INPUT
-A FORWARD -m comment --comment ambient-redirect -j ztunnel-FORWARD
-A OUTPUT -m comment --comment ambient-redirect -j ztunnel-OUTPUT
-A POSTROUTING -m comment --comment ambient-redirect -j ztunnel-POSTROUTING
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioin -j RETURN
-A ztunnel-PREROUTING -i istioout -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioout -j RETURN
-A ztunnel-PREROUTING -p udp -m udp --dport 4789 -j RETURN
-A ztunnel-PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x1230
-A ztunnel-PREROUTING -m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING ! -i vethzt -m connmark --mark 0x1210/0x1210 -j MARK --set-xmark 0x1000/0x1000
-A ztunnel-PREROUTING ! -i vethzt -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-A ztunnel-PREROUTING -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-PREROUTING ! -s 10.244.1.2/32 -i vethzt -j MARK --set-xmark 0x210/0x1210
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -i vethzt -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING ! -p tcp -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -p udp -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100
-A ztunnel-INPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-INPUT -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x1210 --ctmask 0x1210
-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x1210 --ctmask 0x1210
-A ztunnel-OUTPUT -m connmark --mark 0x1210/0x1210 -j MARK --set-xmark 0x1000/0x1000
-A ztunnel-OUTPUT -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-A ztunnel-OUTPUT -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-OUTPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips dst -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-OUTPUT -p tcp -m owner ! --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0x220
-A ztunnel-OUTPUT -s 10.244.1.1/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0x220
-A ztunnel-OUTPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
*nat
-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING
-A POSTROUTING -m comment --comment ambient-redirect -j ztunnel-POSTROUTING
-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT
-A ztunnel-PREROUTING -p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 -j DNAT --to-destination 10.244.1.2:15053
-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT
*filter
-A FORWARD -m comment --comment ambient-redirect -j ztunnel-FORWARD
-A ztunnel-FORWARD -m mark --mark 0x100/0x100 -j ACCEPT
`,
	}, {
		name: "no ztunnel, fail closed",
		p:    NodeParams{TunnelPort: 4790, Capture: true, FailClosed: true, DNS: true},
		want: `*mangle
-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING
-A INPUT -m comment --comment ambient-redirect -j ztunnel-INPUT
-A FORWARD -m comment --comment ambient-redirect -j ztunnel-FORWARD
-A OUTPUT -m comment --comment ambient-redirect -j ztunnel-OUTPUT
-A POSTROUTING -m comment --comment ambient-redirect -j ztunnel-POSTROUTING
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioin -j RETURN
-A ztunnel-PREROUTING -i istioout -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioout -j RETURN
-A ztunnel-PREROUTING -p udp -m udp --dport 4790 -j RETURN
-A ztunnel-PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x1230
-A ztunnel-PREROUTING -m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING ! -p tcp -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -p udp -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100
-A ztunnel-INPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-INPUT -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x1210 --ctmask 0x1210
-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x1210 --ctmask 0x1210
-A ztunnel-OUTPUT -m connmark --mark 0x1210/0x1210 -j MARK --set-xmark 0x1000/0x1000
-A ztunnel-OUTPUT -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-A ztunnel-OUTPUT -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-OUTPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips dst -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-OUTPUT -p tcp -m owner ! --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0x220
-A ztunnel-OUTPUT -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0x220
-A ztunnel-OUTPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
*nat
-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING
-A POSTROUTING -m comment --comment ambient-redirect -j ztunnel-POSTROUTING
-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT
-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT
*filter
-A FORWARD -m comment --comment ambient-redirect -j ztunnel-FORWARD
-A ztunnel-FORWARD -p tcp -m mark --mark 0x100/0x100 -j REJECT --reject-with tcp-reset
-A ztunnel-FORWARD -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips dst -j REJECT --reject-with tcp-reset
`,
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := NodeRuleset(cfg, c.p).Render()
			if got != c.want {
				t.Fatalf("rules differ:\n%s", diffLines(c.want, got))
			}
		})
	}
}

func TestNodeRulesetFailOpenHasNoCapture(t *testing.T) {
	got := NodeRuleset(DefaultConfig(), NodeParams{TunnelPort: 4789}).Render()
	for _, forbidden := range []string{"--set-xmark 0x100/0x100", "REJECT"} {
		if strings.Contains(got, forbidden) {
			t.Fatalf("fail-open rules contain %q:\n%s", forbidden, got)
		}
	}
}

func TestZtunnelRulesetGolden(t *testing.T) {
	got := ZtunnelRuleset(DefaultConfig(), ZtunnelParams{ZtunnelIP: netip.MustParseAddr("10.244.1.2"), Eth: "eth0"}).Render()
	want := `*mangle
-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING
-A ztunnel-PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A ztunnel-PREROUTING -i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A ztunnel-PREROUTING -i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A ztunnel-PREROUTING ! -d 10.244.1.2/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff
`
	if got != want {
		t.Fatalf("rules differ:\n%s", diffLines(want, got))
	}
}

func TestCustomMarksAreRendered(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Marks.Outbound = 0x1000
	cfg.IPSetName = "my-set"
	got := NodeRuleset(cfg, NodeParams{TunnelPort: 4789, Capture: true}).Render()
	if !strings.Contains(got, "--match-set my-set src -j MARK --set-xmark 0x1000/0x1000") || strings.Contains(got, "0x100/0x100") {
		t.Fatalf("custom outbound mark or set name not used:\n%s", got)
	}
}

// diffLines shows the first differing line with its number.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			return "line " + strconv.Itoa(i+1) + ":\n want: " + wl + "\n  got: " + gl + "\n--- full got:\n" + got
		}
	}
	return ""
}

func TestNodeRulesetDuringSwitch(t *testing.T) {
	p := NodeParams{Ztunnels: []ZtunnelRef{{IP: netip.MustParseAddr("10.244.1.9"), Veth: "vethnew", Slot: 1}, {IP: netip.MustParseAddr("10.244.1.2"), Veth: "vethold"}},
		Active: true, HostIP: netip.MustParseAddr("10.244.1.1"), TunnelPort: 4789, Capture: true}
	rs := NodeRuleset(DefaultConfig(), p)
	got := strings.Join(rs[0].Rules, "\n")
	want := `-i istioin -j MARK --set-xmark 0x200/0x200
-i istioin -j RETURN
-i istioout -j MARK --set-xmark 0x200/0x200
-i istioout -j RETURN
-p udp -m udp --dport 4789 -j RETURN
-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x1230
-m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200
-m mark --mark 0x200/0x200 -j RETURN
! -s 10.244.1.9/32 -i vethnew -j MARK --set-xmark 0x1210/0x1210
! -s 10.244.1.2/32 -i vethold -j MARK --set-xmark 0x210/0x1210
-m mark --mark 0x200/0x200 -j RETURN
-i vethnew -j MARK --set-xmark 0x220/0x220
-i vethold -j MARK --set-xmark 0x220/0x220
-m mark --mark 0x200/0x200 -j RETURN
-m connmark --mark 0x1210/0x1210 -j MARK --set-xmark 0x1000/0x1000
-m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-m mark --mark 0x40/0x40 -j RETURN
-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
! -p tcp -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-p udp -j MARK --set-xmark 0x220/0x220
-m mark --mark 0x200/0x200 -j RETURN
-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100`
	if got != want {
		t.Fatalf("switch rules:\n%s", diffLines(want, got))
	}
}

func TestResetUncapturedRules(t *testing.T) {
	p := NodeParams{Ztunnels: []ZtunnelRef{{IP: netip.MustParseAddr("10.244.1.2"), Veth: "vethzt"}}, Active: true, TunnelPort: 4789, Capture: true, ResetUncaptured: true}
	got := strings.Join(NodeRuleset(DefaultConfig(), p)[7].Rules, "\n")
	want := `-m mark --mark 0x100/0x100 -j ACCEPT
-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips src -m connmark ! --mark 0x210/0x210 -j REJECT --reject-with tcp-reset
-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m set --match-set ztunnel-pods-ips dst -m connmark ! --mark 0x210/0x210 -j REJECT --reject-with tcp-reset`
	if got != want {
		t.Fatalf("filter FORWARD:\n%s", diffLines(want, got))
	}
}
