package dataplane_test

import (
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/coexist"
)

func cnis() []coexist.CNI {
	return []coexist.CNI{coexist.Cilium("10.244.1.5"), coexist.Calico(), coexist.AWSVPC("10.244.1.5")}
}

// With our defaults each CNI is in the way, with the documented error;
// with the documented settings none is.
func TestCNIConflicts(t *testing.T) {
	for _, c := range cnis() {
		t.Run(c.Name, func(t *testing.T) {
			cs := dataplane.FindNodeConflicts(dataplane.DefaultConfig(), c.View())
			if len(cs) == 0 {
				t.Fatal("no conflict with our defaults")
			}
			err := (&dataplane.ConflictError{Conflicts: cs}).Error()
			if !strings.Contains(err, c.DefaultConflict) {
				t.Fatalf("error does not say %q:\n%s", c.DefaultConflict, err)
			}
			for _, x := range cs {
				t.Log(x)
			}
			cfg := dataplane.DefaultConfig()
			coexist.Settings(&cfg)
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			if cs := dataplane.FindNodeConflicts(cfg, c.View()); len(cs) != 0 {
				t.Fatalf("documented settings conflict: %v", cs)
			}
		})
	}
}

// Each kind of conflict names the other agent's object and our flag.
func TestConflictKinds(t *testing.T) {
	cfg := dataplane.DefaultConfig()
	mask := func(m uint32) *uint32 { return &m }
	rule := func(prio, table int, mark uint32, m *uint32, proto uint8) netlink.Rule {
		r := *netlink.NewRule()
		r.Priority, r.Table, r.Mark, r.Mask, r.Protocol = prio, table, mark, m, proto
		return r
	}
	for _, c := range []struct {
		name string
		v    dataplane.KernelView
		want []string // substrings, one conflict each, in order
	}{
		{"ours are not foreign", dataplane.KernelView{
			Rules:  []netlink.Rule{rule(101, 101, 0x100, mask(0x100), 0x61)},
			Routes: []netlink.Route{{Table: 101, Protocol: 0x61}},
		}, nil},
		{"priority", dataplane.KernelView{Rules: []netlink.Rule{rule(103, 7, 0, nil, 3)}},
			[]string{`ip rule "103: from all lookup 7" (protocol 3) holds priority 103, which our inbound rule needs; move ours with --rule-priority-inbound`}},
		{"route in our table", dataplane.KernelView{Routes: []netlink.Route{{Table: 102, Protocol: 3, LinkIndex: 4}}, Links: map[int]string{4: "eth1"}},
			[]string{`route "default dev eth1 table 102" (protocol 3) sits in table 102, our proxy-return table; move ours with --route-table-proxy-return`}},
		{"rule fwmark overlap", dataplane.KernelView{Rules: []netlink.Rule{rule(5, 9, 0x40, mask(0xc0), 0)}},
			[]string{`matches mark bits 0x40, which our proxy-return (0x40) marks use; move ours with --mark-proxy-return`}},
		{"whole-mask rule fwmark claims its value", dataplane.KernelView{Rules: []netlink.Rule{rule(5, 9, 0x4000, mask(0xffffffff), 0)}}, nil},
		{"moved local rule before ours", dataplane.KernelView{Rules: []netlink.Rule{rule(50, 255, 0, nil, 0)}},
			[]string{`delivers to the node's own addresses at priority 50`}},
		{"iptables", dataplane.KernelView{IPTables: map[dataplane.Family]string{
			dataplane.IPv4: "*mangle\n-A PREROUTING -m mark --mark 0x200/0x200 -j ACCEPT\n-A ztunnel-PREROUTING -j MARK --set-xmark 0x100/0x100\n-A X -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n*nat\n-A X -m comment --comment \"a b\" -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff\nCOMMIT\n",
			dataplane.IPv6: "*raw\n-A PREROUTING -j MARK --set-xmark 0x1000/0x1000\nCOMMIT\n",
		}}, []string{
			`iptables -t mangle rule "-A PREROUTING -m mark --mark 0x200/0x200 -j ACCEPT" matches mark bits 0x200, which our skip (0x200) marks use; move ours with --mark-skip / --mark-conn-skip / --mark-proxy`,
			`-j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff" sets mark bits 0x1370`,
			`ip6tables -t raw rule "-A PREROUTING -j MARK --set-xmark 0x1000/0x1000" sets mark bits 0x1000, which our slot (0x1000) marks use; move ours with --mark-slot`,
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cs := dataplane.FindNodeConflicts(cfg, c.v)
			if len(cs) != len(c.want) {
				t.Fatalf("got %d conflicts, want %d: %v", len(cs), len(c.want), cs)
			}
			for i, w := range c.want {
				if !strings.Contains(cs[i].String(), w) {
					t.Errorf("conflict %d:\n got %s\nwant %s", i, cs[i], w)
				}
			}
		})
	}
}

