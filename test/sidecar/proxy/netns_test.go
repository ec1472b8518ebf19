//go:build linux

package main

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/record"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/sidecartest"
)

var proxyBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		if os.Geteuid() != 0 {
			return m.Run() // the netns tests skip (or fail in CI) via RequireRoot
		}
		dir, err := os.MkdirTemp("", "ar-sidecar-proxy-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if proxyBin, err = sidecartest.BuildProxy(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return m.Run()
	}())
}

// The test pod and a peer outside it, on one veth.
const (
	podIP4, podIP6   = "10.99.0.2", "fd99::2"
	peerIP4, peerIP6 = "10.99.0.1", "fd99::1"
	appPort          = 8080 // the pod's app: inbound target
	remotePort       = 9090 // the peer's server: outbound target
)

type family struct {
	name, ipt     string // "v4", "iptables"
	pod, peer, lo string
	passthrough   string // the inbound passthrough source
}

var families = []family{
	{"v4", "iptables", podIP4, peerIP4, "127.0.0.1", "127.0.0.6"},
	{"v6", "ip6tables", podIP6, peerIP6, "::1", "::6"},
}

func hostPort(ip string, port int) string {
	return netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(port)).String()
}

// pair makes a pod netns and a peer netns joined by a veth, dual-stack, each
// with a WhoAmI server (the pod's on appPort, the peer's on remotePort), and
// ::6/128 on the pod's lo as istio-iptables adds it.
func pair(t *testing.T) (pod, peer string) {
	t.Helper()
	pod, peer = sidecartest.NewNetns(t), sidecartest.NewNetns(t)
	netnstest.Exec(t, pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
	for _, x := range []struct{ ns, ip4, ip6 string }{{pod, podIP4, podIP6}, {peer, peerIP4, peerIP6}} {
		netnstest.Exec(t, x.ns, "ip", "addr", "add", x.ip4+"/24", "dev", "eth0")
		netnstest.Exec(t, x.ns, "ip", "addr", "add", x.ip6+"/64", "dev", "eth0", "nodad")
		netnstest.Exec(t, x.ns, "ip", "link", "set", "eth0", "up")
	}
	netnstest.Exec(t, pod, "ip", "-6", "addr", "add", "::6/128", "dev", "lo")
	for _, f := range families {
		netnstest.WhoAmI(t, pod, hostPort(f.pod, appPort))
		netnstest.WhoAmI(t, peer, hostPort(f.peer, remotePort))
	}
	return pod, peer
}

// ipOf is the address of "ip:port" ("" if it is none).
func ipOf(s string) string {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return ""
	}
	return ap.Addr().String()
}

// roundTrip connects from ns to addr and returns what the WhoAmI server
// there saw as the client.
func roundTrip(t *testing.T, ns, addr string) string {
	t.Helper()
	b, err := netnstest.RoundTrip(ns, addr, nil, 5*time.Second)
	if err != nil {
		t.Fatalf("round trip %s -> %s: %v", ns, addr, err)
	}
	return string(b)
}

// last returns the one record that arrived after the first n.
func last(t *testing.T, p *sidecartest.Proxy, n int) record.Record {
	t.Helper()
	recs := p.WaitRecords(t, n+1, 5*time.Second)
	if len(recs) != n+1 {
		t.Fatalf("%d new records, want 1: %+v", len(recs)-n, recs[n:])
	}
	return recs[n]
}

func checkRecord(t *testing.T, what string, got record.Record, listener int, origDst, method string) {
	t.Helper()
	if got.Listener != listener || got.OrigDst != origDst || got.Method != method || got.DialError != "" ||
		got.UID != sidecartest.ProxyUID || got.GID != sidecartest.ProxyGID {
		t.Errorf("%s: record %+v; want listener %d orig_dst %s via %s as 1337:1337, no dial error", what, got, listener, origDst, method)
	}
}

