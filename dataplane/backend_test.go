package dataplane

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kerneltest"
)

// TestAutoBackend: auto picks nftables where kube-proxy runs in nftables
// mode or no iptables works, iptables elsewhere, and says why; an explicit
// iptables backend without a usable iptables is a clear error.
func TestAutoBackend(t *testing.T) {
	noIPTables := func(string, int) (iptables.Runner, error) { return nil, errors.New("iptables: not installed") }
	for _, c := range []struct {
		name       string
		kubeProxy  bool
		iptables   bool
		backend    Backend
		want       Backend
		why, fails string
	}{
		{"plain node", false, true, BackendAuto, BackendIPTables, "does not run in nftables mode", ""},
		{"kube-proxy nftables mode", true, true, BackendAuto, BackendNFTables, "kube-proxy runs in nftables mode", ""},
		{"no iptables", false, false, BackendAuto, BackendNFTables, "no usable iptables: iptables: not installed", ""},
		{"forced iptables beside kube-proxy's nftables", true, true, BackendIPTables, BackendIPTables, "forced by configuration", ""},
		{"forced iptables, none usable", false, false, BackendIPTables, "", "", "--backend iptables: iptables: not installed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFakeNode(t)
			k := kerneltest.NewFakeKernel(f.nl, f.sys, f.ipt, f.ipt6)
			nf := kerneltest.NewFakeNFT()
			nf.Foreign["ip kube-proxy"] = c.kubeProxy
			k.NFT = nf
			if !c.iptables {
				k.IPT = noIPTables
			}
			cfg := DefaultConfig()
			cfg.Backend = c.backend
			d, err := New(context.Background(), cfg, Options{Node: k, OpenNS: f.open})
			if c.fails != "" {
				if err == nil || !strings.Contains(err.Error(), c.fails) {
					t.Fatalf("error %v, want %q", err, c.fails)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			b, why := d.Backend()
			if b != c.want || !strings.Contains(why, c.why) {
				t.Fatalf("backend %s (%s), want %s (%s)", b, why, c.want, c.why)
			}
			if w := d.KubeProxyWarning(); (w != "") != (c.kubeProxy && c.want == BackendIPTables) {
				t.Fatalf("warning %q", w)
			}
		})
	}
}

// TestAutoFollowsKubeProxy: an agent that chose iptables (kube-proxy had
// no table yet, as on a booting node) switches to nftables at the next
// full apply once kube-proxy runs in nftables mode: our table and its set
// written, then the iptables chains (node and ztunnel netns) and the
// ipsets removed.
func TestAutoFollowsKubeProxy(t *testing.T) {
	f := newFakeNode(t)
	k := kerneltest.NewFakeKernel(f.nl, f.sys, f.ipt, f.ipt6)
	nf, ztNF := kerneltest.NewFakeNFT(), kerneltest.NewFakeNFT()
	k.NFT, f.ztPaths["/run/netns/zt"].NFT = nf, ztNF
	cfg := DefaultConfig()
	cfg.NetNSDir = t.TempDir()
	d, err := New(context.Background(), cfg, Options{Node: k, OpenNS: f.open})
	if err != nil {
		t.Fatal(err)
	}
	st := State{Ztunnel: f.zt, Pods: pods(2)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	dump := func(f *iptables.Fake) string { s, _ := f.Save(context.Background(), ""); return s }
	if b, _ := d.Backend(); b != BackendIPTables || !strings.Contains(dump(f.ipt), ChainPrefix) {
		t.Fatalf("backend %s before kube-proxy's table", b)
	}
	nf.Foreign["ip kube-proxy"] = true
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	b, why := d.Backend()
	if b != BackendNFTables || !strings.Contains(why, "appeared after start") {
		t.Fatalf("backend %s (%s) after kube-proxy's table appeared", b, why)
	}
	for name, left := range map[string]string{"node": dump(f.ipt), "ztunnel netns": dump(f.ztIPT)} {
		if strings.Contains(left, ChainPrefix) {
			t.Errorf("iptables chains left in the %s:\n%s", name, left)
		}
	}
	if _, exists, _ := ipsetMembers(f.nl, cfg.IPSetName, IPv4); exists {
		t.Error("ipset left")
	}
	if m, _, _ := nf.Elements(NFTTable, nftSet(cfg, IPv4)); len(m) != 2 || len(nf.Rules(NFTTable, "prerouting-ip")) == 0 || len(ztNF.Rules(NFTTable, "prerouting-ip")) == 0 {
		t.Errorf("nftables not written: members %v, node chain %v, ztunnel chain %v", m, nf.Rules(NFTTable, "prerouting-ip"), ztNF.Rules(NFTTable, "prerouting-ip"))
	}
	if w := d.KubeProxyWarning(); w != "" {
		t.Errorf("warning after the switch: %s", w)
	}
}

// TestServiceCIDRChangeRewritesChains: a change of the Service ranges
// alone (same ztunnel, same pods) rewrites the raw chain, not only the
// pod sets.
func TestServiceCIDRChangeRewritesChains(t *testing.T) {
	f := newFakeNode(t)
	k := kerneltest.NewFakeKernel(f.nl, f.sys, f.ipt, f.ipt6)
	nf := kerneltest.NewFakeNFT()
	k.NFT, f.ztPaths["/run/netns/zt"].NFT = nf, kerneltest.NewFakeNFT()
	cfg := DefaultConfig()
	cfg.NetNSDir, cfg.Backend = t.TempDir(), BackendNFTables
	d, err := New(context.Background(), cfg, Options{Node: k, OpenNS: f.open})
	if err != nil {
		t.Fatal(err)
	}
	st := State{Ztunnel: f.zt, Pods: pods(2)}
	for _, svc := range [][]netip.Prefix{nil, {netip.MustParsePrefix("10.96.0.0/16")}, {netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("10.97.0.0/24")}} {
		st.ServiceCIDRs = svc
		if _, err := d.Apply(context.Background(), st); err != nil {
			t.Fatal(err)
		}
		raw := strings.Join(nf.Rules(NFTTable, "raw-prerouting-ip"), "\n")
		for _, p := range svc {
			if !strings.Contains(raw, "ip daddr "+p.String()) {
				t.Fatalf("Service range %s not in the raw chain after the apply:\n%s", p, raw)
			}
		}
	}
}
