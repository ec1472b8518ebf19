package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kerneltest"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// fakeNode is a node and one ztunnel netns made of fakes.
type fakeNode struct {
	nl, ztNL   *kerneltest.FakeNetlink
	sys, ztSys *kerneltest.FakeSysctl
	ipt, ztIPT *iptables.Fake
	// ipt6 and ztIPT6 are ip6tables.
	ipt6, ztIPT6 *iptables.Fake
	ztPaths      map[string]*kernel.Kernel
	zt           *Ztunnel
}

func newFakeNode(t *testing.T) *fakeNode {
	t.Helper()
	f := &fakeNode{nl: kerneltest.NewFakeNetlink(), ztNL: kerneltest.NewFakeNetlink(), sys: kerneltest.NewFakeSysctl(), ztSys: kerneltest.NewFakeSysctl(), ipt: iptables.NewFake(), ztIPT: iptables.NewFake(), ipt6: iptables.NewFake(), ztIPT6: iptables.NewFake()}
	f.nl.Src = netip.MustParseAddr("10.244.1.1")
	ztEth := f.ztNL.AddVeth("eth0", 1500, 0)
	f.nl.AddVeth("vethzt", 1500, ztEth)
	f.ztPaths = map[string]*kernel.Kernel{"/run/netns/zt": kerneltest.NewFakeKernel(f.ztNL, f.ztSys, f.ztIPT, f.ztIPT6)}
	f.zt = &Ztunnel{Pod: "istio-system/ztunnel-a", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.2")}, HostVeth: "vethzt", NetNS: "/run/netns/zt"}
	return f
}

func (f *fakeNode) open(path string) (*kernel.Kernel, error) {
	if k, ok := f.ztPaths[path]; ok {
		return k, nil
	}
	return nil, fmt.Errorf("no netns %s", path)
}

func (f *fakeNode) dataplane(t *testing.T, mutate func(*Config)) *Dataplane {
	t.Helper()
	return f.dataplaneOver(t, nil, mutate)
}

// dataplaneOver is dataplane with the node's netlink seen through nl (a
// wrapper of f.nl that records or holds calls); nil is f.nl itself.
func (f *fakeNode) dataplaneOver(t *testing.T, nl kernel.Netlink, mutate func(*Config)) *Dataplane {
	t.Helper()
	cfg := DefaultConfig()
	cfg.IPTablesMode = IPTablesNFT
	cfg.NetNSDir = t.TempDir()
	if mutate != nil {
		mutate(&cfg)
	}
	node := kerneltest.NewFakeKernel(f.nl, f.sys, f.ipt, f.ipt6)
	if nl != nil {
		node.NL = nl
	}
	d, err := New(context.Background(), cfg, Options{Node: node, OpenNS: f.open})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// addZtunnel gives the node a second ztunnel pod: its netns at path
// (replacing what the path held), its veth vethzt-b, and ip; it returns
// the ztunnel and its netns's iptables.
func (f *fakeNode) addZtunnel(path string, ip netip.Addr) (*Ztunnel, *iptables.Fake) {
	ztNL := kerneltest.NewFakeNetlink()
	eth := ztNL.AddVeth("eth0", 1500, 0)
	f.nl.AddVeth("vethzt-b", 1500, eth)
	ipt := iptables.NewFake()
	f.ztPaths[path] = kerneltest.NewFakeKernel(ztNL, kerneltest.NewFakeSysctl(), ipt, iptables.NewFake())
	return &Ztunnel{Pod: "istio-system/ztunnel-b", IPs: []netip.Addr{ip}, HostVeth: "vethzt-b", NetNS: path}, ipt
}

func pods(n int) []Pod {
	var out []Pod
	for i := range n {
		out = append(out, Pod{UID: fmt.Sprintf("uid-%d", i), Name: fmt.Sprintf("default/p%d", i), IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 1, byte(10 + i)})}})
	}
	return out
}

func (f *fakeNode) writes() int {
	return f.nl.TotalWrites() + f.ztNL.TotalWrites() + len(f.ipt.Restores) + len(f.ztIPT.Restores) + len(f.ipt6.Restores) + len(f.ztIPT6.Restores) + f.sys.Writes + f.ztSys.Writes
}