// TestRedirect: plain nat REDIRECT rules written here (not Istio's):
// SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST recover the destination on both
// listeners, outbound dials leave as uid 1337 (exempt), inbound dials come
// from 127.0.0.6 / ::6, and DNS on 15053 is recorded and echoed.
func TestRedirect(t *testing.T) {
	netnstest.RequireRoot(t)
	pod, peer := pair(t)
	for _, f := range families {
		for _, r := range [][]string{
			{"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", fmt.Sprint(appPort), "-j", "REDIRECT", "--to-ports", "15006"},
			{"-t", "nat", "-A", "OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"},
			{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", fmt.Sprint(remotePort), "-j", "REDIRECT", "--to-ports", "15001"},
			{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "53", "-j", "REDIRECT", "--to-ports", "15053"},
			{"-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", "15053"},
		} {
			netnstest.Exec(t, pod, append([]string{f.ipt, "-w"}, r...)...)
		}
	}
	p := sidecartest.StartProxy(t, pod, proxyBin, sidecartest.ProxyOptions{DNSPort: 15053})
	n := 0
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			// Outbound: the app (root) in the pod to the peer's server.
			dst := hostPort(f.peer, remotePort)
			saw := roundTrip(t, pod, dst)
			rec := last(t, p, n)
			n++
			checkRecord(t, "outbound", rec, 15001, dst, record.MethodOrigDst)
			if rec.Upstream != saw || ipOf(saw) != f.pod {
				t.Errorf("outbound: server saw %s, proxy's upstream %s; want the pod's IP", saw, rec.Upstream)
			}

			// Inbound: the peer to the pod's app.
			dst = hostPort(f.pod, appPort)
			saw = roundTrip(t, peer, dst)
			rec = last(t, p, n)
			n++
			checkRecord(t, "inbound", rec, 15006, dst, record.MethodOrigDst)
			if ipOf(saw) != f.passthrough || rec.Upstream != saw {
				t.Errorf("inbound: app saw %s, proxy's upstream %s; want from %s", saw, rec.Upstream, f.passthrough)
			}
			if ipOf(rec.Peer) != f.peer {
				t.Errorf("inbound: peer %s, want %s", rec.Peer, f.peer)
			}

			// DNS over TCP and UDP: recorded on 15053 and echoed.
			dst = hostPort(f.peer, 53)
			if got := string(mustRoundTrip(t, pod, dst)); got != "query" {
				t.Errorf("tcp dns echo %q", got)
			}
			rec = last(t, p, n)
			n++
			if rec.Listener != 15053 || rec.Proto != "tcp" || rec.OrigDst != dst || rec.Method != record.MethodOrigDst {
				t.Errorf("tcp dns: record %+v", rec)
			}
			b, err := netnstest.UDPRoundTrip(pod, dst, []byte("query"), 5*time.Second)
			if err != nil || string(b) != "query" {
				t.Errorf("udp dns echo %q, %v", b, err)
			}
			rec = last(t, p, n)
			n++
			if rec.Listener != 15053 || rec.Proto != "udp" || rec.Method != record.MethodNone || rec.UID != sidecartest.ProxyUID {
				t.Errorf("udp dns: record %+v", rec)
			}
		})
	}
}

func mustRoundTrip(t *testing.T, ns, addr string) []byte {
	t.Helper()
	b, err := netnstest.RoundTrip(ns, addr, []byte("query"), 5*time.Second)
	if err != nil {
		t.Fatalf("round trip %s -> %s: %v", ns, addr, err)
	}
	return b
}

// TestTPROXY: Istio's TPROXY inbound shape written here (mangle TPROXY to
// 15006 with mark 0x539, fwmark rule to a local table, connmark so the
// app's replies to the spoofed client return to the proxy): the proxy reads
// the original destination from the accepted socket's local address and
// reaches the app from the real client's address.
func TestTPROXY(t *testing.T) {
	netnstest.RequireRoot(t)
	pod, peer := pair(t)
	for _, f := range families {
		ip := "-4"
		if f.name == "v6" {
			ip = "-6"
		}
		netnstest.Exec(t, pod, "ip", ip, "rule", "add", "fwmark", "0x539", "lookup", "133")
		netnstest.Exec(t, pod, "ip", ip, "route", "add", "local", "default", "dev", "lo", "table", "133")
		for _, r := range [][]string{
			{"-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", "0x539", "-j", "CONNMARK", "--save-mark"},
			{"-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", "0x539", "-j", "RETURN"},
			{"-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", fmt.Sprint(appPort), "-j", "TPROXY", "--on-port", "15006", "--tproxy-mark", "0x539/0xffffffff"},
			{"-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", "0x539", "-j", "CONNMARK", "--restore-mark"},
		} {
			netnstest.Exec(t, pod, append([]string{f.ipt, "-w"}, r...)...)
		}
	}
	p := sidecartest.StartProxy(t, pod, proxyBin, sidecartest.ProxyOptions{TPROXY: true})
	for i, f := range families {
		t.Run(f.name, func(t *testing.T) {
			dst := hostPort(f.pod, appPort)
			saw := roundTrip(t, peer, dst)
			rec := last(t, p, i)
			checkRecord(t, "inbound", rec, 15006, dst, record.MethodLocalAddr)
			if ipOf(rec.Peer) != f.peer {
				t.Errorf("peer %s, want %s", rec.Peer, f.peer)
			}
			if ipOf(saw) != f.peer || rec.Upstream != saw {
				t.Errorf("app saw %s, proxy's upstream %s; want the client's address %s", saw, rec.Upstream, f.peer)
			}
		})
	}
}

// TestLoopDetected: rules that do not exempt the proxy's uid capture its own
// upstream connection; the proxy records that as a loop (and resets it)
// instead of dialling forever.
func TestLoopDetected(t *testing.T) {
	netnstest.RequireRoot(t)
	pod, _ := pair(t)
	netnstest.Exec(t, pod, "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", fmt.Sprint(remotePort), "-j", "REDIRECT", "--to-ports", "15001")
	p := sidecartest.StartProxy(t, pod, proxyBin, sidecartest.ProxyOptions{})
	if b, err := netnstest.RoundTrip(pod, hostPort(peerIP4, remotePort), nil, 5*time.Second); err == nil && len(b) > 0 {
		t.Errorf("the app reached the peer (%q) through a looping proxy", b)
	}
	recs := p.WaitRecords(t, 2, 5*time.Second)
	first, second := recs[0], recs[1]
	if first.OrigDst != hostPort(peerIP4, remotePort) || first.DialError != "" || first.Upstream == "" {
		t.Errorf("first record %+v", first)
	}
	if second.Peer != first.Upstream || second.OrigDst != first.OrigDst || !strings.HasPrefix(second.DialError, "loop:") {
		t.Errorf("second record %+v; want the first's upstream %s captured as a loop", second, first.Upstream)
	}
	if len(recs) != 2 {
		t.Errorf("%d records, want 2: %+v", len(recs), recs)
	}
}
