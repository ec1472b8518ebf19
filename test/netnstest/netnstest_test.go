//go:build linux

package netnstest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const rtTimeout = 5 * time.Second

// rootSnapshot captures root-namespace state that this package must never
// modify. It runs the commands directly (not via ip netns exec).
func rootSnapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "-4", "rule", "show"},
		{"ip", "-6", "rule", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-o", "link", "show"},
		{"ip", "-o", "-4", "addr", "show"},
		{"sysctl", "-n", "net.ipv4.ip_forward"},
	} {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		fmt.Fprintf(&b, "### %v (err=%v)\n", args, err)
		b.Write(out)
	}
	return b.String()
}

func payload(n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7 + i>>8)
	}
	return p
}

// checkSourcePreserved connects from srcIP in srcNS to dstIP in dstNS and
// fails unless the server sees srcIP as the source (no NAT on the way).
func checkSourcePreserved(t *testing.T, srcNS string, srcIP net.IP, dstNS string, dstIP net.IP) {
	t.Helper()
	l := Listen(t, dstNS, "tcp", hostPort(dstIP, 9000))
	remote := make(chan net.Addr, 1)
	go func() {
		cn, err := l.Accept()
		if err != nil {
			remote <- nil
			return
		}
		remote <- cn.RemoteAddr()
		cn.Close()
	}()
	cn, err := DialFrom(srcNS, "tcp", hostPort(srcIP, 0), hostPort(dstIP, 9000), rtTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer cn.Close()
	if ra, _ := (<-remote).(*net.TCPAddr); ra == nil || !ra.IP.Equal(srcIP) {
		t.Fatalf("server saw %v, want source %v", ra, srcIP)
	}
}

func checkRoundTrip(t *testing.T, ns, addr string) {
	t.Helper()
	want := payload(100_000)
	got, err := RoundTrip(ns, addr, want, rtTimeout)
	if err != nil {
		t.Fatalf("round trip %s -> %s: %v", ns, addr, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("round trip %s -> %s: got %d bytes, want %d identical bytes", ns, addr, len(got), len(want))
	}
}

func checkUDP(t *testing.T, ns, addr string) {
	t.Helper()
	want := []byte("udp-ping-" + ns)
	var got []byte
	var err error
	for i := 0; i < 3; i++ { // UDP: tolerate a lost first datagram (ARP)
		if got, err = UDPRoundTrip(ns, addr, want, time.Second); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("udp %s -> %s: %v", ns, addr, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("udp %s -> %s: got %q want %q", ns, addr, got, want)
	}
}

func hostPort(ip net.IP, port int) string { return net.JoinHostPort(ip.String(), fmt.Sprint(port)) }

func TestCluster(t *testing.T) {
	RequireRoot(t)
	before := rootSnapshot(t)
	var namespaces []string
	// Registered first, so it runs after the cluster's own cleanup.
	t.Cleanup(func() {
		for _, ns := range namespaces {
			if Exists(ns) {
				t.Errorf("namespace %s still exists after cleanup", ns)
			}
		}
		if after := rootSnapshot(t); after != before {
			t.Errorf("root network namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	c := NewCluster(t, 2)
	if len(c.Prefix) != 8 || !strings.HasPrefix(c.Prefix, "ar") {
		t.Fatalf("bad prefix %q", c.Prefix)
	}
	for _, n := range c.Nodes {
		n.AddPod(t, "p1")
		n.AddPod(t, "p2")
	}
	namespaces = c.Namespaces()
	if len(namespaces) != 1+2+4 {
		t.Fatalf("namespaces = %v", namespaces)
	}

	n1, n2 := c.Node(1), c.Node(2)
	t.Run("layout", func(t *testing.T) {
		for _, ns := range namespaces {
			if !Exists(ns) {
				t.Errorf("%s not under %s", ns, NetnsDir)
			}
		}
		if n1.NS != c.Prefix+"-node1" || !n1.IP.Equal(net.ParseIP("172.18.0.2")) ||
			n1.PodCIDR.String() != "10.244.1.0/24" || !n1.Gateway.Equal(net.ParseIP("10.244.1.1")) {
			t.Errorf("node1 = %+v", n1)
		}
		if !n2.IP.Equal(net.ParseIP("172.18.0.3")) || n2.PodCIDR.String() != "10.244.2.0/24" {
			t.Errorf("node2 = %+v", n2)
		}
		p := n2.Pods[1]
		if p.NS != c.Prefix+"-node2-p2" || !p.IP.Equal(net.ParseIP("10.244.2.3")) ||
			!strings.HasPrefix(p.HostVeth, "veth") || len(p.HostVeth) > 15 || p.HostVethIndex == 0 {
			t.Errorf("pod = %+v", p)
		}
		for _, n := range c.Nodes {
			if v := strings.TrimSpace(Exec(t, n.NS, "sysctl", "-n", "net.ipv4.ip_forward")); v != "1" {
				t.Errorf("%s ip_forward = %q", n.NS, v)
			}
			routes := Exec(t, n.NS, "ip", "route")
			for _, p := range n.Pods {
				want := fmt.Sprintf("%s dev %s scope host", p.IP, p.HostVeth)
				if !strings.Contains(routes, want) {
					t.Errorf("%s routes lack %q:\n%s", n.NS, want, routes)
				}
			}
			for _, o := range c.Nodes {
				if o == n {
					continue
				}
				want := fmt.Sprintf("%s via %s dev eth0", o.PodCIDR, o.IP)
				if !strings.Contains(routes, want) {
					t.Errorf("%s routes lack %q:\n%s", n.NS, want, routes)
				}
			}
			addrs := Exec(t, n.NS, "ip", "-o", "-4", "addr")
			if got := strings.Count(addrs, "inet "+n.Gateway.String()+"/32"); got != len(n.Pods) {
				t.Errorf("%s: gateway address on %d veths, want %d:\n%s", n.NS, got, len(n.Pods), addrs)
			}
		}
		// ptp's shape: the connected /24 replaced by a route via the gateway.
		got := Exec(t, n1.Pods[0].NS, "ip", "route")
		want := "default via 10.244.1.1 dev eth0 \n10.244.1.0/24 via 10.244.1.1 dev eth0 src 10.244.1.2 \n10.244.1.1 dev eth0 scope link src 10.244.1.2 \n"
		if got != want {
			t.Errorf("pod routes:\n%q\nwant\n%q", got, want)
		}
		if v := strings.TrimSpace(Exec(t, c.UnderlayNS, "ip", "-o", "link", "show", "master", UnderlayBridge)); strings.Count(v, "\n")+1 != 2 {
			t.Errorf("bridge ports:\n%s", v)
		}
	})

	// Echo servers: on every pod, and on every node's wildcard address
	// (reachable through the node IP and the pod gateway 10.244.i.1).
	const port = 8080
	for _, n := range c.Nodes {
		EchoServer(t, n.NS, fmt.Sprintf(":%d", port))
		UDPEcho(t, n.NS, fmt.Sprintf(":%d", port))
		for _, p := range n.Pods {
			EchoServer(t, p.NS, hostPort(p.IP, port))
			UDPEcho(t, p.NS, hostPort(p.IP, port))
		}
	}

	t.Run("same-node pod to pod", func(t *testing.T) {
		checkRoundTrip(t, n1.Pods[0].NS, hostPort(n1.Pods[1].IP, port))
		checkRoundTrip(t, n2.Pods[1].NS, hostPort(n2.Pods[0].IP, port))
	})
	t.Run("cross-node pod to pod", func(t *testing.T) {
		checkRoundTrip(t, n1.Pods[0].NS, hostPort(n2.Pods[1].IP, port))
		checkRoundTrip(t, n2.Pods[0].NS, hostPort(n1.Pods[1].IP, port))
	})
	t.Run("node to pod", func(t *testing.T) {
		checkRoundTrip(t, n1.NS, hostPort(n1.Pods[0].IP, port))
		checkRoundTrip(t, n1.NS, hostPort(n2.Pods[0].IP, port)) // via underlay
	})
	t.Run("pod to node", func(t *testing.T) {
		checkRoundTrip(t, n1.Pods[0].NS, hostPort(n1.Gateway, port))
		checkRoundTrip(t, n1.Pods[1].NS, hostPort(n1.IP, port))
		checkRoundTrip(t, n2.Pods[0].NS, hostPort(n1.IP, port)) // other node
	})
	t.Run("node to node", func(t *testing.T) {
		checkRoundTrip(t, n2.NS, hostPort(n1.IP, port))
	})
	t.Run("udp", func(t *testing.T) {
		checkUDP(t, n1.Pods[0].NS, hostPort(n1.Pods[1].IP, port))
		checkUDP(t, n1.Pods[0].NS, hostPort(n2.Pods[0].IP, port))
		checkUDP(t, n2.NS, hostPort(n2.Pods[1].IP, port))
		checkUDP(t, n2.Pods[1].NS, hostPort(n2.Gateway, port))
	})
	t.Run("no NAT and DialFrom", func(t *testing.T) {
		src, dst := n1.Pods[1], n2.Pods[1]
		checkSourcePreserved(t, src.NS, src.IP, dst.NS, dst.IP)
		if _, err := Dial(src.NS, "tcp", "localhost:1", time.Second); err == nil {
			t.Fatal("Dial accepted a host name")
		}
	})
	t.Run("dump", func(t *testing.T) {
		for _, ns := range namespaces {
			d1, d2 := Dump(t, ns), Dump(t, ns)
			if d1 != d2 {
				t.Errorf("Dump(%s) unstable:\n%s", ns, lineDiff(d1, d2))
			}
		}
		d := Dump(t, n1.Pods[0].NS)
		for _, want := range []string{"default via 10.244.1.1 dev eth0", "eth0 <", "kind=veth", "10.244.1.2/24", "fd00:10:244:1::2/64"} {
			if !strings.Contains(d, want) {
				t.Errorf("pod dump lacks %q:\n%s", want, d)
			}
		}
		// Changes are visible, and reverting them restores the dump.
		ns := n1.NS
		changes := [][2][]string{
			{{"iptables-nft", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "15001", "-j", "ACCEPT"},
				{"iptables-nft", "-t", "nat", "-D", "PREROUTING", "-p", "tcp", "--dport", "15001", "-j", "ACCEPT"}},
			{{"ip", "rule", "add", "fwmark", "0x539", "lookup", "133", "priority", "32000"},
				{"ip", "rule", "del", "fwmark", "0x539", "lookup", "133", "priority", "32000"}},
			{{"ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133"},
				{"ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "133"}},
			{{"ipset", "create", "ar-test", "hash:ip"}, {"ipset", "destroy", "ar-test"}},
		}
		for _, ch := range changes {
			// Apply and revert once first: some state (e.g. an iptables
			// table with its built-in chains) legitimately stays behind.
			Exec(t, ns, ch[0]...)
			Exec(t, ns, ch[1]...)
			base := Dump(t, ns)
			Exec(t, ns, ch[0]...)
			changed := Dump(t, ns)
			if changed == base {
				t.Errorf("Dump did not change after %v", ch[0])
			}
			if again := Dump(t, ns); again != changed {
				t.Errorf("Dump unstable after %v:\n%s", ch[0], lineDiff(changed, again))
			}
			Exec(t, ns, ch[1]...)
			if after := Dump(t, ns); after != base {
				t.Errorf("Dump after reverting %v differs:\n%s", ch[0], lineDiff(base, after))
			}
		}
		// ipset members are sorted and counters / seeds hidden.
		Exec(t, ns, "ipset", "create", "ar-members", "hash:ip", "counters")
		defer Exec(t, ns, "ipset", "destroy", "ar-members")
		Exec(t, ns, "ipset", "add", "ar-members", "10.244.2.3")
		Exec(t, ns, "ipset", "add", "ar-members", "10.244.1.2")
		d1 := Dump(t, ns)
		Exec(t, ns, "ipset", "del", "ar-members", "10.244.1.2")
		Exec(t, ns, "ipset", "add", "ar-members", "10.244.1.2", "packets", "5", "bytes", "500")
		if d2 := Dump(t, ns); d1 != d2 {
			t.Errorf("ipset dump depends on order/counters:\n%s", lineDiff(d1, d2))
		}
		if strings.Contains(d1, "initval") || strings.Contains(d1, "References") {
			t.Errorf("ipset dump not normalised:\n%s", d1)
		}
	})
	t.Run("proc", func(t *testing.T) {
		p := Start(t, n1.Pods[0].NS, "sh", "-c", "ip -o -4 addr show dev eth0; echo ready; exec sleep 300")
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(p.Log(), "ready") && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if log := p.Log(); !strings.Contains(log, n1.Pods[0].IP.String()+"/24") {
			t.Fatalf("process not in pod namespace; log:\n%s", log)
		}
		start := time.Now()
		p.Stop()
		p.Stop() // idempotent
		select {
		case <-p.Done():
		default:
			t.Fatal("process still running after Stop")
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("SIGTERM stop took %v", d)
		}
		// A process ignoring SIGTERM is killed.
		q := Start(t, n1.NS, "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done")
		for !strings.Contains(q.Log(), "ready") && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		q.Stop()
		if q.Err() == nil {
			t.Error("SIGTERM-ignoring process exited cleanly?")
		}
	})
	t.Run("pod delete", func(t *testing.T) {
		p := n2.AddPod(t, "tmp")
		if !p.IP.Equal(net.ParseIP("10.244.2.4")) {
			t.Errorf("tmp IP = %v", p.IP)
		}
		checkRoundTrip(t, n1.Pods[0].NS, hostPort(n2.Pods[0].IP, port))
		p.Delete(t)
		if Exists(p.NS) {
			t.Fatal("pod namespace still exists")
		}
		if r := Exec(t, n2.NS, "ip", "route"); strings.Contains(r, p.IP.String()+" ") {
			t.Errorf("host route survived: %s", r)
		}
		// host-local hands out the next address, not the freed one.
		q := n2.AddPod(t, "tmp2", WithIP(p.IP))
		if !q.IP.Equal(p.IP) || q.HostVeth == p.HostVeth {
			t.Errorf("reuse: %+v", q)
		}
		if q.IP6.Equal(p.IP6) || !n2.PodCIDR6.Contains(q.IP6) {
			t.Errorf("reuse IP6 = %v (deleted pod had %v)", q.IP6, p.IP6)
		}
		if _, err := n2.addPod("tmp3", WithIP(p.IP)); err == nil {
			t.Error("an address in use was handed out again")
		}
		namespaces = append(namespaces, q.NS)
	})
}

func TestDo(t *testing.T) {
	RequireRoot(t)
	c := NewCluster(t, 1)
	ns := c.Node(1).NS
	rootIno := nsInode(t, "/proc/self/ns/net")

	for i := 0; i < 50; i++ {
		var inside uint64
		if err := Do(ns, func() error {
			inside = nsInode(t, "/proc/thread-self/ns/net")
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if inside == rootIno || inside != nsInode(t, NsPath(ns)) {
			t.Fatalf("Do ran in netns inode %d (root %d)", inside, rootIno)
		}
	}
	wantErr := errors.New("boom")
	if err := Do(ns, func() error { return wantErr }); !errors.Is(err, wantErr) {
		t.Fatalf("Do error = %v", err)
	}
	func() {
		defer func() {
			if _, ok := recover().(PanicError); !ok {
				t.Fatal("panic not propagated")
			}
		}()
		_ = Do(ns, func() error { panic("x") })
	}()
	if err := Do("", func() error { return nil }); err == nil {
		t.Fatal("Do accepted the empty namespace name")
	}
	// No thread of this process may remain in a foreign namespace.
	tasks, _ := filepath.Glob("/proc/self/task/*/ns/net")
	for _, p := range tasks {
		if ino := nsInode(t, p); ino != rootIno {
			t.Errorf("%s in netns %d, want %d", p, ino, rootIno)
		}
	}
	if v, err := GetSysctl(ns, "net.ipv4.ip_forward"); err != nil || v != "1" {
		t.Errorf("node ip_forward = %q, %v", v, err)
	}
}

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestCloseAndCleanupStale(t *testing.T) {
	RequireRoot(t)
	c := NewCluster(t, 2)
	c.Node(1).AddPod(t, "a")
	c.Node(2).AddPod(t, "b")
	names := c.Namespaces()
	for _, ns := range names {
		if !Exists(ns) {
			t.Fatalf("%s missing", ns)
		}
	}
	// A live cluster (lock held) survives CleanupStale.
	if err := CleanupStale(PrefixBase); err != nil {
		t.Fatal(err)
	}
	for _, ns := range names {
		if !Exists(ns) {
			t.Fatalf("CleanupStale removed live namespace %s", ns)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, ns := range names {
		if Exists(ns) {
			t.Errorf("%s survived Close", ns)
		}
	}
	if _, err := os.Stat(filepath.Join(LockDir, c.Prefix+".lock")); !os.IsNotExist(err) {
		t.Errorf("lock file left: %v", err)
	}

	// Simulate a crashed run: namespaces without a live lock.
	stale := []string{"arfeed00-node1", "arfeed00-node1-x", "arfeed00-ul"}
	for _, ns := range stale {
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		t.Cleanup(func() { _ = deleteNS(ns) })
	}
	staleIPAM := filepath.Join(LockDir, "arfeed00.ipam")
	if err := os.MkdirAll(filepath.Join(staleIPAM, "node1", "kindnet"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(staleIPAM) })
	if err := CleanupStale("arfeed00"); err != nil {
		t.Fatal(err)
	}
	for _, ns := range stale {
		if Exists(ns) {
			t.Errorf("stale %s not removed", ns)
		}
	}
	if _, err := os.Stat(staleIPAM); !os.IsNotExist(err) {
		t.Errorf("stale IPAM state not removed: %v", err)
	}
}

func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out strings.Builder
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			fmt.Fprintf(&out, "line %d:\n- %s\n+ %s\n", i+1, x, y)
		}
	}
	return out.String()
}
