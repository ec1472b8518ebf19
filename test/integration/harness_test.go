// Package integration proves the dataplane with real kernels and real
// sockets: ptp-shaped nodes in network namespaces, a test ztunnel that really
// proxies, and the real dataplane package programming them. Root only.
package integration

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

var ztunnelBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		if os.Geteuid() != 0 {
			return m.Run() // every test skips (or fails in CI) via RequireRoot
		}
		dir, err := os.MkdirTemp("", "ar-ztunnel-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		ztunnelBin = filepath.Join(dir, "test-ztunnel")
		out, err := exec.Command("go", "build", "-o", ztunnelBin, "github.com/ambient-redirect/ambient-redirect/test/ztunnel").CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build test ztunnel: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}())
}

// ztunnel is a running test ztunnel in a pod netns.
type ztunnel struct {
	pod     *netnstest.Pod
	records string
	proc    *netnstest.Proc
}

func startZtunnel(t testing.TB, pod *netnstest.Pod, hboneCIDRs ...string) *ztunnel {
	t.Helper()
	dir := t.TempDir()
	z := &ztunnel{pod: pod, records: filepath.Join(dir, "records.jsonl")}
	ready := filepath.Join(dir, "ready")
	z.proc = netnstest.Start(t, pod.NS, ztunnelBin, "--record-file", z.records, "--ready-file", ready, "--hbone-cidrs", strings.Join(hboneCIDRs, ","))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			return z
		}
		if time.Now().After(deadline) {
			t.Fatalf("test ztunnel in %s not ready: %s", pod.NS, z.proc.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (z *ztunnel) all(t *testing.T) []record.Record {
	t.Helper()
	out, err := record.Read(z.records)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// find waits briefly for a record matching f (records are written after the
// upstream dial, so they can trail the client by a little).
func (z *ztunnel) find(t *testing.T, f func(record.Record) bool) (record.Record, bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		for _, r := range z.all(t) {
			if f(r) {
				return r, true
			}
		}
		if time.Now().After(deadline) {
			return record.Record{}, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func hostOf(hostport string) string {
	h, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport
	}
	return h
}

// node is one test node with its dataplane.
type node struct {
	*netnstest.Node
	zt      *netnstest.Pod
	ambient []*netnstest.Pod
	plain   []*netnstest.Pod
	dp      *dataplane.Dataplane
	cfg     dataplane.Config
	nsDir   string
}

func addr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func (n *node) state(withZtunnel bool) dataplane.State {
	var st dataplane.State
	if withZtunnel && n.zt != nil {
		st.Ztunnel = ztunnelOf(n.zt)
	}
	for _, p := range n.ambient {
		st.Pods = append(st.Pods, dataplane.Pod{UID: "uid-" + p.Name, Name: "default/" + p.Name, IPs: addrs(p.IPs)})
	}
	return st
}

func addrs(ips []net.IP) []netip.Addr {
	var out []netip.Addr
	for _, ip := range ips {
		out = append(out, addr(ip))
	}
	return out
}

func ztunnelOf(p *netnstest.Pod) *dataplane.Ztunnel {
	return &dataplane.Ztunnel{Pod: "istio-system/" + p.Name, IPs: addrs(p.IPs), HostVeth: p.HostVeth, NetNS: netnstest.NsPath(p.NS)}
}

// nsDirFor makes a directory of symlinks to just this test's namespaces, so
// the dataplane's netns scans never see another test's.
func nsDirFor(t testing.TB, c *netnstest.Cluster) string {
	dir := t.TempDir()
	for _, ns := range c.Namespaces() {
		if err := os.Symlink(netnstest.NsPath(ns), filepath.Join(dir, ns)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// backends are the ways our rules can be written: iptables in either
// flavour, and our own nftables table.
var backends = []struct {
	name string
	set  func(*dataplane.Config)
}{
	{"nft", func(c *dataplane.Config) {
		c.IPTablesMode, c.Backend = dataplane.IPTablesNFT, dataplane.BackendIPTables
	}},
	{"legacy", func(c *dataplane.Config) {
		c.IPTablesMode, c.Backend = dataplane.IPTablesLegacy, dataplane.BackendIPTables
	}},
	{"nftables", func(c *dataplane.Config) { c.Backend = dataplane.BackendNFTables }},
}

func newDataplane(t testing.TB, n *node, mutate func(*dataplane.Config)) *dataplane.Dataplane {
	t.Helper()
	cfg := dataplane.DefaultConfig()
	cfg.NetNSDir = n.nsDir
	// AR_BACKEND runs the suite on another backend (the README's test
	// command runs the path, transition and pinning suites on both).
	if b := os.Getenv("AR_BACKEND"); b != "" {
		cfg.Backend = dataplane.Backend(b)
	}
	if mutate != nil {
		mutate(&cfg)
	}
	n.cfg = cfg
	dp, err := dataplane.New(context.Background(), cfg, dataplane.Options{
		NodeNetNS: netnstest.NsPath(n.NS),
		Logger:    zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)).Named(n.Name),
	})
	if err != nil {
		t.Fatalf("dataplane for %s: %v", n.Name, err)
	}
	t.Cleanup(dp.Close)
	return dp
}

func apply(t testing.TB, n *node, st dataplane.State) dataplane.Result {
	t.Helper()
	res, err := n.dp.Apply(context.Background(), st)
	if err != nil {
		t.Fatalf("apply on %s: %v", n.Name, err)
	}
	return res
}

// cluster builds dual-stack nodes with a ztunnel pod, ambient pods and
// plain pods.
func cluster(t testing.TB, nodes, ambient, plain int) (*netnstest.Cluster, []*node) {
	return clusterOf(t, netnstest.DualStack, nodes, ambient, plain)
}

// clusterOf is cluster with the pods' families chosen.
func clusterOf(t testing.TB, fam netnstest.Family, nodes, ambient, plain int) (*netnstest.Cluster, []*node) {
	t.Helper()
	netnstest.RequireRoot(t)
	c := netnstest.NewClusterWith(t, nodes, netnstest.Options{Family: fam})
	var out []*node
	for _, nn := range c.Nodes {
		n := &node{Node: nn}
		n.zt = nn.AddPod(t, "ztunnel")
		for i := range ambient {
			n.ambient = append(n.ambient, nn.AddPod(t, fmt.Sprintf("amb%d", i+1)))
		}
		for i := range plain {
			n.plain = append(n.plain, nn.AddPod(t, fmt.Sprintf("plain%d", i+1)))
		}
		out = append(out, n)
	}
	for _, n := range out {
		n.nsDir = nsDirFor(t, c)
	}
	return c, out
}

func payload(tag string) []byte {
	return []byte(strings.Repeat(tag+"-0123456789abcdef ", 2000))
}

// roundTrip sends a payload from ns to addr and requires the echo back.
func roundTrip(t *testing.T, ns, to string) {
	t.Helper()
	p := payload(ns + "->" + to)
	got, err := netnstest.RoundTrip(ns, to, p, 5*time.Second)
	if err != nil {
		t.Fatalf("round trip %s -> %s: %v", ns, to, err)
	}
	if string(got) != string(p) {
		t.Fatalf("round trip %s -> %s: got %d bytes back, want %d", ns, to, len(got), len(p))
	}
}

func ipPort(ip net.IP, port int) string { return net.JoinHostPort(ip.String(), fmt.Sprint(port)) }
