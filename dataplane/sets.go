package dataplane

// The ipsets of ambient pods' addresses (one per family), updated in place.

import (
	"context"
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
func ipsetMembers(nl kernel.Netlink, name string, f Family) (map[netip.Addr]string, bool, error) {
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
	resyncFlag
	fam  Family
	name string
	nl   kernel.Netlink
	// exists says the set was found or created.
	exists bool
	t      *deltaTracker[netip.Addr, string]
	// nft, with the nftables backend, keeps the members in our table's set
	// instead of an ipset.
	nft *nftSetStore
}

func newSetManager(cfg Config, f Family, nl kernel.Netlink) *setManager {
	return &setManager{resyncFlag: resyncFlag{true}, fam: f, name: setName(cfg, f), nl: nl,
		t: newDeltaTracker(func(a, b string) bool { return a == b }, netip.Addr.Compare)}
}

func (m *setManager) kind() string {
	if m.nft != nil {
		return KindNFT + " set " + m.name
	}
	return KindIPSet + " " + m.name
}

// clone is a copy for a dry run (Diff), which must not disturb what the
// next apply starts from.
func (m *setManager) clone() *setManager {
	c := *m
	c.t = m.t.clone()
	return &c
}

// setDesired makes members (address -> pod UID) the set's only members.
func (m *setManager) setDesired(members map[netip.Addr]string) { m.t.ReplaceDesired(members) }

// members reads the set's members from the kernel (the ipset, or the set
// of our nftables table); exists is false when there is no set.
func (m *setManager) members() (map[netip.Addr]string, bool, error) {
	if m.nft != nil {
		return m.nft.members()
	}
	return ipsetMembers(m.nl, m.name, m.fam)
}

// readBack records the set's members (none when it does not exist yet).
func (m *setManager) readBack(context.Context) error {
	have, exists, err := m.members()
	if err != nil {
		return err
	}
	if have == nil {
		have = map[netip.Addr]string{}
	}
	m.exists, m.queued = exists, false
	m.t.ReplaceActual(have)
	return nil
}

func (m *setManager) pending() []string {
	var out []string
	if !m.exists {
		out = append(out, "create "+m.name)
	}
	for _, a := range m.t.PendingUpdates() {
		uid, _ := m.t.Desired(a)
		out = append(out, fmt.Sprintf("add %s %s (%s)", m.name, a, uid))
	}
	for _, a := range m.t.PendingDeletes() {
		out = append(out, fmt.Sprintf("del %s %s", m.name, a))
	}
	return out
}

// applyUpdates creates the set if it is missing, then adds (or re-labels)
// every pending member.
func (m *setManager) applyUpdates(_ context.Context, w *writer) error {
	if m.nft != nil {
		return nftSets{[]*setManager{m}}.write(w, true)
	}
	if !m.exists {
		opts := netlink.IpsetCreateOptions{Family: familyNum(m.fam), Comments: true}
		if err := w.do(KindIPSet, "create "+m.name, func() error { return m.nl.IpsetCreate(m.name, "hash:ip", opts) }); err != nil {
			return err
		}
		m.exists = true
	}
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
func (m *setManager) applyDeletes(_ context.Context, w *writer) error {
	if m.nft != nil {
		return nftSets{[]*setManager{m}}.write(w, false)
	}
	for _, a := range m.t.PendingDeletes() {
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice())}
		if err := w.do(KindIPSet, fmt.Sprintf("del %s %s", m.name, a), func() error { return ignoreNotExist(m.nl.IpsetDel(m.name, e)) }); err != nil {
			return err
		}
		m.t.Removed(a)
	}
	return nil
}

// holder is the pod (UID) the set's desired state gives address a to.
func (m *setManager) holder(a netip.Addr) (string, bool) { return m.t.Desired(a) }

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
