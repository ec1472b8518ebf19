package dataplane

// The nftables backend's pod sets: elements of a set in our node table,
// labelled with the pod's UID, written in one transaction per change.

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

type nftSetStore struct {
	open func() (*nftables.Conn, func(), error)
	set  nft.Set
}

func newNFTSetStore(k *kernel.Kernel, s nft.Set) *nftSetStore {
	open := k.NFT
	if open == nil {
		open = func() (*nftables.Conn, func(), error) { return nil, nil, errNoNFT }
	}
	return &nftSetStore{open: open, set: s}
}

func (s *nftSetStore) members() (map[netip.Addr]string, bool, error) {
	c, done, err := s.open()
	if err != nil {
		return nil, false, err
	}
	defer done()
	return nft.Elements(c, NFTTable, s.set)
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
	c, done, err := s.open()
	if err != nil {
		return err
	}
	defer done()
	if err := nft.UpdateElements(c, NFTTable, s.set, elems, relabel, del); err != nil {
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
