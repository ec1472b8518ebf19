package dataplane

// The nftables backend's pod sets: elements of a set in our node table,
// labelled with the pod's UID, written in one transaction per change.

import (
	"fmt"
	"net/netip"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

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

// write adds (or re-labels) the addresses in add and deletes those in
// del, as m's tracker wants them, in one transaction.
func (s *nftSetStore) write(m *setManager, w *writer, add, del []netip.Addr) error {
	if len(add) == 0 && len(del) == 0 && m.exists {
		return nil
	}
	elems := map[netip.Addr]string{}
	var relabel []netip.Addr
	for _, a := range add {
		elems[a], _ = m.t.Desired(a)
		if _, had := m.t.Actual(a); had {
			relabel = append(relabel, a)
		}
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: add %s %s (%s)", KindNFT, s.set.Name, a, elems[a]))
	}
	for _, a := range del {
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: del %s %s", KindNFT, s.set.Name, a))
	}
	if !m.exists {
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: create set %s", KindNFT, s.set.Name))
	}
	if w.dry {
		return nil
	}
	if err := s.nf.UpdateElements(NFTTable, s.set, elems, relabel, del); err != nil {
		return fmt.Errorf("%s: %w", KindNFT, err)
	}
	w.res.Writes[KindNFT]++
	m.exists = true
	for a, uid := range elems {
		m.t.Written(a, uid)
	}
	for _, a := range del {
		m.t.Removed(a)
	}
	return nil
}
