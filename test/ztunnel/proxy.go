package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

const (
	dialTimeout   = 5 * time.Second
	headerTimeout = 5 * time.Second
	// maxHeaderLen bounds the HBONE stand-in header line, newline included.
	maxHeaderLen = 512
)

// role is what a listener does with the connections it accepts.
type role int

const (
	roleOutbound role = iota // captured pod egress (15001)
	roleInbound              // captured plaintext pod ingress (15006)
	roleHBONE                // tunnelled ingress carrying a CONNECT header (15008)
)

func (r role) String() string {
	switch r {
	case roleOutbound:
		return "outbound"
	case roleInbound:
		return "inbound"
	case roleHBONE:
		return "hbone"
	}
	return fmt.Sprintf("role(%d)", int(r))
}

// recorder appends JSON lines; one Write per line under a mutex so that
// concurrent connections never interleave and readers only see whole lines.
type recorder struct {
	mu sync.Mutex
	w  io.Writer
}

func (r *recorder) write(rec record.Record) error {
	// No HTML escaping so dial errors stay greppable ("->", not "\u003e").
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(rec); err != nil { // Encode appends the '\n'
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	_, err := r.w.Write(buf.Bytes())
	return err
}

// dialFunc connects to dst. A valid src means "spoof the original client's
// IP as source"; the zero Addr means a plain dial from our own address.
type dialFunc func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)

// server holds the proxy configuration shared by all listeners.
type server struct {
	hboneCIDRs []netip.Prefix
	hbonePort  uint16 // port dialled on the remote side for HBONE
	dial       dialFunc
	rec        *recorder
	log        *log.Logger
	// self lists our own listener addresses; dialling one of them means the
	// connection reached us without being redirected and would loop forever.
	self map[netip.AddrPort]bool
}

// handle serves one accepted connection and returns when it is fully closed.
func (s *server) handle(ctx context.Context, c net.Conn, r role, listenerPort int) {
	defer c.Close()
	client := addrPort(c.RemoteAddr())
	origDst := addrPort(c.LocalAddr())
	rec := record.Record{
		Listener: listenerPort,
		Client:   client.String(),
		OrigDst:  origDst.String(),
		Time:     time.Now().UTC().Format(time.RFC3339Nano),
	}

	var (
		src    io.Reader = c // where client bytes come from (a bufio.Reader for HBONE)
		up     net.Conn
		header string
		err    error
	)
	switch r {
	case roleOutbound, roleInbound:
		target, spoof := origDst, client.Addr()
		if r == roleOutbound && s.isHBONE(origDst.Addr()) {
			target = netip.AddrPortFrom(origDst.Addr(), s.hbonePort)
			spoof = netip.Addr{}
			header = formatHeader(origDst, client)
			rec.HBONE = true
		}
		rec.Target = target.String()
		up, err = s.dialChecked(ctx, spoof, target)
	case roleHBONE:
		var br *bufio.Reader
		var target, hdrClient netip.AddrPort
		br, target, hdrClient, err = readHeader(c)
		if err != nil {
			err = fmt.Errorf("header: %w", err)
			break
		}
		src = br
		rec.Target = target.String()
		rec.HeaderClient = hdrClient.String()
		up, err = s.dialChecked(ctx, hdrClient.Addr(), target)
	default:
		err = fmt.Errorf("unknown role %v", r)
	}
	if err == nil && header != "" {
		if _, werr := io.WriteString(up, header); werr != nil {
			up.Close()
			err = fmt.Errorf("write header: %w", werr)
		}
	}
	if err != nil {
		rec.DialError = err.Error()
	}
	if werr := s.rec.write(rec); werr != nil {
		s.log.Printf("record: %v", werr)
	}
	s.log.Printf("%s listener=%d client=%s orig_dst=%s target=%s hbone=%t err=%q",
		r, listenerPort, rec.Client, rec.OrigDst, rec.Target, rec.HBONE, rec.DialError)
	if err != nil {
		resetClose(c)
		return
	}
	splice(c, src, up)
}

