package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/test/sidecar/record"
)

func sockaddr4(ip string, port uint16) []byte {
	b := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(b[0:2], unix.AF_INET)
	binary.BigEndian.PutUint16(b[2:4], port)
	a := netip.MustParseAddr(ip).As4()
	copy(b[4:8], a[:])
	return b
}

func sockaddr6(ip string, port uint16) []byte {
	b := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(b[0:2], unix.AF_INET6)
	binary.BigEndian.PutUint16(b[2:4], port)
	binary.BigEndian.PutUint32(b[4:8], 0x12345) // flowinfo: ignored
	a := netip.MustParseAddr(ip).As16()
	copy(b[8:24], a[:])
	binary.NativeEndian.PutUint32(b[24:28], 7) // scope id: ignored
	return b
}

func TestParseSockaddr(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
		want string
	}{
		{"v4", sockaddr4("10.244.1.5", 8080), "10.244.1.5:8080"},
		{"v4 high port", sockaddr4("127.0.0.1", 65535), "127.0.0.1:65535"},
		// The kernel copies exactly sizeof(sockaddr_in) for IPv4 even into a
		// bigger buffer; a longer one (zero padded) parses the same.
		{"v4 in a v6-sized buffer", append(sockaddr4("10.0.0.1", 80), make([]byte, 12)...), "10.0.0.1:80"},
		{"v6", sockaddr6("fd00:10:244::5", 8080), "[fd00:10:244::5]:8080"},
		{"v6 mapped", sockaddr6("::ffff:10.0.0.1", 443), "10.0.0.1:443"},
		{"short", []byte{1}, ""},
		{"v4 short", sockaddr4("10.0.0.1", 80)[:6], ""},
		{"v6 short", sockaddr6("fd00::1", 80)[:20], ""},
		{"unknown family", append([]byte{0xff, 0xff}, make([]byte, 26)...), ""},
	}
	for _, tt := range tests {
		got, err := parseSockaddr(tt.b)
		if tt.want == "" {
			if err == nil {
				t.Errorf("%s: parseSockaddr = %v, want error", tt.name, got)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("%s: parseSockaddr = %v, %v; want %s", tt.name, got, err, tt.want)
		}
	}
}

func TestParseSources(t *testing.T) {
	tests := []struct {
		in      string
		v4, v6  string
		wantErr bool
	}{
		{in: "127.0.0.6,::6", v4: "127.0.0.6", v6: "::6"},
		{in: " ::6 , 127.0.0.6 ", v4: "127.0.0.6", v6: "::6"},
		{in: "127.0.0.6", v4: "127.0.0.6"},
		{in: "::ffff:127.0.0.6", v4: "127.0.0.6"},
		{in: ""},
		{in: "127.0.0.6,127.0.0.7", wantErr: true},
		{in: "::6,::7", wantErr: true},
		{in: "nope", wantErr: true},
		{in: "127.0.0.6,", wantErr: true},
	}
	for _, tt := range tests {
		v4, v6, err := parseSources(tt.in)
		if tt.wantErr {
			if err == nil {
				t.Errorf("parseSources(%q) = %v, %v; want error", tt.in, v4, v6)
			}
			continue
		}
		str := func(a netip.Addr) string {
			if !a.IsValid() {
				return ""
			}
			return a.String()
		}
		if err != nil || str(v4) != tt.v4 || str(v6) != tt.v6 {
			t.Errorf("parseSources(%q) = %v, %v, %v; want %s, %s", tt.in, v4, v6, err, tt.v4, tt.v6)
		}
	}
}

func TestParseIPs(t *testing.T) {
	ips, err := parseIPs("0.0.0.0, ::,::ffff:127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if got := len(ips); got != 3 || ips[0].String() != "0.0.0.0" || ips[1].String() != "::" || ips[2].String() != "127.0.0.1" {
		t.Errorf("parseIPs = %v", ips)
	}
	if _, err := parseIPs("0.0.0.0,"); err == nil {
		t.Error("parseIPs accepted an empty entry")
	}
}