const wantNodeDump = `link lo #1 mtu 65536 up=true
link vethzt #2 mtu 1500 up=true
link istioin #3 mtu 1450 up=true vxlan vni 1000 port 4789 remote <nil> learning=false mac 02:a1:c0:a8:7e:01
addr 192.168.126.1/30 dev istioin
link istioout #4 mtu 1450 up=true vxlan vni 1001 port 4789 remote <nil> learning=false mac 02:a1:c0:a8:7f:01
addr 192.168.127.1/30 dev istioout
neigh 192.168.126.2 lladdr 02:a1:c0:a8:7e:02 dev#3
fdb 10.244.1.2 lladdr 02:a1:c0:a8:7e:02 dev#3
neigh 192.168.127.2 lladdr 02:a1:c0:a8:7f:02 dev#4
fdb 10.244.1.2 lladdr 02:a1:c0:a8:7f:02 dev#4
rule inet 0: fwmark 0x0/0x140 lookup 255 proto 97
rule inet 100: fwmark 0x200/0x200 goto 32766 proto 97
rule inet 101: fwmark 0x100/0x100 lookup 101 proto 97
rule inet 102: fwmark 0x40/0x40 lookup 102 proto 97
rule inet 103: lookup 100 proto 97
rule inet 32766: lookup 254 proto 2
rule inet 32767: lookup 253 proto 2
rule inet 99: fwmark 0x1040/0x1040 lookup 103 proto 97
rule inet6 0: lookup 255 proto 2
rule inet6 32766: lookup 254 proto 2
route inet table 100 10.244.1.10/32 via 192.168.126.2 dev#3 src 10.244.1.1 proto 97
route inet table 100 10.244.1.11/32 via 192.168.126.2 dev#3 src 10.244.1.1 proto 97
route inet table 100 10.244.1.2/32 dev#2 scope link proto 97
route inet table 101 0.0.0.0/0 via 192.168.127.2 dev#4 proto 97
route inet table 101 10.244.1.2/32 dev#2 scope link proto 97
route inet table 102 0.0.0.0/0 via 10.244.1.2 dev#2 onlink proto 97
route inet table 102 10.244.1.2/32 dev#2 scope link proto 97
route inet table 103 10.244.1.2/32 dev#2 scope link proto 97
ipset ztunnel-pods-ips hash:ip family 2: 10.244.1.10 uid-0, 10.244.1.11 uid-1
ipset ztunnel-pods-ips-v6 hash:ip family 10: 
`

const wantZtunnelDump = `link lo #1 mtu 65536 up=true
link eth0 #2 mtu 1500 up=true
link pistioin #3 mtu 1450 up=true vxlan vni 1000 port 4789 remote <nil> learning=false mac 02:a1:c0:a8:7e:02
addr 192.168.126.2/30 dev pistioin
link pistioout #4 mtu 1450 up=true vxlan vni 1001 port 4789 remote <nil> learning=false mac 02:a1:c0:a8:7f:02
addr 192.168.127.2/30 dev pistioout
neigh 192.168.126.1 lladdr 02:a1:c0:a8:7e:01 dev#3
fdb 10.244.1.1 lladdr 02:a1:c0:a8:7e:01 dev#3
neigh 192.168.127.1 lladdr 02:a1:c0:a8:7f:01 dev#4
fdb 10.244.1.1 lladdr 02:a1:c0:a8:7f:01 dev#4
rule inet 0: lookup 255 proto 2
rule inet 20000: fwmark 0x400/0xfff lookup 100 proto 97
rule inet 20003: fwmark 0x4d3/0xfff lookup 100 proto 97
rule inet 32766: lookup 254 proto 2
rule inet 32767: lookup 253 proto 2
rule inet6 0: lookup 255 proto 2
rule inet6 32766: lookup 254 proto 2
route inet table 100 0.0.0.0/0 local dev#1 scope host proto 97
`

func TestApplyProgramsNodeAndZtunnel(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	res, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(2)})
	if err != nil {
		t.Fatal(err)
	}
	if got := f.nl.Dump(); got != wantNodeDump {
		t.Fatalf("node state:\n%s", diffLines(wantNodeDump, got))
	}
	if got := f.ztNL.Dump(); got != wantZtunnelDump {
		t.Fatalf("ztunnel state:\n%s", diffLines(wantZtunnelDump, got))
	}
	for _, k := range []string{"net.ipv4.conf.istioin.rp_filter", "net.ipv4.conf.vethzt.rp_filter", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"} {
		if f.sys.Values[k] != "0" {
			t.Errorf("node sysctl %s = %q, want 0", k, f.sys.Values[k])
		}
	}
	for _, k := range []string{"net.ipv4.conf.istioin.accept_local", "net.ipv4.conf.istioout.accept_local", "net.ipv4.conf.vethzt.accept_local"} {
		if f.sys.Values[k] != "1" {
			t.Errorf("node sysctl %s = %q, want 1", k, f.sys.Values[k])
		}
	}
	if f.ztSys.Values["net.ipv4.conf.eth0.rp_filter"] != "0" || f.ztSys.Values["net.ipv4.conf.pistioout.accept_local"] != "1" {
		t.Errorf("ztunnel sysctls: %v", f.ztSys.Values)
	}
	wantZtIPT := ZtunnelRuleset(d.cfg, ZtunnelParams{ZtunnelIP: netip.MustParseAddr("10.244.1.2"), Eth: "eth0"})
	if got, _ := f.ztIPT.Save(context.Background(), "mangle"); !strings.Contains(got, wantZtIPT[0].Rules[1]) {
		t.Errorf("ztunnel TPROXY rules missing:\n%s", got)
	}
	// One restore for every table of the node (mangle, nat, filter), one in
	// the ztunnel netns, and one more on the node: the capture mark is added
	// only once the tunnels and routes it leads to exist (make before break).
	if res.Writes[KindIPTables] != 3 {
		t.Errorf("iptables restores: %d, want 3 (writes %v)", res.Writes[KindIPTables], res.Writes)
	}
}