func TestZtunnelConflicts(t *testing.T) {
	r := *netlink.NewRule()
	r.Priority, r.Table = 20003, 5
	cs := dataplane.FindZtunnelConflicts(dataplane.DefaultConfig(), dataplane.KernelView{
		Rules: []netlink.Rule{r}, Routes: []netlink.Route{{Table: 100, Protocol: 3}, {Table: 100, Protocol: 0x61}},
	})
	if len(cs) != 2 || !strings.Contains(cs[0].String(), "--rule-priority-ztunnel-orig-src") || !strings.Contains(cs[1].String(), "--route-table-ztunnel-local") {
		t.Fatalf("%v", cs)
	}
}

// Bad combinations of marks, priorities and tables are refused, each
// naming a flag that fixes it.
func TestConfigValidateCoexistSettings(t *testing.T) {
	for name, c := range map[string]struct {
		mutate func(*dataplane.Config)
		flag   string
	}{
		"two bits":                   {func(c *dataplane.Config) { c.Marks.Skip = 0x300 }, "--mark-skip"},
		"slot overlaps outbound":     {func(c *dataplane.Config) { c.Marks.Slot = c.Marks.Outbound }, "--mark-slot"},
		"proxy-return in conn-skip":  {func(c *dataplane.Config) { c.Marks.ProxyReturn = 0x20 }, "--mark-proxy-return"},
		"conn-skip adds nothing":     {func(c *dataplane.Config) { c.Marks.ConnSkip = c.Marks.Skip }, "--mark-conn-skip"},
		"conn-skip and proxy share":  {func(c *dataplane.Config) { c.Marks.ConnSkip, c.Marks.Proxy = 0x230, 0x210 }, "--mark-proxy"},
		"ztunnel mark outside mask":  {func(c *dataplane.Config) { c.Marks.TProxy = 0x1000 }, "--mark-ztunnel-mask"},
		"skip after outbound":        {func(c *dataplane.Config) { c.Priorities.Skip = 102 }, "--rule-priority-skip"},
		"slot-1 after proxy-return":  {func(c *dataplane.Config) { c.Priorities.ProxyReturn2 = 102 }, "--rule-priority-proxy-return-slot1"},
		"priority 0":                 {func(c *dataplane.Config) { c.Priorities.ProxyReturn2 = 0 }, "--rule-priority"},
		"tables equal":               {func(c *dataplane.Config) { c.Tables.ProxyReturn2 = c.Tables.Inbound }, "--route-table-proxy-return-slot1"},
		"reserved table":             {func(c *dataplane.Config) { c.Tables.Inbound = 255 }, "--route-table"},
		"ztunnel priorities equal":   {func(c *dataplane.Config) { c.Priorities.ZtunnelOrigSrc = c.Priorities.ZtunnelTProxy }, "must differ"},
		"documented, then one moved": {func(c *dataplane.Config) { coexist.Settings(c); c.Priorities.Inbound = 12 }, "--rule-priority-inbound"},
	} {
		cfg := dataplane.DefaultConfig()
		c.mutate(&cfg)
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), c.flag) {
			t.Errorf("%s: err = %v, want one naming %s", name, err, c.flag)
		}
	}
}