// TestRecordFormat pins the JSON line format tests parse, and that
// record.Read reads back what the recorder writes.
func TestRecordFormat(t *testing.T) {
	var buf bytes.Buffer
	r := &recorder{w: &buf}
	in := []record.Record{
		{Listener: 15001, Proto: "tcp", Peer: "10.244.1.5:40000", OrigDst: "10.96.0.10:80", Method: record.MethodOrigDst,
			UID: 1337, GID: 1337, Upstream: "10.244.1.5:40001", Time: "2026-01-01T00:00:00Z"},
		{Listener: 15006, Proto: "tcp", Peer: "10.244.2.7:1234", Method: record.MethodNone, OrigDstError: "getsockopt SO_ORIGINAL_DST: no such file or directory",
			DialError: "dial tcp4 127.0.0.6:0->10.244.1.5:8080: connect: connection refused", Time: "2026-01-01T00:00:01Z"},
	}
	for _, rec := range in {
		if err := r.write(rec); err != nil {
			t.Fatal(err)
		}
	}
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want 2:\n%s", len(lines), buf.String())
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"listener", "proto", "peer", "orig_dst", "method", "uid", "gid", "upstream", "time"} {
		if _, ok := m[k]; !ok {
			t.Errorf("record lacks %q: %s", k, lines[0])
		}
	}
	if !strings.Contains(lines[1], "->") {
		t.Errorf("dial error HTML-escaped: %s", lines[1])
	}
	path := filepath.Join(t.TempDir(), "records.jsonl")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := record.Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || out[0] != in[0] || out[1] != in[1] {
		t.Errorf("read back %+v, want %+v", out, in)
	}
	if recs, err := record.Read(filepath.Join(t.TempDir(), "missing")); err != nil || recs != nil {
		t.Errorf("missing file: %v, %v", recs, err)
	}
}

// TestNotRedirected needs no root: a connection made straight to a
// listener (no REDIRECT) is recorded, never dialled (it would loop), and
// reset.
func TestNotRedirected(t *testing.T) {
	var buf syncBuffer
	p := &proxy{rec: &recorder{w: &buf}, log: log.New(io.Discard, "", 0)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lns, err := p.listenAll(ctx, []netip.Addr{netip.MustParseAddr("127.0.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(lns)
	for _, l := range lns {
		go p.serve(ctx, l)
	}
	out := lns[0] // outbound
	// The reset may beat connect(2)'s completion check: then the dial fails.
	peer := ""
	c, err := net.DialTimeout("tcp", out.addr.String(), 5*time.Second)
	switch {
	case errors.Is(err, syscall.ECONNRESET):
	case err != nil:
		t.Fatal(err)
	default:
		defer c.Close()
		peer = c.LocalAddr().String()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("read %d bytes from a connection that should be reset", n)
		}
	}
	var rec record.Record
	if err := json.Unmarshal(bytes.TrimSpace(buf.Bytes()), &rec); err != nil {
		t.Fatalf("record %q: %v", buf.String(), err)
	}
	if rec.Listener != int(out.addr.Port()) || rec.Proto != "tcp" || (peer != "" && rec.Peer != peer) ||
		rec.UID != os.Getuid() || rec.GID != os.Getgid() || rec.Upstream != "" {
		t.Errorf("record %+v", rec)
	}
	// With conntrack loaded SO_ORIGINAL_DST answers the unchanged
	// destination (the listener itself); without, it fails (ENOENT).
	switch {
	case rec.Method == record.MethodOrigDst && rec.OrigDst == out.addr.String():
		if !strings.Contains(rec.DialError, "not redirected") {
			t.Errorf("dial error %q, want not redirected", rec.DialError)
		}
	case rec.Method == record.MethodNone && rec.OrigDstError != "":
		if rec.DialError != "no original destination" {
			t.Errorf("dial error %q", rec.DialError)
		}
	default:
		t.Errorf("record %+v", rec)
	}
}

// syncBuffer is a bytes.Buffer safe to read while the proxy writes; Bytes
// waits (up to 5s) for the first write.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		out := append([]byte(nil), b.buf.Bytes()...)
		b.mu.Unlock()
		if len(out) > 0 || time.Now().After(deadline) {
			return out
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (b *syncBuffer) String() string { return string(b.Bytes()) }
