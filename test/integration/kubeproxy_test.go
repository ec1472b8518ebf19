package integration

import (
	"strings"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestKubeProxyNFTablesWarning: with kube-proxy in nftables mode (its
// table in the node's netns) the iptables backend cannot keep Service VIPs
// as the original destination, and says so (log, /debug/state, status);
// without the table it says nothing.
func TestKubeProxyNFTablesWarning(t *testing.T) {
	n, _ := oneNode(t, nil)
	if w := n.dp.KubeProxyWarning(); w != "" {
		t.Fatalf("warning without kube-proxy's table: %s", w)
	}
	netnstest.Exec(t, n.NS, "nft", "add", "table", "ip", "kube-proxy")
	if w := n.dp.KubeProxyWarning(); !strings.Contains(w, "nftables mode") {
		t.Fatalf("no warning with kube-proxy's table: %q", w)
	}
	netnstest.Exec(t, n.NS, "nft", "delete", "table", "ip", "kube-proxy")
	if w := n.dp.KubeProxyWarning(); w != "" {
		t.Fatalf("warning after kube-proxy's table went: %s", w)
	}
}
