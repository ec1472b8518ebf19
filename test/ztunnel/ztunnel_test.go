package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

func TestParseHeader(t *testing.T) {
	tests := []struct {
		line           string
		target, client string
		wantErr        bool
	}{
		{line: "CONNECT 10.0.0.2:8080 10.0.1.3:40000\n", target: "10.0.0.2:8080", client: "10.0.1.3:40000"},
		{line: "CONNECT 10.0.0.2:80 10.0.1.3:1\r\n", target: "10.0.0.2:80", client: "10.0.1.3:1"},
		{line: "CONNECT [fd00::2]:80 [fd00::3]:5", target: "[fd00::2]:80", client: "[fd00::3]:5"},
		{line: "CONNECT 10.0.0.2:80\n", wantErr: true},
		{line: "CONNECT 10.0.0.2:80 10.0.1.3:1 extra\n", wantErr: true},
		{line: "GET 10.0.0.2:80 10.0.1.3:1\n", wantErr: true},
		{line: "CONNECT 10.0.0.2 10.0.1.3:1\n", wantErr: true},
		{line: "CONNECT 10.0.0.2:80 nope:1\n", wantErr: true},
		{line: "CONNECT  10.0.0.2:80 10.0.1.3:1\n", wantErr: true},
		{line: "", wantErr: true},
	}
	for _, tt := range tests {
		target, client, err := parseHeader(tt.line)
		if tt.wantErr {
			if err == nil {
				t.Errorf("parseHeader(%q) succeeded, want error", tt.line)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseHeader(%q): %v", tt.line, err)
			continue
		}
		if target.String() != tt.target || client.String() != tt.client {
			t.Errorf("parseHeader(%q) = %s, %s; want %s, %s", tt.line, target, client, tt.target, tt.client)
		}
		// formatHeader must produce something parseHeader accepts unchanged.
		if t2, c2, err := parseHeader(formatHeader(target, client)); err != nil || t2 != target || c2 != client {
			t.Errorf("round trip of %q: %s %s %v", tt.line, t2, c2, err)
		}
	}
}

func TestReadHeaderLimits(t *testing.T) {
	a, b := tcpPair(t)
	go func() {
		b.Write([]byte(strings.Repeat("x", maxHeaderLen+10)))
	}()
	if _, _, _, err := readHeader(a); err == nil {
		t.Fatal("oversized header accepted")
	}
}

func TestRecordFormat(t *testing.T) {
	var buf bytes.Buffer
	r := &recorder{w: &buf}
	var wg sync.WaitGroup
	const n = 50
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := record.Record{Listener: 15001, Client: "10.0.0.1:1234", OrigDst: "10.0.0.2:80",
				Target: "10.0.0.2:80", Time: time.Now().UTC().Format(time.RFC3339Nano)}
			if i%2 == 1 {
				rec.DialError = "dial tcp 1.2.3.4:0->5.6.7.8:80: connect: connection refused"
			}
			if err := r.write(rec); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()

	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != n {
		t.Fatalf("got %d lines, want %d", len(lines), n)
	}
	want := []string{"client", "dial_error", "hbone", "listener", "orig_dst", "target", "time"}
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("bad line %q: %v", l, err)
		}
		if len(m) != len(want) {
			t.Fatalf("line %q has keys %v, want %v", l, m, want)
		}
		for _, k := range want {
			if _, ok := m[k]; !ok {
				t.Fatalf("line %q lacks %q", l, k)
			}
		}
		if m["listener"] != float64(15001) || m["hbone"] != false {
			t.Fatalf("wrong types in %q", l)
		}
		if strings.Contains(l, `\u003e`) {
			t.Fatalf("HTML-escaped record %q", l)
		}
		if _, err := time.Parse(time.RFC3339Nano, m["time"].(string)); err != nil {
			t.Fatalf("time: %v", err)
		}
	}
}

func TestSpliceHalfClose(t *testing.T) {
	client, proxyDown := tcpPair(t)
	proxyUp, backend := tcpPair(t)

	done := make(chan struct{})
	go func() { splice(proxyDown, nil, proxyUp); close(done) }()

	// client → backend, then half-close: backend must see EOF while the
	// backend → client direction stays open.
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	client.(*net.TCPConn).CloseWrite()
	if got := readAll(t, backend); got != "ping" {
		t.Fatalf("backend got %q", got)
	}
	if _, err := backend.Write([]byte("pong")); err != nil {
		t.Fatalf("write after client half-close: %v", err)
	}
	backend.(*net.TCPConn).CloseWrite()
	if got := readAll(t, client); got != "pong" {
		t.Fatalf("client got %q", got)
	}
	waitDone(t, done, "splice")
}

