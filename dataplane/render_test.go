package dataplane

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files of the render tests")

// TestRenderGolden pins the node's desired objects for the states that
// matter: dual-stack with one ztunnel, a surge rollout (two slots), a
// ztunnel of one family, and no ztunnel in each fail mode. A change to
// any rule, route, member or device shows up as a diff of the dump.
func nftBackend(c *Config) { c.Backend = BackendNFTables }

func TestRenderGolden(t *testing.T) {
	a4, a6 := netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("fd00:10:244:1::2")
	b4, b6 := netip.MustParseAddr("10.244.1.3"), netip.MustParseAddr("fd00:10:244:1::3")
	veth := func(name string, idx int) netlink.Link {
		return &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, Index: idx, MTU: 1500}}
	}
	zt := func(pod string, slot int, v netlink.Link, ips ...netip.Addr) *ztRuntime {
		z := &ztRuntime{spec: &Ztunnel{Pod: pod, IPs: ips, HostVeth: v.Attrs().Name, NetNS: "/run/netns/" + pod}, slot: slot, veth: v,
			ips: map[Family]netip.Addr{}, hostIPs: map[Family]netip.Addr{}}
		for _, a := range ips {
			f := FamilyOf(a)
			z.ips[f] = a
			z.hostIPs[f] = netip.MustParseAddr(map[Family]string{IPv4: "10.244.1.1", IPv6: "fd00:10:244:1::1"}[f])
		}
		z.ip, z.hostIP = ips[0], z.hostIPs[FamilyOf(ips[0])]
		return z
	}
	pods := []Pod{
		{UID: "uid-1", Name: "apps/one", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.10"), netip.MustParseAddr("fd00:10:244:1::10")}},
		{UID: "uid-2", Name: "apps/two", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.11")}},
	}
	za := zt("ztunnel-a", 0, veth("vetha", 10), a4, a6)
	zb := zt("ztunnel-b", 1, veth("vethb", 11), b4, b6)
	z4 := zt("ztunnel-a", 0, veth("vetha", 10), a4)
	for _, c := range []struct {
		name string
		cfg  func(*Config)
		fx   facts
	}{
		{"dualstack", nil, facts{zt: za, live: []*ztRuntime{za}}},
		{"surge", nil, facts{zt: zb, live: []*ztRuntime{zb, za}}},
		{"ztunnel-ipv4-only", nil, facts{zt: z4, live: []*ztRuntime{z4}}},
		{"none-fail-open", nil, facts{}},
		{"none-fail-closed", func(c *Config) { c.FailMode = FailClosed }, facts{}},
		// The nftables backend, with the Service ranges it keeps untracked.
		{"dualstack-nftables", nftBackend, facts{zt: za, live: []*ztRuntime{za}}},
		{"surge-nftables", nftBackend, facts{zt: zb, live: []*ztRuntime{zb, za}}},
		{"none-fail-closed-nftables", func(c *Config) { nftBackend(c); c.FailMode = FailClosed }, facts{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newFakeNode(t).dataplane(t, c.cfg)
			c.fx.port = 4789
			d.fams = []Family{IPv4, IPv6} // the fake sysctls have no net.ipv6
			svc := []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:96::/108")}
			objs, err := d.render(State{Pods: pods, ServiceCIDRs: svc}, c.fx)
			if err != nil {
				t.Fatal(err)
			}
			got := objs.String()
			for _, line := range strings.Split(got, "\n") {
				if len(line) > 240 {
					t.Errorf("rule too long for its comment (the kernel keeps 256 bytes of user data): %q", line)
				}
			}
			path := filepath.Join("testdata", "render", c.name+".golden")
			if *updateGolden {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./dataplane -run TestRenderGolden -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("render of %s changed; got:\n%s\nwant:\n%s", c.name, got, want)
			}
		})
	}
}
