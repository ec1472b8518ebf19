//go:build linux

package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// TestIPv6Proxying runs the real binary in a dual-stack netnstest cluster
// with hand-written IPv6 TPROXY rules standing in for the agent's (which has
// none for IPv6 yet): a captured connection reaches [::1]:15001, is dialled
// with the client's IPv6 address as source, and crosses nodes as HBONE to
// [dst]:15008. Root only.
func TestIPv6Proxying(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := filepath.Join(t.TempDir(), "test-ztunnel")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	c := netnstest.NewCluster(t, 2)
	n1, n2 := c.Node(1), c.Node(2)
	z1, a, b := n1.AddPod(t, "zt"), n1.AddPod(t, "a"), n1.AddPod(t, "b")
	z2, b2 := n2.AddPod(t, "zt"), n2.AddPod(t, "b")
	recs := map[*netnstest.Pod]string{}
	for _, z := range []*netnstest.Pod{z1, z2} {
		other := n2
		if z == z2 {
			other = n1
		}
		for _, args := range [][]string{
			// Packets of our transparent sockets are ours; TPROXY'd ones too.
			{"ip6tables", "-w", "-t", "mangle", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp", "-m", "socket", "--transparent", "-j", "MARK", "--set-mark", "0x400/0x400"},
			{"ip", "-6", "rule", "add", "fwmark", "0x400/0x400", "lookup", "100"},
			{"ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"},
		} {
			netnstest.Exec(t, z.NS, args...)
		}
		recs[z] = filepath.Join(t.TempDir(), "records.jsonl")
		ready := filepath.Join(t.TempDir(), "ready")
		netnstest.Start(t, z.NS, bin, "--record-file", recs[z], "--ready-file", ready, "--hbone-cidrs", other.PodCIDR6.String())
		waitFile(t, ready)
	}
	tproxy := func(z, dst *netnstest.Pod, dport, onPort int) {
		netnstest.Exec(t, z.NS, "ip6tables", "-w", "-t", "mangle", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp",
			"-d", dst.IP6.String(), "--dport", fmt.Sprint(dport), "-j", "TPROXY", "--on-ip", "::1", "--on-port", fmt.Sprint(onPort), "--tproxy-mark", "0x400/0x400")
	}
	// steer sends matching packets arriving on node n to ztunnel z.
	steer := func(n *netnstest.Node, z *netnstest.Pod, match ...string) {
		netnstest.Exec(t, n.NS, append(append([]string{"ip", "-6", "rule", "add"}, match...), "lookup", "200")...)
	}
	for _, p := range [][2]any{{n1, z1}, {n2, z2}} {
		n, z := p[0].(*netnstest.Node), p[1].(*netnstest.Pod)
		netnstest.Exec(t, n.NS, "ip", "-6", "route", "add", "default", "via", z.IP6.String(), "dev", z.HostVeth, "table", "200")
	}
	// Same node: a → b:8080 and its replies through z1.
	steer(n1, z1, "iif", a.HostVeth, "to", b.IP6.String())
	steer(n1, z1, "iif", b.HostVeth, "to", a.IP6.String())
	tproxy(z1, b, 8080, 15001)
	// Cross node: a → b2:8080 via z1, HBONE to [b2]:15008 at z2, replies of
	// b2 to a's address back through z2.
	steer(n1, z1, "iif", a.HostVeth, "to", b2.IP6.String())
	tproxy(z1, b2, 8080, 15001)
	steer(n2, z2, "iif", "eth0", "to", b2.IP6.String(), "ipproto", "tcp", "dport", "15008")
	steer(n2, z2, "iif", b2.HostVeth, "to", a.IP6.String())
	tproxy(z2, b2, 15008, 15008)

	for _, dst := range []*netnstest.Pod{b, b2} {
		netnstest.WhoAmI(t, dst.NS, net.JoinHostPort(dst.IP6.String(), "8080"))
	}
	for _, dst := range []*netnstest.Pod{b, b2} {
		to := net.JoinHostPort(dst.IP6.String(), "8080")
		cn, err := netnstest.Dial(a.NS, "tcp", to, 5*time.Second)
		if err != nil {
			t.Fatalf("a -> %s: %v", to, err)
		}
		_ = cn.SetDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(cn)
		local := cn.LocalAddr().String()
		cn.Close()
		if err != nil || hostOf(string(got)) != a.IP6.String() {
			t.Fatalf("%s saw client %q (%v), want the spoofed %s", to, got, err, a.IP6)
		}
		r := findRecord(t, recs[z1], func(r record.Record) bool { return r.Listener == 15001 && r.OrigDst == to })
		if r.Client != local || r.DialError != "" || r.HBONE != (dst == b2) {
			t.Errorf("z1 record for %s: %+v (client %s)", to, r, local)
		}
		if dst == b2 {
			hb := net.JoinHostPort(b2.IP6.String(), "15008")
			if r.Target != hb {
				t.Errorf("HBONE target %s, want %s", r.Target, hb)
			}
			r2 := findRecord(t, recs[z2], func(r record.Record) bool { return r.Listener == 15008 })
			if r2.Target != to || r2.HeaderClient != local || hostOf(r2.Client) != z1.IP6.String() || r2.DialError != "" {
				t.Errorf("z2 record: %+v", r2)
			}
		}
	}
}

func hostOf(hostport string) string {
	h, _, _ := net.SplitHostPort(hostport)
	return h
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Fatalf("%s not created", path)
}

func findRecord(t *testing.T, path string, f func(record.Record) bool) record.Record {
	t.Helper()
	var all []record.Record
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		var err error
		if all, err = record.Read(path); err != nil {
			t.Fatal(err)
		}
		for _, r := range all {
			if f(r) {
				return r
			}
		}
	}
	t.Fatalf("no matching record in %s: %s", path, strings.TrimSpace(fmt.Sprint(all)))
	return record.Record{}
}