func TestSpliceAbortOnReset(t *testing.T) {
	client, proxyDown := tcpPair(t)
	proxyUp, backend := tcpPair(t)
	done := make(chan struct{})
	go func() { splice(proxyDown, nil, proxyUp); close(done) }()

	client.Write([]byte("x"))
	if _, err := io.ReadFull(backend, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	resetClose(backend) // RST must tear down the other direction too.
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("client read succeeded after upstream reset")
	}
	waitDone(t, done, "splice")
}

// TestHandleChain runs outbound → HBONE → backend through real handlers on
// loopback, IPv4 and IPv6. Without TPROXY the "original destination" is the
// listener itself, so spoofed dials are redirected to the backend by a fake
// dialFunc.
func TestHandleChain(t *testing.T) {
	for _, lo := range []string{"127.0.0.1", "::1"} {
		t.Run(lo, func(t *testing.T) { testHandleChain(t, lo) })
	}
}

func testHandleChain(t *testing.T, lo string) {
	backend := listenOn(t, lo)
	go func() {
		for {
			c, err := backend.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(bytes.ToUpper(b))
			}()
		}
	}()

	outLn, hboneLn := listenOn(t, lo), listenOn(t, lo)
	var mu sync.Mutex
	var spoofed []netip.Addr
	lockedRec := &lockedBuffer{buf: new(bytes.Buffer)}
	s := &server{
		hboneCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")},
		hbonePort:  lnPort(hboneLn),
		rec:        &recorder{w: lockedRec},
		log:        log.New(io.Discard, "", 0),
		dial: func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			if src.IsValid() {
				mu.Lock()
				spoofed = append(spoofed, src)
				mu.Unlock()
				return d.DialContext(ctx, "tcp", backend.Addr().String())
			}
			return d.DialContext(ctx, "tcp", dst.String())
		},
	}
	ctx := context.Background()
	go s.serve(ctx, outLn, roleOutbound, int(lnPort(outLn)))
	go s.serve(ctx, hboneLn, roleHBONE, int(lnPort(hboneLn)))

	c, err := net.Dial("tcp", outLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hello"))
	c.(*net.TCPConn).CloseWrite()
	if got := readAll(t, c); got != "HELLO" {
		t.Fatalf("got %q", got)
	}

	recs := lockedRec.records(t)
	if len(recs) != 2 {
		t.Fatalf("got %d records, want 2: %+v", len(recs), recs)
	}
	clientAddr := c.LocalAddr().String()
	out, hb := recs[0], recs[1]
	if out.Listener != int(lnPort(outLn)) {
		out, hb = hb, out
	}
	wantOut := record.Record{Listener: int(lnPort(outLn)), Client: clientAddr, OrigDst: outLn.Addr().String(),
		Target: hboneLn.Addr().String(), HBONE: true, Time: out.Time}
	if out != wantOut {
		t.Errorf("outbound record\n got %+v\nwant %+v", out, wantOut)
	}
	if hb.Listener != int(lnPort(hboneLn)) || hb.Target != outLn.Addr().String() ||
		hb.HeaderClient != clientAddr || hb.HBONE || hb.DialError != "" || hb.OrigDst != hboneLn.Addr().String() {
		t.Errorf("hbone record: %+v", hb)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(spoofed) != 1 || spoofed[0].String() != lo {
		t.Errorf("spoofed sources = %v, want [%s]", spoofed, lo)
	}
	// The CONNECT header carried a bracketed IPv6 client intact.
	if lo == "::1" && !strings.HasPrefix(hb.HeaderClient, "[::1]:") {
		t.Errorf("header client %q", hb.HeaderClient)
	}
}

// TestHandleHBONEBufferedPayload checks that bytes sent in the same segment
// as the header reach the target, and the header client is used as source.
func TestHandleHBONEBufferedPayload(t *testing.T) {
	client, proxySide := tcpPair(t)
	up, backend := tcpPair(t)
	var gotSrc netip.Addr
	var gotDst netip.AddrPort
	var rec bytes.Buffer
	s := &server{
		rec: &recorder{w: &rec},
		log: log.New(io.Discard, "", 0),
		dial: func(_ context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			gotSrc, gotDst = src, dst
			return up, nil
		},
	}
	done := make(chan struct{})
	go func() { s.handle(context.Background(), proxySide, roleHBONE, 15008); close(done) }()

	client.Write([]byte("CONNECT 10.1.0.5:8080 10.2.0.7:33333\npayload"))
	client.(*net.TCPConn).CloseWrite()
	if got := readAll(t, backend); got != "payload" {
		t.Fatalf("backend got %q", got)
	}
	backend.Close()
	waitDone(t, done, "handle")
	if gotSrc.String() != "10.2.0.7" || gotDst.String() != "10.1.0.5:8080" {
		t.Errorf("dial src=%s dst=%s", gotSrc, gotDst)
	}
}

func TestHandleDialError(t *testing.T) {
	client, proxySide := tcpPair(t)
	var rec bytes.Buffer
	s := &server{
		rec: &recorder{w: &rec},
		log: log.New(io.Discard, "", 0),
		dial: func(context.Context, netip.Addr, netip.AddrPort) (net.Conn, error) {
			return nil, errors.New("connection refused")
		},
	}
	s.handle(context.Background(), proxySide, roleInbound, 15006)

	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatalf("client read %d bytes, want closed", n)
	}
	var r record.Record
	if err := json.Unmarshal(rec.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if r.Listener != 15006 || r.DialError != "connection refused" || r.HBONE ||
		r.Target != r.OrigDst || r.Client != client.LocalAddr().String() {
		t.Errorf("record: %+v", r)
	}
}

func TestSelfDialRefused(t *testing.T) {
	s := &server{self: map[netip.AddrPort]bool{netip.MustParseAddrPort("127.0.0.1:15001"): true}}
	if _, err := s.dialChecked(context.Background(), netip.Addr{}, netip.MustParseAddrPort("127.0.0.1:15001")); err == nil {
		t.Fatal("dial to own listener allowed")
	}
}

// TestListenAll binds transparent listeners on both loopbacks (root only:
// IP(V6)_TRANSPARENT needs CAP_NET_ADMIN) and dials through the IPv6 one
// with the transparent+freebind options of a spoofed dial.
func TestListenAll(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("IP_TRANSPARENT needs root")
	}
	ips := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	lns, err := listenAll(context.Background(), ips, []uint16{0, 0, 0}, log.New(io.Discard, "", 0))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	if len(lns) != 6 {
		t.Fatalf("%d listeners, want 6", len(lns))
	}
	for i, l := range lns {
		a := addrPort(l.Addr())
		if a.Addr() != ips[i/3] || l.role != role(i%3) {
			t.Errorf("listener %d: %s role %v", i, a, l.role)
		}
	}
	v6 := lns[3]
	go func() {
		c, err := v6.Accept()
		if err == nil {
			c.Write([]byte(c.RemoteAddr().String()))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := systemDial(0)(ctx, netip.MustParseAddr("::1"), addrPort(v6.Addr()))
	if err != nil {
		t.Fatalf("spoof-style IPv6 dial: %v", err)
	}
	defer c.Close()
	if got := readAll(t, c); !strings.HasPrefix(got, "[::1]:") {
		t.Fatalf("listener saw client %q", got)
	}
}

func TestParseFlags(t *testing.T) {
	if ips, err := parseIPs("127.0.0.1, ::1"); err != nil || len(ips) != 2 || !ips[1].Is6() {
		t.Errorf("parseIPs: %v %v", ips, err)
	}
	if _, err := parseIPs("127.0.0.1,"); err == nil {
		t.Error("parseIPs accepted an empty element")
	}
	if p, err := parsePorts("15001, 15006,15008"); err != nil || p[0] != 15001 || p[2] != 15008 {
		t.Errorf("parsePorts: %v %v", p, err)
	}
	for _, bad := range []string{"15001,15006", "1,2,x", "0,1,2", "1,2,70000"} {
		if _, err := parsePorts(bad); err == nil {
			t.Errorf("parsePorts(%q) succeeded", bad)
		}
	}
	p, err := parseCIDRs(" 10.0.0.1/8,,fd00::/64 ")
	if err != nil || len(p) != 2 || p[0].String() != "10.0.0.0/8" {
		t.Errorf("parseCIDRs: %v %v", p, err)
	}
	if p, _ := parseCIDRs(""); len(p) != 0 {
		t.Errorf("empty cidrs: %v", p)
	}
	if _, err := parseCIDRs("10.0.0.0"); err == nil {
		t.Error("parseCIDRs accepted a bare IP")
	}
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf *bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) records(t *testing.T) []record.Record {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []record.Record
	sc := bufio.NewScanner(bytes.NewReader(b.buf.Bytes()))
	for sc.Scan() {
		var r record.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("bad record %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}

func listen(t *testing.T) net.Listener { return listenOn(t, "127.0.0.1") }

func listenOn(t *testing.T, ip string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func lnPort(ln net.Listener) uint16 { return uint16(ln.Addr().(*net.TCPAddr).Port) }

// tcpPair returns the two ends of one loopback TCP connection.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln := listen(t)
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		ch <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b, ok := <-ch
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func readAll(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func waitDone(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s did not return", what)
	}
}
