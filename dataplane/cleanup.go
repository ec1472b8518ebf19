package dataplane

// Cleanup: everything we own, in the make-before-break order.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"go.uber.org/zap"
)

func otherBackend(b string) string {
	if b == iptables.NFT {
		return iptables.Legacy
	}
	return iptables.NFT
}

// Cleanup removes everything we own on the node and in every ztunnel netns
// under the netns directory. Not-found is success.
func (d *Dataplane) Cleanup(ctx context.Context) (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	start := time.Now()
	w := newWriter(false)
	// Node first, in the make-before-break order (transition.go): inbound
	// capture goes before the marks that keep a pod's replies out of it,
	// the marks before the routes and tunnels they lead to.
	var errs []error
	routes := newRouteManager(d.node.NL, d.cfg.RouteProtocol)
	if err := routes.readBackWith(nil); err != nil {
		errs = append(errs, err)
	} else {
		errs = append(errs, routes.applyDeletesWhere(d.isInbound, w))
	}
	errs = append(errs, d.cleanupNS(ctx, d.node, []string{NodeInLink, NodeOutLink}, w))
	errs = append(errs, d.destroyIPSets(w))
	for _, path := range d.ztunnelNamespaces() {
		if err := d.cleanupZtunnelNS(ctx, &d.mgr, path, w); err != nil {
			errs = append(errs, fmt.Errorf("ztunnel netns %s: %w", path, err))
		}
	}
	for _, m := range d.mgr.nodeFilter {
		m.forget()
	}
	d.fast, d.wanted = nil, State{}
	queueResync(d.mgr.all())
	w.res.Elapsed = time.Since(start)
	err := errors.Join(errs...)
	d.log.Info("dataplane cleanup", zap.Any("writes", w.res.Writes), zap.Duration("elapsed", w.res.Elapsed), zap.Error(err))
	return *w.res, err
}

// ztunnelNamespaces lists the namespaces under NetNSDir that are pods of
// this node (a veth here has its peer there) and hold one of our
// ztunnel-side links, plus the last one applied. Pods of other nodes sharing
// the directory (several nodes on one host) are never touched.
func (d *Dataplane) ztunnelNamespaces() []string {
	set := map[string]bool{}
	for _, p := range d.mgr.ztunnelNetNS() {
		set[p] = true
	}
	for _, p := range d.nodePodNetNS() {
		k, err := d.openNS(p)
		if err != nil {
			continue
		}
		for _, n := range []string{ZtunnelInLink, ZtunnelOutLink} {
			if l, err := k.NL.LinkByName(n); err == nil {
				if _, ok := readTunnel(l); ok {
					set[p] = true
				}
			}
		}
		k.Close()
	}
	out := slices.Collect(maps.Keys(set))
	sort.Strings(out)
	return out
}

// nodePodNetNS lists the namespaces under NetNSDir that are pods of this
// node: a veth here has its peer there. Pods of other nodes sharing the
// directory (several nodes on one host) are never touched.
func (d *Dataplane) nodePodNetNS() []string {
	peers := map[int]bool{}
	if links, err := d.node.NL.LinkList(); err == nil {
		for _, l := range links {
			if l.Type() == "veth" && l.Attrs().NetNsID >= 0 {
				peers[l.Attrs().NetNsID] = true
			}
		}
	}
	var out []string
	for _, p := range kernel.ListNetNSDir(d.cfg.NetNSDir) {
		if id := kernel.NsID(d.node.NL, p); id >= 0 && peers[id] {
			out = append(out, p)
		}
	}
	return out
}
