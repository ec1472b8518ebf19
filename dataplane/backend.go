package dataplane

// Choosing the backend our rules are written with, and writing the node's
// and a ztunnel netns's chains with it.

import (
	"context"
	"errors"
	"fmt"
	"os/exec"

	"go.uber.org/zap"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// chooseBackend picks the iptables flavour (which kubelet uses; kept for
// the conflict check and for cleaning up after the other backend) and the
// backend our rules are written with.
func (d *Dataplane) chooseBackend(ctx context.Context) error {
	var detectErr error
	switch d.cfg.IPTablesMode {
	case IPTablesNFT:
		d.backend, d.backendReason = iptables.NFT, "forced by configuration"
	case IPTablesLegacy:
		d.backend, d.backendReason = iptables.Legacy, "forced by configuration"
	default:
		b, why, err := iptables.Detect(ctx, func(b string) (iptables.Runner, error) { return d.node.IPT(b, 4) })
		d.backend, d.backendReason, detectErr = b, why, err
		if err != nil {
			d.backend, d.backendReason = iptables.NFT, "no usable iptables"
		}
	}
	switch {
	case d.cfg.Backend == BackendIPTables && detectErr != nil:
		return fmt.Errorf("--backend iptables: %w", detectErr)
	case d.cfg.Backend != BackendAuto:
		d.filter, d.filterReason = d.cfg.Backend, "forced by configuration"
	case d.kubeProxyNFTables():
		d.filter, d.filterReason = BackendNFTables, "kube-proxy runs in nftables mode (its table "+kubeProxyTable+" exists): only our own nftables table keeps a Service VIP from its DNAT"
	case detectErr != nil:
		d.filter, d.filterReason = BackendNFTables, "no usable iptables: "+detectErr.Error()
	default:
		d.filter, d.filterReason = BackendIPTables, "kube-proxy does not run in nftables mode and iptables ("+d.backend+") works"
	}
	return nil
}

// followKubeProxy switches an auto-chosen iptables backend to nftables
// once kube-proxy runs in nftables mode (its table appeared after we
// started, as on a booting node): the next convergence writes our table
// and then removes the iptables rules, as a restart with the other
// backend would. Called with d.mu held, before a full convergence.
func (d *Dataplane) followKubeProxy() {
	if d.cfg.Backend != BackendAuto || d.filter != BackendIPTables || !d.kubeProxyNFTables() {
		return
	}
	d.filter, d.filterReason = BackendNFTables, "kube-proxy runs in nftables mode (its table "+kubeProxyTable+" appeared after start): only our own nftables table keeps a Service VIP from its DNAT"
	d.log.Warn("switching to the nftables backend", zap.String("reason", d.filterReason))
	_ = d.useBackend() // nftables needs no binary: it cannot fail
	for path := range d.mgr.ztFilter {
		d.mgr.ztFilter[path] = map[Family]*filterManager{} // written anew, then the old chains retired
	}
	d.fast, d.otherRetired = nil, false
	queueResync(d.mgr.all())
}

// useBackend gives the node's chain and set managers the writers of the
// chosen backend (at start, and when auto switches).
func (d *Dataplane) useBackend() error {
	for _, f := range d.fams {
		cw, err := d.chainWriter(d.node, f)
		if err != nil {
			return err
		}
		d.mgr.nodeFilter[f] = newFilterManager(cw)
	}
	for f, m := range d.mgr.sets {
		m.nft = nil
		if d.filter == BackendNFTables {
			m.nft = newNFTSetStore(d.node, nftSet(d.cfg, f))
		}
	}
	return nil
}

// Backend returns the backend our rules are written with and why.
func (d *Dataplane) Backend() (Backend, string) { return d.filter, d.filterReason }

// chainWriter writes our chains of family f in the netns of k with the
// chosen backend.
func (d *Dataplane) chainWriter(k *kernel.Kernel, f Family) (chainWriter, error) {
	if d.filter == BackendNFTables {
		return newNFTChains(k, f), nil
	}
	r, err := k.IPT(d.backend, int(f))
	if err != nil {
		return nil, err
	}
	return newIPTChains(r), nil
}

// nodeChains renders the node's chains of p's family for the backend.
func (d *Dataplane) nodeChains(p NodeParams) ruleset {
	if d.filter == BackendNFTables {
		return NodeChains(d.cfg, p)
	}
	return NodeRuleset(d.cfg, p)
}

// ztunnelChains renders a ztunnel netns's chains of p's family for the backend.
func (d *Dataplane) ztunnelChains(p ZtunnelParams) ruleset {
	if d.filter == BackendNFTables {
		return ZtunnelChains(d.cfg, p)
	}
	return ZtunnelRuleset(d.cfg, p)
}

// iptSyncer reads the node's iptables of family f: the iptables writer's
// Syncer, or, with nftables, one of its own (other agents' rules are
// still iptables); nil when there is no iptables.
func (d *Dataplane) iptSyncer(f Family) *iptables.Syncer {
	m := d.mgr.nodeFilter[f]
	if m == nil {
		return nil
	}
	if s := m.syncer(); s != nil {
		return s
	}
	if d.iptReader == nil {
		d.iptReader = map[Family]*iptables.Syncer{}
	}
	if s, ok := d.iptReader[f]; ok {
		return s
	}
	r, err := d.node.IPT(d.backend, int(f))
	if err != nil {
		return nil
	}
	d.iptReader[f] = iptables.NewSyncer(r, ChainPrefix)
	return d.iptReader[f]
}

// retireOtherBackend removes what the other backend wrote on the node and
// in the ztunnel netns we write into (an agent restarted with the other
// backend), once ours is in place: both capture alike meanwhile, so there
// is no gap, and nothing of the old one stays.
func (d *Dataplane) retireOtherBackend(ctx context.Context, w *writer) error {
	var errs []error
	for _, path := range append([]string{""}, d.mgr.ztunnelNetNS()...) {
		k := d.node
		if path != "" {
			var err error
			if k, err = d.openNS(path); err != nil {
				continue // gone: nothing to retire there
			}
		}
		if d.filter == BackendNFTables {
			errs = append(errs, d.removeIPTables(ctx, k, w))
		} else {
			errs = append(errs, removeNFTTable(k, w))
		}
		if path != "" {
			k.Close()
		}
	}
	if d.filter == BackendNFTables {
		errs = append(errs, d.destroyIPSets(w))
	}
	return errors.Join(errs...)
}

// removeIPTables removes our chains of both iptables flavours from the
// netns of k; a flavour whose tools are absent holds none. The families
// run side by side (each flavour is a process or two).
func (d *Dataplane) removeIPTables(ctx context.Context, k *kernel.Kernel, w *writer) error {
	return eachFamily(d.fams, w, func(f Family, w *writer) error {
		var errs []error
		for _, b := range []string{d.backend, otherBackend(d.backend)} {
			r, err := k.IPT(b, int(f))
			if err != nil {
				errs = append(errs, err)
				continue
			}
			err = runIPTables(ctx, iptables.NewSyncer(r, ChainPrefix), nil, w)
			if err != nil && ((b == d.backend && d.filter == BackendIPTables) || !errors.Is(err, exec.ErrNotFound)) {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	})
}

// removeNFTTable deletes our nftables table (chains and sets) from the
// netns of k.
func removeNFTTable(k *kernel.Kernel, w *writer) error {
	if k.NFT == nil {
		return nil
	}
	a, err := k.NFT.ReadBack(NFTTable)
	if err != nil || !a.Exists {
		return err
	}
	return w.do(KindNFT, "delete table inet "+NFTTable, func() error { return k.NFT.DeleteTable(NFTTable) })
}

// destroyIPSets destroys the node's pod ipsets (a foreign set under our
// name is left alone).
func (d *Dataplane) destroyIPSets(w *writer) error {
	var errs []error
	for _, f := range []Family{IPv4, IPv6} {
		name := d.setName(f)
		_, exists, err := ipsetMembers(d.node.NL, name, f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if exists {
			errs = append(errs, w.do(KindIPSet, "destroy "+name, func() error { return ignoreNotExist(d.node.NL.IpsetDestroy(name)) }))
		}
	}
	return errors.Join(errs...)
}
