package dataplane

// The ipsets of ambient pods' addresses (one per family), updated in place.

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func (d *Dataplane) setName(f Family) string { return setName(d.cfg, f) }

func familyNum(f Family) uint8 {
	if f == IPv6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func isNotExist(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ESRCH)
}

// ipsetMembers lists a set we own; ok is false when it does not exist.
func (d *Dataplane) ipsetMembers(nl kernel.Netlink, f Family) (map[netip.Addr]string, bool, error) {
	name := d.setName(f)
	res, err := nl.IpsetList(name)
	if err != nil {
		if isNotExist(err) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("list ipset %s: %w", name, err)
	}
	if res.TypeName != "hash:ip" || res.Family != familyNum(f) {
		return nil, true, fmt.Errorf("ipset %s exists as %s family %d, not hash:ip family %d: refusing to replace a set in use", name, res.TypeName, res.Family, familyNum(f))
	}
	out := map[netip.Addr]string{}
	for _, e := range res.Entries {
		if a, ok := netip.AddrFromSlice(e.IP); ok {
			out[a.Unmap()] = e.Comment
		}
	}
	return out, true, nil
}

// setManager owns one family's ipset: its members are pod addresses,
// labelled with the pod's UID.
type setManager struct {
	fam  Family
	name string
	nl   kernel.Netlink
	t    *deltaTracker[netip.Addr, string]
}

func newSetManager(cfg Config, f Family, nl kernel.Netlink) *setManager {
	return &setManager{fam: f, name: setName(cfg, f), nl: nl,
		t: newDeltaTracker(func(a, b string) bool { return a == b }, netip.Addr.Compare)}
}

// clone is a copy for a dry run (Diff), which must not disturb what the
// next apply starts from.
func (m *setManager) clone() *setManager {
	c := *m
	c.t = m.t.clone()
	return &c
}

// readBack records the set's members, creating the set when it is missing.
func (m *setManager) readBack(d *Dataplane, w *writer) error {
	have, exists, err := d.ipsetMembers(m.nl, m.fam)
	if err != nil {
		return err
	}
	if !exists {
		opts := netlink.IpsetCreateOptions{Family: familyNum(m.fam), Comments: true}
		if err := w.do(KindIPSet, "create "+m.name, func() error { return m.nl.IpsetCreate(m.name, "hash:ip", opts) }); err != nil {
			return err
		}
	}
	if have == nil {
		have = map[netip.Addr]string{}
	}
	m.t.ReplaceActual(have)
	return nil
}

// applyAdds adds (or re-labels) every pending member.
func (m *setManager) applyAdds(w *writer) error {
	for _, a := range m.t.PendingUpdates() {
		uid, _ := m.t.Desired(a)
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice()), Comment: uid, Replace: true}
		if err := w.do(KindIPSet, fmt.Sprintf("add %s %s (%s)", m.name, a, uid), func() error { return m.nl.IpsetAdd(m.name, e) }); err != nil {
			return err
		}
		m.t.Written(a, uid)
	}
	return nil
}

// applyDeletes deletes every member nothing desires.
func (m *setManager) applyDeletes(w *writer) error {
	for _, a := range m.t.PendingDeletes() {
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice())}
		if err := w.do(KindIPSet, fmt.Sprintf("del %s %s", m.name, a), func() error { return ignoreNotExist(m.nl.IpsetDel(m.name, e)) }); err != nil {
			return err
		}
		m.t.Removed(a)
	}
	return nil
}

func sortedAddrs[V any](m map[netip.Addr]V) []netip.Addr {
	return slices.SortedFunc(maps.Keys(m), func(a, b netip.Addr) int { return a.Compare(b) })
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

func ignoreNotExist(err error) error {
	if err != nil && (isNotExist(err) || errors.Is(err, unix.EADDRNOTAVAIL)) {
		return nil
	}
	return err
}
