package dataplane

// What is programmed: the dataplane is the one owner of applied state, and
// the controller asks it instead of keeping its own record.

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
)

// Applied returns the state the kernel holds as of the last successful
// apply and the pod changes since, pods sorted by UID; ok is false when
// that is unknown (nothing applied yet, or the last write failed: the next
// apply reads back).
func (d *Dataplane) Applied() (st State, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fast == nil {
		return State{}, false
	}
	st = State{Ztunnel: cloneZtunnel(d.wanted.Ztunnel), ServiceCIDRs: slices.Clone(d.wanted.ServiceCIDRs)}
	for _, z := range d.wanted.Draining {
		st.Draining = append(st.Draining, cloneZtunnel(z))
	}
	for _, p := range d.pods {
		st.Pods = append(st.Pods, p)
	}
	slices.SortFunc(st.Pods, func(a, b Pod) int { return strings.Compare(a.UID, b.UID) })
	for _, m := range d.mgr.sidecars {
		st.Sidecars = append(st.Sidecars, m.pod)
	}
	slices.SortFunc(st.Sidecars, func(a, b Sidecar) int { return strings.Compare(a.UID, b.UID) })
	return st, true
}

// Programmed returns the addresses of pod uid that are captured: members
// of their family's set labelled with uid, with their inbound route in
// place when one is wanted. None: the pod is not programmed.
func (d *Dataplane) Programmed(uid string) []netip.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pods[uid]
	if !ok {
		return nil
	}
	var out []netip.Addr
	for _, a := range p.IPs {
		a = a.Unmap()
		if holder, ok := d.mgr.sets[FamilyOf(a)].t.Actual(a); !ok || holder != uid {
			continue
		}
		if d.mgr.routes.t.IsPending(d.podRouteKey(a)) {
			continue
		}
		out = append(out, a)
	}
	return out
}

// Equal reports two states with the same ztunnels and pods, in any pod
// order.
func (s State) Equal(o State) bool {
	if !sameZtunnel(s.Ztunnel, o.Ztunnel) || !slices.EqualFunc(s.Draining, o.Draining, sameZtunnel) || len(s.Pods) != len(o.Pods) ||
		!slices.Equal(s.ServiceCIDRs, o.ServiceCIDRs) {
		return false
	}
	byUID := func(a, b Pod) int { return cmp.Compare(a.UID, b.UID) }
	a, b := slices.SortedFunc(slices.Values(s.Pods), byUID), slices.SortedFunc(slices.Values(o.Pods), byUID)
	if !slices.EqualFunc(a, b, func(x, y Pod) bool { return x.UID == y.UID && x.Name == y.Name && slices.Equal(x.IPs, y.IPs) }) {
		return false
	}
	scUID := func(a, b Sidecar) int { return cmp.Compare(a.UID, b.UID) }
	sa, sb := slices.SortedFunc(slices.Values(s.Sidecars), scUID), slices.SortedFunc(slices.Values(o.Sidecars), scUID)
	return slices.EqualFunc(sa, sb, func(x, y Sidecar) bool { return x.Name == y.Name && sameSidecar(x, y) })
}
