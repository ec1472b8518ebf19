package dataplane

import (
	"context"
	"fmt"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// Snapshot is the kernel state we own, as read back (for debugging).
type Snapshot struct {
	Backend         Backend                      `json:"backend"`
	IPTablesBackend string                       `json:"iptablesBackend"`
	Tunnel          TunnelType                   `json:"tunnel"`
	IPSets          map[string]map[string]string `json:"ipsets"`
	NS              NSSnapshot                   `json:"node"`
	Ztunnel         *NSSnapshot                  `json:"ztunnel,omitempty"`
	Errors          []string                     `json:"errors,omitempty"`
}

// NSSnapshot is our state in one netns.
type NSSnapshot struct {
	NetNS    string                         `json:"netns,omitempty"`
	Links    []string                       `json:"links"`
	Rules    []string                       `json:"rules"`
	Routes   []string                       `json:"routes"`
	IPTables map[string]map[string][]string `json:"iptables"`
	// IP6Tables is ip6tables, where the node carries IPv6.
	IP6Tables map[string]map[string][]string `json:"ip6tables,omitempty"`
	// NFTables are the chains of our nftables table, by name, each rule as
	// its comment (the rule's text) reads back.
	NFTables map[string][]string `json:"nftables,omitempty"`
}

// Snapshot reads back everything we own on the node and in the last ztunnel netns.
func (d *Dataplane) Snapshot(ctx context.Context) Snapshot {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := Snapshot{Backend: d.filter, IPTablesBackend: d.backend, Tunnel: d.tunnel, IPSets: map[string]map[string]string{}}
	for _, f := range []Family{IPv4, IPv6} {
		m, exists, err := d.mgr.sets[f].members()
		if err != nil {
			s.Errors = append(s.Errors, err.Error())
		}
		if !exists {
			continue
		}
		out := map[string]string{}
		for a, c := range m {
			out[a.String()] = c
		}
		s.IPSets[d.setName(f)] = out
	}
	var errs []string
	node := map[Family]*iptables.Syncer{}
	for f, m := range d.mgr.nodeFilter {
		if s := m.syncer(); s != nil {
			node[f] = s
		}
	}
	s.NS, errs = d.nsSnapshot(ctx, d.node, node, []string{NodeInLink, NodeOutLink})
	s.Errors = append(s.Errors, errs...)
	if z := d.wanted.Ztunnel; z != nil {
		k, err := d.openNS(z.NetNS)
		if err != nil {
			s.Errors = append(s.Errors, err.Error())
		} else {
			syncers := map[Family]*iptables.Syncer{}
			for _, f := range d.fams {
				if r, err := k.IPT(d.backend, int(f)); err == nil && d.filter == BackendIPTables {
					syncers[f] = iptables.NewSyncer(r, ChainPrefix)
				}
			}
			{
				zs, errs := d.nsSnapshot(ctx, k, syncers, []string{ZtunnelInLink, ZtunnelOutLink})
				zs.NetNS = z.NetNS
				s.Ztunnel = &zs
				s.Errors = append(s.Errors, errs...)
			}
			k.Close()
		}
	}
	return s
}

func (d *Dataplane) nsSnapshot(ctx context.Context, k *kernel.Kernel, ipt map[Family]*iptables.Syncer, links []string) (NSSnapshot, []string) {
	var errs []string
	ns := NSSnapshot{}
	for _, n := range links {
		l, err := k.NL.LinkByName(n)
		if err != nil {
			continue
		}
		info, _ := readTunnel(l)
		ns.Links = append(ns.Links, fmt.Sprintf("%s %s vni %d port %d mtu %d mac %s up=%v", n, info.Type, info.VNI, info.Port,
			l.Attrs().MTU, l.Attrs().HardwareAddr, l.Attrs().Flags&1 != 0))
	}
	if rules, err := k.NL.RuleList(netlink.FAMILY_ALL); err != nil {
		errs = append(errs, err.Error())
	} else {
		for _, r := range rules {
			if int(r.Protocol) == d.cfg.RouteProtocol || isLocalRule(r) {
				ns.Rules = append(ns.Rules, ruleString(r))
			}
		}
	}
	if routes, err := ourRoutes(k.NL, d.cfg.RouteProtocol); err != nil {
		errs = append(errs, err.Error())
	} else {
		for _, r := range routes {
			ns.Routes = append(ns.Routes, routeString(r))
		}
		slices.Sort(ns.Routes)
	}
	if k.NFT != nil {
		if a, err := k.NFT.ReadBack(NFTTable); err != nil {
			errs = append(errs, err.Error())
		} else if a.Exists {
			ns.NFTables = a.Rules
		}
	}
	for f, s := range ipt {
		t, err := s.Actual(ctx)
		if err != nil {
			errs = append(errs, err.Error())
		}
		if f == IPv6 {
			ns.IP6Tables = t
		} else {
			ns.IPTables = t
		}
	}
	return ns, errs
}
