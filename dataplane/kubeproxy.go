package dataplane

// kube-proxy's mode, as far as what we write depends on it.

import (
	"slices"

	"github.com/google/nftables"
	"go.uber.org/zap"
)

// kubeProxyTable is the table kube-proxy's nftables mode keeps its rules in.
const kubeProxyTable = "kube-proxy"

// kubeProxyNFTables reports whether kube-proxy runs in nftables mode on
// this node: its table exists (in the ip or ip6 family).
func (d *Dataplane) kubeProxyNFTables() bool {
	found := false
	if d.node.InNS == nil {
		return false // a fake kernel
	}
	_ = d.node.InNS(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
			tables, err := c.ListTablesOfFamily(fam)
			if err != nil {
				return err
			}
			found = found || slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == kubeProxyTable })
		}
		return nil
	})
	return found
}

// KubeProxyWarning says what the iptables backend cannot do for this
// node's kube-proxy ("" when nothing): in nftables mode kube-proxy's DNAT
// lives in its own table, which an ACCEPT of ours does not stop, so
// ztunnel sees a captured connection's endpoint, not the Service VIP.
func (d *Dataplane) KubeProxyWarning() string {
	if d.filter == BackendNFTables || !d.kubeProxyNFTables() {
		return ""
	}
	return "kube-proxy runs in nftables mode: --backend iptables cannot keep a captured connection's Service VIP " +
		"as its original destination (kube-proxy's DNAT in table " + kubeProxyTable + " runs first); ztunnel sees the endpoint instead"
}

// warnKubeProxy logs KubeProxyWarning once, at start.
func (d *Dataplane) warnKubeProxy() {
	if w := d.KubeProxyWarning(); w != "" {
		d.log.Warn(w, zap.String("iptablesBackend", d.backend))
	}
}
