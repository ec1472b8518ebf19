package integration

import (
	"strings"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestBackendFollowsKubeProxyMode: --backend auto picks nftables where
// kube-proxy runs in nftables mode (its table in the node's netns) and
// iptables elsewhere, saying why; an explicit iptables backend there
// warns that it cannot keep Service VIPs as the original destination.
func TestBackendFollowsKubeProxyMode(t *testing.T) {
	n, _ := oneNode(t, func(c *dataplane.Config) { c.Backend = dataplane.BackendAuto })
	if b, why := n.dp.Backend(); b != dataplane.BackendIPTables || !strings.Contains(why, "does not run in nftables mode") {
		t.Fatalf("auto without kube-proxy's table: %s (%s)", b, why)
	}
	netnstest.Exec(t, n.NS, "nft", "add", "table", "ip", "kube-proxy")
	auto := newDataplane(t, n, func(c *dataplane.Config) { c.Backend = dataplane.BackendAuto })
	if b, why := auto.Backend(); b != dataplane.BackendNFTables || !strings.Contains(why, "kube-proxy runs in nftables mode") {
		t.Fatalf("auto with kube-proxy's table: %s (%s)", b, why)
	}
	if w := auto.KubeProxyWarning(); w != "" {
		t.Fatalf("warning with the nftables backend: %s", w)
	}
	forced := newDataplane(t, n, func(c *dataplane.Config) { c.Backend = dataplane.BackendIPTables })
	if w := forced.KubeProxyWarning(); !strings.Contains(w, "nftables mode") {
		t.Fatalf("no warning for --backend iptables with kube-proxy's table: %q", w)
	}
	netnstest.Exec(t, n.NS, "nft", "delete", "table", "ip", "kube-proxy")
	if w := forced.KubeProxyWarning(); w != "" {
		t.Fatalf("warning after kube-proxy's table went: %s", w)
	}
}