func (s *server) isHBONE(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range s.hboneCIDRs {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func (s *server) dialChecked(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	if s.self[dst] {
		return nil, fmt.Errorf("refusing to dial own listener %s (connection was not redirected)", dst)
	}
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	return s.dial(ctx, src, dst)
}

// readHeader reads the CONNECT line with a deadline. The returned reader must
// be used for the rest of the stream: it may hold bytes sent after the header.
func readHeader(c net.Conn) (*bufio.Reader, netip.AddrPort, netip.AddrPort, error) {
	if err := c.SetReadDeadline(time.Now().Add(headerTimeout)); err != nil {
		return nil, netip.AddrPort{}, netip.AddrPort{}, err
	}
	br := bufio.NewReaderSize(c, maxHeaderLen)
	line, err := br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		err = fmt.Errorf("line longer than %d bytes", maxHeaderLen)
	}
	if err != nil {
		return nil, netip.AddrPort{}, netip.AddrPort{}, err
	}
	target, client, err := parseHeader(string(line))
	if err != nil {
		return nil, netip.AddrPort{}, netip.AddrPort{}, err
	}
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		return nil, netip.AddrPort{}, netip.AddrPort{}, err
	}
	return br, target, client, nil
}

// parseHeader parses "CONNECT <target ip:port> <client ip:port>" with an
// optional trailing "\n" or "\r\n".
func parseHeader(line string) (target, client netip.AddrPort, err error) {
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	f := strings.Split(line, " ")
	if len(f) != 3 || f[0] != "CONNECT" {
		return target, client, fmt.Errorf("malformed header %q", line)
	}
	if target, err = netip.ParseAddrPort(f[1]); err != nil {
		return target, client, fmt.Errorf("target: %w", err)
	}
	if client, err = netip.ParseAddrPort(f[2]); err != nil {
		return target, client, fmt.Errorf("client: %w", err)
	}
	return target, client, nil
}

func formatHeader(target, client netip.AddrPort) string {
	return fmt.Sprintf("CONNECT %s %s\n", target, client)
}

// splice copies a→b (reading from aSrc, which wraps a) and b→a. A clean EOF
// is propagated as a half-close; an error aborts both directions, since the
// other copy could otherwise block forever. Both conns are closed on return.
func splice(a net.Conn, aSrc io.Reader, b net.Conn) {
	if aSrc == nil {
		aSrc = a
	}
	var once sync.Once
	abort := func() {
		once.Do(func() {
			resetClose(a)
			resetClose(b)
		})
	}
	pipe := func(dst net.Conn, src io.Reader) {
		if _, err := io.Copy(dst, src); err != nil {
			abort()
			return
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			if cw.CloseWrite() == nil {
				return
			}
		}
		// Without half-close support the only way to signal EOF is to close.
		abort()
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(b, aSrc) }()
	go func() { defer wg.Done(); pipe(a, b) }()
	wg.Wait()
	a.Close()
	b.Close()
}

// resetClose closes c with SO_LINGER 0 so the peer sees a RST, which is how a
// real proxy signals a failed upstream or an aborted stream.
func resetClose(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// sockoptControl returns a Control func setting the transparent (and
// optionally freebind) options plus SO_MARK when mark != 0.
func sockoptControl(transparent, freebind bool, mark int) func(network, address string, rc syscall.RawConn) error {
	return func(network, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			v6 := strings.HasSuffix(network, "6")
			set := func(level, opt int, name string) {
				if serr == nil {
					if e := unix.SetsockoptInt(int(fd), level, opt, 1); e != nil {
						serr = fmt.Errorf("setsockopt %s: %w", name, e)
					}
				}
			}
			if transparent {
				if v6 {
					set(unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT")
				} else {
					set(unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT")
				}
			}
			if freebind {
				if v6 {
					set(unix.SOL_IPV6, unix.IPV6_FREEBIND, "IPV6_FREEBIND")
				} else {
					set(unix.SOL_IP, unix.IP_FREEBIND, "IP_FREEBIND")
				}
			}
			if mark != 0 && serr == nil {
				if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark); e != nil {
					serr = fmt.Errorf("setsockopt SO_MARK: %w", e)
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// systemDial is the real dialFunc: spoofed dials bind the client's IP, which
// needs IP_TRANSPARENT (and FREEBIND since the IP is not local).
func systemDial(mark int) dialFunc {
	return func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
		d := net.Dialer{Timeout: dialTimeout}
		if src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
			d.Control = sockoptControl(true, true, mark)
		} else if mark != 0 {
			d.Control = sockoptControl(false, false, mark)
		}
		return d.DialContext(ctx, "tcp", dst.String())
	}
}
