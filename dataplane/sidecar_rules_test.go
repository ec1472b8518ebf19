package dataplane

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSidecarRulesGolden pins a sidecar pod's table for each annotation
// combination that changes it: the defaults, TPROXY, dual stack, DNS
// capture, included/excluded inbound ports, outbound ranges and ports,
// interfaces, and INVALID drop.
func TestSidecarRulesGolden(t *testing.T) {
	ips := []netip.Addr{netip.MustParseAddr("10.244.1.20"), netip.MustParseAddr("fd00:10:244:1::20")}
	base := SidecarCapture{Mode: SidecarRedirect, ProxyUID: 1337, ProxyGID: 1337}
	for _, c := range []struct {
		name string
		mut  func(*SidecarCapture)
	}{
		{"defaults", func(*SidecarCapture) {}},
		{"tproxy", func(c *SidecarCapture) { c.Mode = SidecarTProxy }},
		{"tproxy-dualstack-ports", func(c *SidecarCapture) {
			c.Mode, c.DualStack, c.InboundPorts = SidecarTProxy, true, []uint16{8080, 9090}
		}},
		{"dualstack-dns", func(c *SidecarCapture) { c.DualStack, c.DNS = true, true }},
		{"inbound-excluded", func(c *SidecarCapture) { c.ExcludeInboundPorts = []uint16{8081, 9000} }},
		{"inbound-none", func(c *SidecarCapture) { c.InboundPorts = []uint16{} }},
		{"outbound-ranges", func(c *SidecarCapture) {
			c.OutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00:96::/108")}
			c.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.10/32")}
		}},
		{"outbound-ports", func(c *SidecarCapture) {
			c.IncludeOutboundPorts, c.ExcludeOutboundPorts = []uint16{3306}, []uint16{5432, 6379}
		}},
		{"outbound-none", func(c *SidecarCapture) { c.OutboundCIDRs = []netip.Prefix{} }},
		{"interfaces-uid-invalid", func(c *SidecarCapture) {
			c.ExcludeInterfaces, c.RerouteInterfaces, c.ProxyUID, c.ProxyGID, c.InvalidDrop = []string{"net1"}, []string{"kv0"}, 1500, 1501, true
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			capture := base
			c.mut(&capture)
			s := Sidecar{UID: "uid-sc", Name: "apps/sc", IPs: ips, Capture: capture}
			if p := s.problems(); len(p) > 0 {
				t.Fatalf("valid settings refused: %v", p)
			}
			got := SidecarRules(s).String()
			for _, line := range strings.Split(got, "\n") {
				if len(line) > 200 {
					t.Errorf("rule too long for its comment (the read-back's key): %q", line)
				}
			}
			path := filepath.Join("testdata", "sidecar", c.name+".golden")
			if *updateGolden {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("table differs from %s (go test -run TestSidecarRulesGolden -update):\n%s", path, got)
			}
		})
	}
}

func TestSidecarProblems(t *testing.T) {
	s := Sidecar{UID: "u", Name: "apps/bad", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")},
		Capture: SidecarCapture{Mode: "NAT", ExcludeInboundPorts: []uint16{0}, OutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.2.3/8")},
			ExcludeInterfaces: []string{"bad name"}}}
	got := strings.Join(s.problems(), "; ")
	for _, want := range []string{`interception mode "NAT"`, "port 0", "10.1.2.3/8", `interface name "bad name"`} {
		if !strings.Contains(got, want) {
			t.Errorf("problems %q lack %q", got, want)
		}
	}
}
