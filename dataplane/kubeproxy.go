package dataplane

// kube-proxy's mode, as far as what we write depends on it.

import "go.uber.org/zap"

// kubeProxyTable is the table kube-proxy's nftables mode keeps its rules in.
const kubeProxyTable = "kube-proxy"

// kubeProxyNFTables reports whether kube-proxy runs in nftables mode on
// this node: its table exists (in the ip or ip6 family).
func (d *Dataplane) kubeProxyNFTables() bool {
	nf := nftOf(d.node)
	for _, fam := range []string{"ip", "ip6"} {
		if found, err := nf.HasTable(fam, kubeProxyTable); err == nil && found {
			return true
		}
	}
	return false
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
