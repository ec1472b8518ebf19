package dataplane

// The nftables backend's pod sets: elements of a set in our node table,
// labelled with the pod's UID. Both families' sets change in one
// transaction per phase: the kernel is slow to commit a deletion (about
// 10 ms here, against 0.2 ms for an addition), so a pod leaving costs one
// commit, not one per family.

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

// nftSetStore is where one family's set manager keeps its members.
type nftSetStore struct {
	nf  kernel.NFTables
	set nft.Set
}

func newNFTSetStore(k *kernel.Kernel, s nft.Set) *nftSetStore {
	return &nftSetStore{nf: nftOf(k), set: s}
}

func (s *nftSetStore) members() (map[netip.Addr]string, bool, error) {
	return s.nf.Elements(NFTTable, s.set)
}

// nftSets converges the set managers ms (one per family, each with an
// nftSetStore) as one manager.
type nftSets struct{ ms []*setManager }

func (p nftSets) kind() string { return KindNFT + " sets" }

func (p nftSets) readBack(ctx context.Context) error {
	for _, m := range p.ms {
		if err := m.readBack(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (p nftSets) pending() []string {
	var out []string
	for _, m := range p.ms {
		out = append(out, m.pending()...)
	}
	return out
}

func (p nftSets) queueResync() {
	for _, m := range p.ms {
		m.queueResync()
	}
}

func (p nftSets) resyncQueued() bool {
	return slices.ContainsFunc(p.ms, func(m *setManager) bool { return m.resyncQueued() })
}

func (p nftSets) applyUpdates(_ context.Context, w *writer) error { return p.write(w, true) }
func (p nftSets) applyDeletes(_ context.Context, w *writer) error { return p.write(w, false) }

// write adds (or re-labels) every pending member (updates) or deletes
// every member nothing desires, creating missing sets, in one transaction.
func (p nftSets) write(w *writer, updates bool) error {
	var us []nft.ElementUpdate
	for _, m := range p.ms {
		u := nft.ElementUpdate{Set: m.nft.set, Add: map[netip.Addr]string{}}
		if updates {
			for _, a := range m.t.PendingUpdates() {
				u.Add[a], _ = m.t.Desired(a)
				if _, had := m.t.Actual(a); had {
					u.Relabel = append(u.Relabel, a)
				}
				w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: add %s %s (%s)", KindNFT, m.name, a, u.Add[a]))
			}
		} else {
			u.Del = m.t.PendingDeletes()
			for _, a := range u.Del {
				w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: del %s %s", KindNFT, m.name, a))
			}
		}
		if !m.exists {
			w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: create set %s", KindNFT, m.name))
		} else if len(u.Add) == 0 && len(u.Del) == 0 {
			continue
		}
		us = append(us, u)
	}
	if len(us) == 0 || w.dry {
		return nil
	}
	if err := p.ms[0].nft.nf.UpdateElements(NFTTable, us...); err != nil {
		return fmt.Errorf("%s: %w", KindNFT, err)
	}
	w.res.Writes[KindNFT]++
	for i, u := range us {
		m := p.ms[slices.IndexFunc(p.ms, func(m *setManager) bool { return m.nft.set == us[i].Set })]
		m.exists = true
		for a, uid := range u.Add {
			m.t.Written(a, uid)
		}
		for _, a := range u.Del {
			m.t.Removed(a)
		}
	}
	return nil
}
