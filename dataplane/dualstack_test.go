package dataplane

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// dualStack makes the fake node and ztunnel carry IPv6 too.
func dualStack(f *fakeNode) {
	f.sys.Values["net.ipv6.conf.all.forwarding"] = "1"
	f.ztSys.Values["net.ipv6.conf.all.forwarding"] = "1"
	f.zt.IPs = append(f.zt.IPs, netip.MustParseAddr("fd00:10:244:1::2"))
	f.nl.Src6 = netip.MustParseAddr("fd00:10:244:1::1") // HOSTIP towards the ztunnel's IPv6 address
}

func dualStackPods(n int) []Pod {
	ps := pods(n)
	for i := range ps {
		ps[i].IPs = append(ps[i].IPs, netip.MustParseAddr(fmt.Sprintf("fd00:10:244:1::%x", 0x10+i)))
	}
	return ps
}

// TestDualStackProgramsBothFamilies: every IPv4 object has its IPv6 twin
// (rules, routes, tunnel addresses and neighbours, ip6tables chains, the
// ztunnel netns), and a second apply writes nothing.
func TestDualStackProgramsBothFamilies(t *testing.T) {
	f := newFakeNode(t)
	dualStack(f)
	d := f.dataplane(t, nil)
	st := State{Ztunnel: f.zt, Pods: dualStackPods(2)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	dump := f.nl.Dump()
	for _, want := range []string{
		"rule inet6 0: fwmark 0x0/0x140 lookup 255 proto 97",
		"rule inet6 101: fwmark 0x100/0x100 lookup 101 proto 97",
		"rule inet6 103: lookup 100 proto 97",
		"route inet6 table 100 fd00:10:244:1::10/128 via fd00:a17:126::2 dev#3 src fd00:10:244:1::1 ",
		"route inet6 table 101 ::/0 via fd00:a17:127::2",
		"route inet6 table 102 ::/0 via fd00:10:244:1::2",
		"route inet6 table 101 fd00:10:244:1::2/128",
		"addr fd00:a17:126::1/126 dev istioin",
		"neigh fd00:a17:126::2 lladdr 02:a1:c0:a8:7e:02",
		"ipset ztunnel-pods-ips-v6 hash:ip family 10: fd00:10:244:1::10 uid-0, fd00:10:244:1::11 uid-1",
	} {
		if !strings.Contains(dump, want) {
			t.Errorf("node lacks %q", want)
		}
	}
	if strings.Contains(dump, "rule inet6 0: lookup 255 proto 2") {
		t.Error("the kernel's IPv6 local rule must be replaced by ours")
	}
	ip6, _ := f.ipt6.Save(context.Background(), "mangle")
	for _, want := range []string{
		"--match-set ztunnel-pods-ips-v6 src -j MARK --set-xmark 0x100/0x100",
		"! -s fd00:10:244:1::2/128 -i vethzt -j MARK --set-xmark 0x210/0x1210",
	} {
		if !strings.Contains(ip6, want) {
			t.Errorf("ip6tables mangle lacks %q:\n%s", want, ip6)
		}
	}
	zt6, _ := f.ztIPT6.Save(context.Background(), "mangle")
	if !strings.Contains(zt6, "--on-ip ::1") || !strings.Contains(zt6, "! -d fd00:10:244:1::2/128") {
		t.Errorf("ztunnel ip6tables:\n%s", zt6)
	}
	if zd := f.ztNL.Dump(); !strings.Contains(zd, "rule inet6 20000: fwmark 0x400/0xfff lookup 100 proto 97") ||
		!strings.Contains(zd, "route inet6 table 100 ::/0 local") || !strings.Contains(zd, "addr fd00:a17:126::2/126 dev pistioin") {
		t.Errorf("ztunnel netns:\n%s", zd)
	}
	if f.sys.Values["net.ipv6.conf.istioin.accept_dad"] != "0" || f.ztSys.Values["net.ipv6.conf.pistioout.accept_dad"] != "0" {
		t.Error("accept_dad must be off on the tunnels")
	}
	before := f.writes()
	d.QueueResync()
	res, err := d.Apply(context.Background(), st)
	if err != nil || f.writes() != before {
		t.Fatalf("second apply wrote %d (%v):\n%s", f.writes()-before, err, strings.Join(res.Changes, "\n"))
	}
	// IPv6 forwarding off with IPv6 pods is refused, not silently leaky.
	f.sys.Values["net.ipv6.conf.all.forwarding"] = "0"
	d.QueueResync()
	if _, err := d.Apply(context.Background(), st); err == nil || !strings.Contains(err.Error(), "net.ipv6.conf.all.forwarding") {
		t.Fatalf("want a forwarding error, got %v", err)
	}
}

// TestIPv6OnlyZtunnelFailsIPv4Closed: a ztunnel without an IPv4 address is
// no ztunnel for IPv4, whose fail mode applies; IPv6 is captured.
func TestIPv6OnlyZtunnelFailsIPv4Closed(t *testing.T) {
	f := newFakeNode(t)
	dualStack(f)
	f.zt.IPs = f.zt.IPs[1:]
	f.nl.Src = netip.Addr{} // no IPv4 route towards the ztunnel: Src6 answers for IPv6
	d := f.dataplane(t, nil)
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: dualStackPods(1)}); err != nil {
		t.Fatal(err)
	}
	filter4, _ := f.ipt.Save(context.Background(), "filter")
	filter6, _ := f.ipt6.Save(context.Background(), "filter")
	if !strings.Contains(filter4, "REJECT") || strings.Contains(filter6, "REJECT") {
		t.Fatalf("want IPv4 failing closed and IPv6 captured:\n%s\n%s", filter4, filter6)
	}
	if dump := f.nl.Dump(); strings.Contains(dump, "route inet table 100 10.244.1.10/32") || !strings.Contains(dump, "route inet6 table 100 fd00:10:244:1::10/128") {
		t.Fatalf("per-pod routes:\n%s", dump)
	}
}