func TestSecondApplyWritesNothing(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	st := State{Ztunnel: f.zt, Pods: pods(3)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	before := f.writes()
	d.QueueResync()
	res, err := d.Apply(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if res.TotalWrites() != 0 || f.writes() != before {
		t.Fatalf("second apply wrote %v: %v", res.Writes, res.Changes)
	}
	// A new dataplane over the same kernel adopts it without writing.
	d2 := f.dataplane(t, nil)
	if res, err := d2.Apply(context.Background(), st); err != nil || res.TotalWrites() != 0 {
		t.Fatalf("adoption wrote %v (%v): %v", res.Writes, err, res.Changes)
	}
}

func TestPodChurnTouchesOnlyMembersAndRoutes(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	st := State{Ztunnel: f.zt, Pods: pods(5)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	st.Pods = append(st.Pods[:2], st.Pods[3:]...) // one pod gone
	st.Pods = append(st.Pods, Pod{UID: "new", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.99")}})
	before := len(f.ipt.Restores)
	res, err := d.Apply(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{KindIPSet: 2, KindRoute: 2}
	for k, v := range res.Writes {
		if v != want[k] {
			t.Fatalf("writes %v, want %v: %v", res.Writes, want, res.Changes)
		}
	}
	if len(f.ipt.Restores) != before {
		t.Fatal("pod churn ran iptables-restore")
	}
}

func TestUIDChangeUpdatesComment(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	st := State{Ztunnel: f.zt, Pods: pods(1)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	st.Pods[0].UID = "reused-ip-new-pod"
	res, err := d.Apply(context.Background(), st)
	if err != nil || res.Writes[KindIPSet] != 1 {
		t.Fatalf("want one ipset write, got %v %v", res.Writes, err)
	}
	if !strings.Contains(f.nl.Dump(), "10.244.1.10 reused-ip-new-pod") {
		t.Fatal(f.nl.Dump())
	}
}

func TestFailedWriteIsAnErrorAndLaterConverges(t *testing.T) {
	injected := errors.New("injected")
	for _, method := range []string{"IpsetCreate", "IpsetAdd", "LinkAdd", "AddrReplace", "NeighSet", "RouteReplace", "RuleAdd", "RuleDel", "RouteListFiltered", "RuleList", "IpsetList"} {
		t.Run(method, func(t *testing.T) {
			f := newFakeNode(t)
			d := f.dataplane(t, nil)
			f.nl.FailNext(method, injected)
			st := State{Ztunnel: f.zt, Pods: pods(2)}
			if _, err := d.Apply(context.Background(), st); !errors.Is(err, injected) {
				t.Fatalf("apply with a failing %s: err = %v, want the injected error", method, err)
			}
			if diff, err := d.Diff(context.Background(), st); err != nil || len(diff) == 0 {
				t.Fatalf("after a failed apply the diff must not be empty: %v %v", diff, err)
			}
			if _, err := d.Apply(context.Background(), st); err != nil {
				t.Fatalf("retry: %v", err)
			}
			if diff, err := d.Diff(context.Background(), st); err != nil || len(diff) != 0 {
				t.Fatalf("not converged after retry: %v %v", diff, err)
			}
		})
	}
	t.Run("iptables-restore", func(t *testing.T) {
		f := newFakeNode(t)
		d := f.dataplane(t, nil)
		f.ipt.FailNextRestore(injected)
		st := State{Ztunnel: f.zt, Pods: pods(1)}
		if _, err := d.Apply(context.Background(), st); !errors.Is(err, injected) {
			t.Fatalf("err = %v", err)
		}
		if _, err := d.Apply(context.Background(), st); err != nil {
			t.Fatal(err)
		}
		if diff, _ := d.Diff(context.Background(), st); len(diff) != 0 {
			t.Fatalf("not converged: %v", diff)
		}
	})
}

func TestIPTablesDriftRepairedOnResync(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	st := State{Ztunnel: f.zt, Pods: pods(1)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	f.ipt.Delete("mangle", "PREROUTING", 1)
	f.ipt.Append("mangle", "PREROUTING", "-j ACCEPT")
	if diff, _ := d.Diff(context.Background(), st); len(diff) == 0 {
		t.Fatal("diff does not see the missing jump")
	}
	d.QueueResync()
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	got, _ := f.ipt.Save(context.Background(), "mangle")
	if !strings.Contains(got, "-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING\n-A PREROUTING -j ACCEPT\n") {
		t.Fatalf("jump not back at position 1 before the foreign rule:\n%s", got)
	}
}

func TestRulePriorityConflictRefused(t *testing.T) {
	f := newFakeNode(t)
	other := newRule(IPv4, 101, 50, 0, 0, 3)
	if err := f.nl.RuleAdd(&other); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.IPTablesMode = IPTablesNFT
	before := f.nl.TotalWrites()
	_, err := New(context.Background(), cfg, Options{Node: kerneltest.NewFakeKernel(f.nl, f.sys, f.ipt, f.ipt6), OpenNS: f.open})
	if err == nil || !strings.Contains(err.Error(), "priority 101") {
		t.Fatalf("err = %v", err)
	}
	if f.nl.TotalWrites() != before {
		t.Fatal("refusal wrote")
	}
}

func TestForeignIPSetIsNotReplaced(t *testing.T) {
	f := newFakeNode(t)
	if err := f.nl.IpsetCreate("ztunnel-pods-ips", "hash:net", netlink.IpsetCreateOptions{Family: unix.AF_INET}); err != nil {
		t.Fatal(err)
	}
	d := f.dataplane(t, nil)
	before := f.nl.TotalWrites()
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(1)}); err == nil || !strings.Contains(err.Error(), "hash:net") {
		t.Fatalf("err = %v", err)
	}
	if f.nl.TotalWrites() != before {
		t.Fatal("wrote despite a foreign set")
	}
	if _, err := d.Cleanup(context.Background()); err == nil {
		t.Fatal("cleanup must report the foreign set it left alone")
	}
	if !strings.Contains(f.nl.Dump(), "ipset ztunnel-pods-ips hash:net") {
		t.Fatal("cleanup destroyed a foreign set")
	}
}

func TestGeneveAutoAndInPlaceSwitch(t *testing.T) {
	f := newFakeNode(t)
	f.nl.GeneveSupported, f.ztNL.GeneveSupported = true, true
	d := f.dataplane(t, nil)
	if typ, why, _ := d.Tunnel(); typ != TunnelGeneve {
		t.Fatalf("auto picked %s (%s), want geneve", typ, why)
	}
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(f.nl.Dump(), "istioin #4 mtu 1450 up=true geneve vni 1000 port 6081 remote 10.244.1.2") {
		t.Fatalf("geneve istioin: \n%s", f.nl.Dump())
	}
	// New ztunnel: same veth for simplicity, new IP and netns.
	zt2NL := kerneltest.NewFakeNetlink()
	zt2NL.GeneveSupported = true
	eth := zt2NL.AddVeth("eth0", 1500, 0)
	f.nl.AddVeth("vethzt2", 1500, eth)
	f.ztPaths["/run/netns/zt2"] = kerneltest.NewFakeKernel(zt2NL, kerneltest.NewFakeSysctl(), iptables.NewFake(), iptables.NewFake())
	zt2 := &Ztunnel{Pod: "istio-system/ztunnel-b", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.3")}, HostVeth: "vethzt2", NetNS: "/run/netns/zt2"}
	linkAdds, linkDels := f.nl.Writes["LinkAdd"], f.nl.Writes["LinkDel"]
	if _, err := d.Apply(context.Background(), State{Ztunnel: zt2, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if f.nl.Writes["LinkAdd"] != linkAdds || f.nl.Writes["LinkDel"] != linkDels || f.nl.Writes["LinkModify"] != 2 {
		t.Fatalf("switch must modify the remote in place: %v", f.nl.Writes)
	}
	if !strings.Contains(f.nl.Dump(), "geneve vni 1000 port 6081 remote 10.244.1.3") {
		t.Fatal(f.nl.Dump())
	}
	if strings.Contains(f.ztNL.Dump(), "pistioin") || strings.Contains(f.ztNL.Dump(), "proto 97") {
		t.Fatalf("old ztunnel netns not cleaned:\n%s", f.ztNL.Dump())
	}
}

func TestGeneveForcedWithoutKernelSupport(t *testing.T) {
	f := newFakeNode(t)
	cfg := DefaultConfig()
	cfg.IPTablesMode, cfg.Tunnel = IPTablesNFT, TunnelGeneve
	_, err := New(context.Background(), cfg, Options{Node: kerneltest.NewFakeKernel(f.nl, f.sys, f.ipt, f.ipt6), OpenNS: f.open})
	if err == nil || !strings.Contains(err.Error(), "geneve") {
		t.Fatalf("err = %v", err)
	}
}

func TestTunnelPortSkipsForeignDevice(t *testing.T) {
	f := newFakeNode(t)
	if err := f.nl.LinkAdd(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "vxlan.calico"}, VxlanId: 4096, Port: 4789}); err != nil {
		t.Fatal(err)
	}
	d := f.dataplane(t, nil)
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt}); err != nil {
		t.Fatal(err)
	}
	if _, _, port := d.Tunnel(); port != 4790 {
		t.Fatalf("port %d, want 4790", port)
	}
	if !strings.Contains(f.ztNL.Dump(), "pistioin #3 mtu 1450 up=true vxlan vni 1000 port 4790") {
		t.Fatalf("ztunnel side must use the same port:\n%s", f.ztNL.Dump())
	}
	mangle, _ := f.ipt.Save(context.Background(), "mangle")
	if !strings.Contains(mangle, "--dport 4790 -j RETURN") {
		t.Fatal(mangle)
	}
}

func TestNoZtunnelFailModes(t *testing.T) {
	for _, mode := range []FailMode{FailClosed, FailOpen} {
		t.Run(string(mode), func(t *testing.T) {
			f := newFakeNode(t)
			d := f.dataplane(t, func(c *Config) { c.FailMode = mode })
			if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(2)}); err != nil {
				t.Fatal(err)
			}
			if _, err := d.Apply(context.Background(), State{Pods: pods(2)}); err != nil {
				t.Fatal(err)
			}
			dump := f.nl.Dump()
			if strings.Contains(dump, "route ") {
				t.Fatalf("routes left with no ztunnel:\n%s", dump)
			}
			if !strings.Contains(dump, "10.244.1.10 uid-0, 10.244.1.11 uid-1") {
				t.Fatal("ipset members must survive a ztunnel gap")
			}
			filter, _ := f.ipt.Save(context.Background(), "filter")
			mangle, _ := f.ipt.Save(context.Background(), "mangle")
			rejects := strings.Contains(filter, "REJECT")
			captures := strings.Contains(mangle, "--set-xmark 0x100/0x100")
			if (mode == FailClosed) != rejects || (mode == FailClosed) != captures {
				t.Fatalf("%s: rejects=%v captures=%v\n%s%s", mode, rejects, captures, filter, mangle)
			}
		})
	}
}

func TestCleanupRemovesEverythingOwned(t *testing.T) {
	f := newFakeNode(t)
	nodeBefore, ztBefore := f.nl.Dump(), f.ztNL.Dump()
	mangleBefore, _ := f.ipt.Save(context.Background(), "")
	// Someone else's route and rule survive cleanup.
	foreign := netlink.Route{Table: 100, Dst: &net.IPNet{IP: net.IPv4(10, 9, 9, 9), Mask: net.CIDRMask(32, 32)}, LinkIndex: 2, Protocol: 4}
	d := f.dataplane(t, nil)
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(3)}); err != nil {
		t.Fatal(err)
	}
	if err := f.nl.RouteReplace(&foreign); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := f.nl.RouteDel(&foreign); err != nil {
		t.Fatalf("foreign route gone: %v", err)
	}
	if got := f.nl.Dump(); got != nodeBefore {
		t.Fatalf("node residue:\n%s", diffLines(nodeBefore, got))
	}
	if got := f.ztNL.Dump(); got != ztBefore {
		t.Fatalf("ztunnel residue:\n%s", diffLines(ztBefore, got))
	}
	if got, _ := f.ipt.Save(context.Background(), ""); got != mangleBefore {
		t.Fatalf("iptables residue:\n%s", diffLines(mangleBefore, got))
	}
}

func TestStateValidation(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	bad := []State{
		{Pods: []Pod{{UID: "", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}}},
		{Pods: []Pod{{UID: "a", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}, {UID: "b", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}}},
		{Pods: []Pod{{UID: "a", IPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}}},
		{Ztunnel: &Ztunnel{IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}},
	}
	for i, st := range bad {
		before := f.writes()
		if _, err := d.Apply(context.Background(), st); err == nil || !strings.Contains(err.Error(), "invalid desired state") {
			t.Errorf("case %d: err = %v", i, err)
		}
		if f.writes() != before {
			t.Errorf("case %d: invalid state wrote", i)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatal(err)
	}
	cases := map[string]func(*Config){
		"tunnel":      func(c *Config) { c.Tunnel = "gre" },
		"fail mode":   func(c *Config) { c.FailMode = "sometimes" },
		"iptables":    func(c *Config) { c.IPTablesMode = "ebpf" },
		"mark":        func(c *Config) { c.Marks.Outbound = 0x300 },
		"skip bit":    func(c *Config) { c.Marks.ConnSkip = 0x020 },
		"route table": func(c *Config) { c.Tables.Outbound = 254 },
		"tables":      func(c *Config) { c.Tables.Outbound = c.Tables.Inbound },
		"priority":    func(c *Config) { c.Priorities.Inbound = 40000 },
		"order":       func(c *Config) { c.Priorities.Inbound = 99 },
		"protocol":    func(c *Config) { c.RouteProtocol = 2 },
		"ipset name":  func(c *Config) { c.IPSetName = strings.Repeat("x", 40) },
		"tunnel net":  func(c *Config) { c.InNet = netip.MustParsePrefix("192.168.126.0/24") },
		"vni":         func(c *Config) { c.OutVNI = c.InVNI },
		"port":        func(c *Config) { c.TunnelPort = 70000 },
	}
	for name, mutate := range cases {
		c := DefaultConfig()
		mutate(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: invalid config accepted", name)
		}
	}
}

func TestPodChurnReadsNothingBetweenResyncs(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	st := State{Ztunnel: f.zt, Pods: pods(3)}
	if _, err := d.Apply(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	injected := errors.New("read while pod churn should not read")
	f.nl.FailNext("IpsetList", injected)
	f.nl.FailNext("RouteListFiltered", injected)
	f.nl.FailNext("RuleList", injected)
	f.nl.FailNext("LinkList", injected)
	st.Pods = pods(5)[1:] // one gone, two new
	res, err := d.Apply(context.Background(), st)
	if err != nil {
		t.Fatalf("pod churn read the kernel: %v", err)
	}
	if res.Writes[KindIPSet] != 3 || res.Writes[KindRoute] != 3 || res.TotalWrites() != 6 {
		t.Fatalf("writes %v: %v", res.Writes, res.Changes)
	}
	// The resync reads everything again (and meets the pending failures).
	d.QueueResync()
	if _, err := d.Apply(context.Background(), st); !errors.Is(err, injected) {
		t.Fatalf("resync did not read back: %v", err)
	}
	for range 4 {
		if _, err := d.Apply(context.Background(), st); err == nil {
			break
		}
	}
	if diff, err := d.Diff(context.Background(), st); err != nil || len(diff) != 0 {
		t.Fatalf("not converged: %v %v", diff, err)
	}
}

func TestNodeNeverLosesItsLocalRule(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(f.nl.Dump(), "rule inet 0: lookup 255 proto 2") {
		t.Fatal("the kernel's unconditional local rule must be replaced by ours")
	}
	// Turning node-local capture off restores the kernel's rule before ours goes.
	off := f.dataplane(t, func(c *Config) { c.CaptureNodeLocal = false })
	f.nl.FailNext("RuleDel", errors.New("injected"))
	if _, err := off.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(1)}); err == nil {
		t.Fatal("injected failure not reported")
	}
	dump := f.nl.Dump()
	if !strings.Contains(dump, "rule inet 0: lookup 255 proto 2") {
		t.Fatalf("no local rule after a failed delete:\n%s", dump)
	}
	if _, err := off.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if dump := f.nl.Dump(); !strings.Contains(dump, "rule inet 0: lookup 255 proto 2") || strings.Contains(dump, "rule inet 0: fwmark") {
		t.Fatalf("want exactly the kernel's local rule:\n%s", dump)
	}
}

func TestMappedUnspecifiedPodIPIsRejected(t *testing.T) {
	st := State{Pods: []Pod{{UID: "a", IPs: []netip.Addr{netip.MustParseAddr("::ffff:0.0.0.0")}}}}
	if err := st.Validate(); err == nil {
		t.Fatal("::ffff:0.0.0.0 accepted")
	}
}

func TestForeignDeviceNamedLikeOurTunnelIsNotReplaced(t *testing.T) {
	f := newFakeNode(t)
	f.nl.AddVeth(NodeOutLink, 1500, 0)
	d := f.dataplane(t, nil)
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt}); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("err = %v", err)
	}
	if l, err := f.nl.LinkByName(NodeOutLink); err != nil || l.Type() != "veth" {
		t.Fatalf("foreign %s replaced: %v %v", NodeOutLink, l, err)
	}
}

