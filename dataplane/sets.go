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

// readSets returns the members of our sets, creating a set that is missing.
func (d *Dataplane) readSets(w *writer) (map[Family]map[netip.Addr]string, error) {
	out := map[Family]map[netip.Addr]string{}
	for _, f := range []Family{IPv4, IPv6} {
		name := d.setName(f)
		have, exists, err := d.ipsetMembers(d.node.NL, f)
		if err != nil {
			return nil, err
		}
		if !exists {
			opts := netlink.IpsetCreateOptions{Family: familyNum(f), Comments: true}
			if err := w.do(KindIPSet, "create "+name, func() error { return d.node.NL.IpsetCreate(name, "hash:ip", opts) }); err != nil {
				return nil, err
			}
		}
		if have == nil {
			have = map[netip.Addr]string{}
		}
		out[f] = have
	}
	return out, nil
}

// addMembers adds (or re-labels) the members of want the set lacks, given
// that it holds have (updated in place as writes succeed).
func (d *Dataplane) addMembers(name string, want, have map[netip.Addr]string, w *writer) error {
	var todo []netip.Addr
	for a, uid := range want {
		if cur, ok := have[a]; !ok || cur != uid {
			todo = append(todo, a)
		}
	}
	slices.SortFunc(todo, netip.Addr.Compare)
	for _, a := range todo {
		uid := want[a]
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice()), Comment: uid, Replace: true}
		if err := w.do(KindIPSet, fmt.Sprintf("add %s %s (%s)", name, a, uid), func() error { return d.node.NL.IpsetAdd(name, e) }); err != nil {
			return err
		}
		have[a] = uid
	}
	return nil
}

// delMembers deletes the members of have that want lacks.
func (d *Dataplane) delMembers(name string, want, have map[netip.Addr]string, w *writer) error {
	var todo []netip.Addr
	for a := range have {
		if _, ok := want[a]; !ok {
			todo = append(todo, a)
		}
	}
	slices.SortFunc(todo, netip.Addr.Compare)
	for _, a := range todo {
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice())}
		if err := w.do(KindIPSet, fmt.Sprintf("del %s %s", name, a), func() error { return ignoreNotExist(d.node.NL.IpsetDel(name, e)) }); err != nil {
			return err
		}
		delete(have, a)
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
