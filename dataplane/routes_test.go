package dataplane

import (
	"net/netip"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kerneltest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestRouteManagerResolvesDevices: routes name their device; the manager
// resolves the name when it writes, keeps a route whose device does not
// exist yet pending, and writes a route again when its device is
// re-created (the kernel took the old one with the old device).
func TestRouteManagerResolvesDevices(t *testing.T) {
	nl := kerneltest.NewFakeNetlink()
	nl.AddVeth("tun-a", 1500, 0)
	m := newRouteManager(nl, 97)
	links, err := nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	if err := m.readBackWith(links); err != nil {
		t.Fatal(err)
	}
	via := func(dst, dev string) route {
		return route{Route: netlink.Route{Table: 100, Dst: ipNet(netip.MustParsePrefix(dst)), Scope: netlink.SCOPE_LINK,
			Type: unix.RTN_UNICAST, Protocol: 97}, Dev: dev}
	}
	a, b := via("10.0.0.1/32", "tun-a"), via("10.0.0.2/32", "tun-b")
	m.replaceDesired([]route{a, b})
	kernelIndex := func(r route) int {
		t.Helper()
		have, err := ourRoutesByKey(nl, 97)
		if err != nil {
			t.Fatal(err)
		}
		return have[routeKey(r.Route)].LinkIndex
	}
	linkNamed := func(name string) netlink.Link {
		t.Helper()
		l, err := nl.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	if err := m.applyUpdatesWhere(nil, newWriter(false)); err != nil {
		t.Fatal(err)
	}
	if got, want := kernelIndex(a), linkNamed("tun-a").Attrs().Index; got != want {
		t.Fatalf("route via tun-a on #%d, want #%d", got, want)
	}
	if got := m.t.PendingUpdates(); len(got) != 1 || got[0] != routeKey(b.Route) {
		t.Fatalf("pending %v, want the route via tun-b (no such device yet)", got)
	}
	// A dry run lists it.
	dry := newWriter(true)
	if err := m.clone().applyUpdatesWhere(nil, dry); err != nil || len(dry.res.Changes) != 1 {
		t.Fatalf("dry run: %v %v", dry.res.Changes, err)
	}

	nl.AddVeth("tun-b", 1500, 0)
	m.linkIs("tun-b", linkNamed("tun-b"))
	if err := m.applyUpdatesWhere(nil, newWriter(false)); err != nil {
		t.Fatal(err)
	}
	if got, want := kernelIndex(b), linkNamed("tun-b").Attrs().Index; got != want {
		t.Fatalf("route via tun-b on #%d, want #%d", got, want)
	}

	// tun-a re-created: its route went with the old device.
	if err := nl.LinkDel(linkNamed("tun-a")); err != nil {
		t.Fatal(err)
	}
	nl.AddVeth("tun-a", 1500, 0)
	m.linkIs("tun-a", linkNamed("tun-a"))
	if got := m.t.PendingUpdates(); len(got) != 1 || got[0] != routeKey(a.Route) {
		t.Fatalf("pending %v after tun-a was re-created, want its route", got)
	}
	if err := m.applyUpdatesWhere(nil, newWriter(false)); err != nil {
		t.Fatal(err)
	}
	if got, want := kernelIndex(a), linkNamed("tun-a").Attrs().Index; got != want {
		t.Fatalf("route via re-created tun-a on #%d, want #%d", got, want)
	}
	if got := m.t.PendingUpdates(); len(got) != 0 {
		t.Fatalf("still pending: %v", got)
	}
}