// TestUpdatePods: pod changes alone cost their own writes; a batch that
// claims an address twice is refused before anything changes; an address
// handed from a leaving pod to a new one in one batch is fine.
func TestUpdatePods(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	ctx := context.Background()
	base := pods(3)
	if _, err := d.Apply(ctx, State{Ztunnel: f.zt, Pods: base}); err != nil {
		t.Fatal(err)
	}
	newPod := Pod{UID: "new", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.99")}}
	res, err := d.UpdatePods(ctx, []Pod{newPod}, nil)
	if err != nil || res.Writes[KindIPSet] != 1 || res.Writes[KindRoute] != 1 || res.TotalWrites() != 2 {
		t.Fatalf("add one pod: %v %v", res.Writes, err)
	}
	thief := Pod{UID: "thief", IPs: []netip.Addr{base[0].IPs[0]}}
	before := f.writes()
	if _, err := d.UpdatePods(ctx, []Pod{thief}, nil); err == nil || !strings.Contains(err.Error(), "claimed by two pods") {
		t.Fatalf("a second claim of %s: %v", base[0].IPs[0], err)
	}
	if f.writes() != before || d.pods[base[0].UID].UID == "" || d.pods["thief"].UID != "" {
		t.Fatalf("a refused batch changed something: %d writes, pods %v", f.writes()-before, d.pods)
	}
	if uid, _ := d.mgr.sets[IPv4].t.Desired(base[0].IPs[0]); uid != base[0].UID {
		t.Fatalf("a refused batch moved %s to %q", base[0].IPs[0], uid)
	}
	// The next call is a full apply (the failure queued one): it must carry
	// every pod, the refused one excepted.
	if _, err := d.UpdatePods(ctx, []Pod{{UID: thief.UID, IPs: []netip.Addr{netip.MustParseAddr("10.244.1.98")}}}, []string{base[0].UID}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.UpdatePods(ctx, []Pod{{UID: "heir", IPs: base[1].IPs}}, []string{base[1].UID}); err != nil {
		t.Fatalf("an address handed over within one batch: %v", err)
	}
	want := map[string]bool{base[2].UID: true, "new": true, thief.UID: true, "heir": true}
	if len(d.pods) != len(want) {
		t.Fatalf("pods %v, want %v", d.pods, want)
	}
	for uid := range d.pods {
		if !want[uid] {
			t.Fatalf("pods %v, want %v", d.pods, want)
		}
	}
	if diff, err := d.Diff(ctx, State{Ztunnel: f.zt, Pods: slices.Collect(maps.Values(d.pods))}); err != nil || len(diff) != 0 {
		t.Fatalf("kernel differs from the pods after the updates: %v %v", diff, err)
	}
}

// ruleOrderNL records the priorities of the rules added.
type ruleOrderNL struct {
	*kerneltest.FakeNetlink
	added *[]int
}

func (n ruleOrderNL) RuleAdd(r *netlink.Rule) error {
	*n.added = append(*n.added, r.Priority)
	return n.FakeNetlink.RuleAdd(r)
}

// TestRulesAddedInPriorityOrder: rule 99 (slot 1's return) is in place
// before rule 102 (slot 0's), which would otherwise take its packets.
func TestRulesAddedInPriorityOrder(t *testing.T) {
	f := newFakeNode(t)
	var added []int
	d := f.dataplaneOver(t, ruleOrderNL{f.nl, &added}, nil)
	if _, err := d.Apply(context.Background(), State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if !slices.IsSorted(added) {
		t.Fatalf("rules added in order %v", added)
	}
}

// TestZtunnelNetnsSamePathNewNamespace: another ztunnel behind a reused
// netns path gets its chains although the path's were already written.
func TestZtunnelNetnsSamePathNewNamespace(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	ctx := context.Background()
	if _, err := d.Apply(ctx, State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	zt2, ztIPT := f.addZtunnel("/run/netns/zt", f.zt.IPs[0])
	if _, err := d.Apply(ctx, State{Ztunnel: zt2, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if got, _ := ztIPT.Save(ctx, "mangle"); !strings.Contains(got, "TPROXY") {
		t.Fatalf("no TPROXY rules in the new netns:\n%s", got)
	}
}

// TestLocalRuleKeyChange: when our local rule changes (new marks), the
// kernel's unconditional one is not put back next to ours.
func TestLocalRuleKeyChange(t *testing.T) {
	f := newFakeNode(t)
	ctx := context.Background()
	if _, err := f.dataplane(t, nil).Apply(ctx, State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	d2 := f.dataplane(t, func(c *Config) { c.Marks.Outbound = 0x2000 })
	if _, err := d2.Apply(ctx, State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if dump := f.nl.Dump(); strings.Contains(dump, "rule inet 0: lookup 255 proto 2") {
		t.Fatalf("the kernel's local rule is back next to ours:\n%s", dump)
	}
}

// TestUpdatePodsValidates: the incremental path refuses what Apply refuses
// (an unusable address, an empty UID) before writing anything.
func TestUpdatePodsValidates(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	ctx := context.Background()
	if _, err := d.Apply(ctx, State{Ztunnel: f.zt, Pods: pods(2)}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Pod{
		{UID: "lo", IPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}},
		{UID: "any", IPs: []netip.Addr{netip.MustParseAddr("::ffff:0.0.0.0")}},
		{UID: "mc", IPs: []netip.Addr{netip.MustParseAddr("ff02::1")}},
		{UID: "", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.77")}},
	} {
		before := f.writes()
		if _, err := d.UpdatePods(ctx, []Pod{bad}, nil); err == nil || !strings.Contains(err.Error(), "invalid desired state") {
			t.Errorf("UpdatePods(%v) = %v, want refused as Apply refuses it", bad, err)
		}
		if f.writes() != before {
			t.Errorf("UpdatePods(%v) wrote %d times before refusing", bad, f.writes()-before)
		}
		if err := (State{Pods: []Pod{bad}}).Validate(); err == nil {
			t.Errorf("Validate accepts %v", bad)
		}
	}
}

// blockingNL holds RuleList calls while block is set.
type blockingNL struct {
	*kerneltest.FakeNetlink
	block   *atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (n blockingNL) RuleList(family int) ([]netlink.Rule, error) {
	if n.block.Load() {
		select {
		case n.entered <- struct{}{}:
		default:
		}
		<-n.release
	}
	return n.FakeNetlink.RuleList(family)
}

// TestDiffDoesNotHoldUpPodEvents: a Diff (a /debug/state request) reading
// the kernel back does not hold the dataplane's lock, so a pod event is
// programmed meanwhile; the Diff still answers, and lists the new pod's
// state as present.
func TestDiffDoesNotHoldUpPodEvents(t *testing.T) {
	f := newFakeNode(t)
	var block atomic.Bool
	nl := blockingNL{f.nl, &block, make(chan struct{}, 1), make(chan struct{})}
	d := f.dataplaneOver(t, nl, nil)
	ctx := context.Background()
	base := pods(2)
	if _, err := d.Apply(ctx, State{Ztunnel: f.zt, Pods: base}); err != nil {
		t.Fatal(err)
	}
	block.Store(true)
	diffDone := make(chan error, 1)
	go func() {
		_, err := d.Diff(ctx, State{Ztunnel: f.zt, Pods: base})
		diffDone <- err
	}()
	<-nl.entered // the Diff is reading back
	updated := make(chan error, 1)
	go func() {
		_, err := d.UpdatePods(ctx, []Pod{{UID: "new", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.99")}}}, nil)
		updated <- err
	}()
	select {
	case err := <-updated:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		close(nl.release)
		t.Fatal("a pod event waited for a Diff's read-back")
	}
	block.Store(false)
	close(nl.release)
	if err := <-diffDone; err != nil {
		t.Fatal(err)
	}
}

// TestDiffListsTheRetiredZtunnelNetns: what Apply would remove from a
// ztunnel's netns once another replaces it is pending, and Diff says so.
func TestDiffListsTheRetiredZtunnelNetns(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	ctx := context.Background()
	if _, err := d.Apply(ctx, State{Ztunnel: f.zt, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	zt2, _ := f.addZtunnel("/run/netns/zt-b", netip.MustParseAddr("10.244.1.3"))
	diff, err := d.Diff(ctx, State{Ztunnel: zt2, Pods: pods(1)})
	if err != nil {
		t.Fatal(err)
	}
	before := f.writes()
	if _, err := d.Apply(ctx, State{Ztunnel: zt2, Pods: pods(1)}); err != nil {
		t.Fatal(err)
	}
	if f.writes() == before {
		t.Fatal("the switch wrote nothing")
	}
	// The old netns's TPROXY chains go: Diff listed their removal.
	if got, _ := f.ztIPT.Save(ctx, "mangle"); strings.Contains(got, "TPROXY") {
		t.Fatalf("the retired netns keeps its TPROXY rules:\n%s", got)
	}
	var retired int
	for _, c := range diff {
		// Only the retired netns has chains that are no longer wanted.
		if strings.HasPrefix(c, "iptables: mangle/ztunnel-PREROUTING chain not wanted") {
			retired++
		}
	}
	if retired != 2 { // IPv4 and IPv6
		t.Fatalf("Diff did not list the retired ztunnel netns's chains; it listed:\n%s", strings.Join(diff, "\n"))
	}
	if diff, err := d.Diff(ctx, State{Ztunnel: zt2, Pods: pods(1)}); err != nil || len(diff) != 0 {
		t.Fatalf("after the switch Diff = %v, %v; want nothing pending", diff, err)
	}
}

// TestNetlinkDriftReadsNoIPTables: netlink drift queues the read-back of
// the netlink managers only: the next apply repairs a deleted route of
// ours without reading the iptables chains (a process per table on a real
// node); the periodic resync reads them too.
func TestNetlinkDriftReadsNoIPTables(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	ctx := context.Background()
	st := State{Ztunnel: f.zt, Pods: pods(2)}
	if _, err := d.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	ours := &netlink.Route{Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol), Table: d.cfg.Tables.Inbound}
	routes, err := f.nl.RouteListFiltered(unix.AF_INET, ours, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil || len(routes) == 0 {
		t.Fatalf("no inbound routes of ours: %v %v", routes, err)
	}
	if err := f.nl.RouteDel(&routes[0]); err != nil {
		t.Fatal(err)
	}
	// The syncers learn what they wrote in the background, reading the
	// tables: count the reads once those are done.
	saves := func() int {
		for _, m := range d.mgr.nodeFilter {
			m.syncer().Wait()
		}
		for _, fs := range d.mgr.ztFilter {
			for _, m := range fs {
				m.syncer().Wait()
			}
		}
		return f.ipt.Saves + f.ipt6.Saves + f.ztIPT.Saves + f.ztIPT6.Saves
	}
	before := saves()
	if what := d.nodeDrift(ctx); len(what) != 1 || !strings.HasPrefix(what[0], KindRoute) {
		t.Fatalf("drift of a deleted route: %q, want the route manager's alone", what)
	}
	res, err := d.Apply(ctx, st)
	if err != nil || res.Writes[KindRoute] != 1 {
		t.Fatalf("repair after netlink drift: %v %v, want the one route back", res.Writes, err)
	}
	if got := saves(); got != before {
		t.Fatalf("netlink drift read the iptables chains %d times", got-before)
	}
	d.QueueResync()
	if _, err := d.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	if got := saves(); got == before {
		t.Fatal("the periodic resync did not read the iptables chains")
	}
}
