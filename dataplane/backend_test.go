package dataplane

import (
	"context"
	"errors"
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
