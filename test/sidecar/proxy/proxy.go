package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/test/sidecar/record"
)

const (
	dialTimeout = 5 * time.Second
	// loopWait bounds how long an accepted connection waits for the proxy's
	// own in-flight dials to finish before deciding it is not one of them.
	loopWait = 500 * time.Millisecond
	// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/
	// ip6_tables.h), getsockopt at SOL_IPV6; x/sys/unix does not name it.
	ip6tSOOriginalDst = 80
)

// role is what a listener does with what it accepts.
type role int

const (
	roleOutbound role = iota // captured app egress (15001)
	roleInbound              // captured pod ingress (15006)
	roleDNS                  // captured DNS (15053): record and echo
)

type config struct {
	outboundPort, inboundPort, dnsPort int
	tproxy                             bool
	tproxyMark                         int
	// inboundSrc4/6: source of inbound upstream dials (REDIRECT mode).
	inboundSrc4, inboundSrc6 netip.Addr
}

type proxy struct {
	cfg config
	rec *recorder
	log *log.Logger

	mu sync.Mutex
	// upstreams are the local addresses of our own live upstream
	// connections; one showing up as the peer of an accepted connection
	// means the pod's rules captured the proxy's own traffic (a loop).
	upstreams map[netip.AddrPort]bool
	inflight  int // dials not yet returned
}

// listener is one bound socket and what it serves.
type listener struct {
	proto string // "tcp" or "udp"
	addr  netip.AddrPort
	role  role
	tcp   net.Listener
	udp   net.PacketConn
}

func (l listener) Close() error {
	if l.tcp != nil {
		return l.tcp.Close()
	}
	return l.udp.Close()
}

func closeAll(ls []listener) {
	for _, l := range ls {
		_ = l.Close()
	}
}

// listenAll binds every port on every IP. An IP the kernel refuses
// (EAFNOSUPPORT: no IPv6 at all; EADDRNOTAVAIL) is skipped, so the default
// "0.0.0.0,::" also works without IPv6. The two families get separate
// sockets (tcp6 sets IPV6_V6ONLY), as Envoy binds them.
func (p *proxy) listenAll(ctx context.Context, ips []netip.Addr) ([]listener, error) {
	type want struct {
		proto string
		port  int
		role  role
	}
	wants := []want{{"tcp", p.cfg.outboundPort, roleOutbound}, {"tcp", p.cfg.inboundPort, roleInbound}}
	if p.cfg.dnsPort != 0 {
		wants = append(wants, want{"tcp", p.cfg.dnsPort, roleDNS}, want{"udp", p.cfg.dnsPort, roleDNS})
	}
	lc := net.ListenConfig{}
	if p.cfg.tproxy {
		lc.Control = sockopts(true, 0)
	}
	var out []listener
	for _, ip := range ips {
		var got []listener
		var skip error
		for _, w := range wants {
			addr := netip.AddrPortFrom(ip, uint16(w.port))
			if w.role == roleDNS && ip.IsUnspecified() {
				// As istio-agent's DNS proxy: on loopback, where a nat
				// REDIRECT in OUTPUT sends the query (127.0.0.1 / ::1), so
				// UDP replies leave from the address conntrack un-NATs.
				addr = netip.AddrPortFrom(loopback(ip), uint16(w.port))
			}
			network := w.proto + "4"
			if ip.Is6() {
				network = w.proto + "6"
			}
			l := listener{proto: w.proto, addr: addr, role: w.role}
			var err error
			if w.proto == "tcp" {
				l.tcp, err = lc.Listen(ctx, network, addr.String())
			} else {
				l.udp, err = lc.ListenPacket(ctx, network, addr.String())
			}
			if errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) {
				skip = err
				break
			}
			if err != nil {
				closeAll(got)
				closeAll(out)
				if errors.Is(err, syscall.EPERM) && p.cfg.tproxy {
					err = fmt.Errorf("%w (IP_TRANSPARENT needs CAP_NET_ADMIN: start the proxy with AmbientCaps)", err)
				}
				return nil, fmt.Errorf("listen %s %s: %w", w.proto, addr, err)
			}
			if l.tcp != nil { // the bound port, should w.port be 0 (tests)
				l.addr = addrPort(l.tcp.Addr())
			} else {
				l.addr = addrPort(l.udp.LocalAddr())
			}
			got = append(got, l)
		}
		if skip != nil {
			closeAll(got)
			p.log.Printf("not listening on %s: %v", ip, skip)
			continue
		}
		out = append(out, got...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no usable listen IP in %v", ips)
	}
	return out, nil
}

func loopback(ip netip.Addr) netip.Addr {
	if ip.Is4() {
		return netip.MustParseAddr("127.0.0.1")
	}
	return netip.IPv6Loopback()
}

// serve accepts (or reads datagrams) until the listener is closed.
// In-flight connections are not drained: the process exits right after.
func (p *proxy) serve(ctx context.Context, l listener) {
	if l.udp != nil {
		p.serveUDP(l)
		return
	}
	for {
		c, err := l.tcp.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.log.Printf("accept on %s: %v", l.addr, err) // e.g. EMFILE: back off
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go p.handle(ctx, c.(*net.TCPConn), l)
	}
}

func (p *proxy) newRecord(l listener, proto string, peer netip.AddrPort) record.Record {
	return record.Record{
		Listener: int(l.addr.Port()),
		Proto:    proto,
		Peer:     peer.String(),
		Method:   record.MethodNone,
		UID:      os.Getuid(),
		GID:      os.Getgid(),
		Time:     time.Now().UTC().Format(time.RFC3339Nano),
	}
}

// handle serves one accepted TCP connection until both directions close.
func (p *proxy) handle(ctx context.Context, c *net.TCPConn, l listener) {
	defer c.Close()
	peer := addrPort(c.RemoteAddr())
	rec := p.newRecord(l, "tcp", peer)

	var dst netip.AddrPort
	if l.role == roleInbound && p.cfg.tproxy {
		dst, rec.Method = addrPort(c.LocalAddr()), record.MethodLocalAddr
	} else if d, err := originalDst(c); err != nil {
		rec.OrigDstError = err.Error()
	} else {
		dst, rec.Method = d, record.MethodOrigDst
	}
	if dst.IsValid() {
		rec.OrigDst = dst.String()
	}

	if l.role == roleDNS {
		p.write(rec)
		_, _ = io.Copy(c, c) // echo until the client closes
		return
	}

	var up *net.TCPConn
	var err error
	switch {
	case p.isOwnUpstream(peer):
		err = fmt.Errorf("loop: the proxy's own upstream connection from %s was captured", peer)
	case !dst.IsValid():
		err = errors.New("no original destination")
	case dst.Port() == l.addr.Port():
		err = fmt.Errorf("not redirected: original destination %s is the listener itself", dst)
	default:
		up, err = p.dial(ctx, l.role, peer, dst)
	}
	if err != nil {
		rec.DialError = err.Error()
	} else {
		rec.Upstream = addrPort(up.LocalAddr()).String()
	}
	p.write(rec)
	if err != nil {
		resetClose(c)
		return
	}
	defer p.forget(addrPort(up.LocalAddr()))
	splice(c, up)
}

func (p *proxy) serveUDP(l listener) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := l.udp.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.log.Printf("read on udp %s: %v", l.addr, err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		// An unconnected UDP socket has no conntrack entry to ask for the
		// original destination; the port it arrived on is what counts.
		p.write(p.newRecord(l, "udp", addrPort(from)))
		if _, err := l.udp.WriteTo(buf[:n], from); err != nil {
			p.log.Printf("echo to %s: %v", from, err)
		}
	}
}

func (p *proxy) write(rec record.Record) {
	if err := p.rec.write(rec); err != nil {
		p.log.Printf("record: %v", err)
	}
	p.log.Printf("%s/%d peer=%s orig_dst=%s (%s%s) upstream=%s err=%q",
		rec.Proto, rec.Listener, rec.Peer, rec.OrigDst, rec.Method, rec.OrigDstError, rec.Upstream, rec.DialError)
}

// dial connects to the original destination as Envoy would:
// outbound from wherever the kernel chooses, inbound from the passthrough
// source (REDIRECT) or from the spoofed client with the mark (TPROXY).
func (p *proxy) dial(ctx context.Context, r role, peer, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	if r == roleInbound {
		if p.cfg.tproxy {
			d.LocalAddr = &net.TCPAddr{IP: peer.Addr().AsSlice()}
			d.Control = sockopts(true, p.cfg.tproxyMark)
		} else if src := p.inboundSource(dst.Addr()); src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
	}
	network := "tcp4"
	if dst.Addr().Is6() {
		network = "tcp6"
	}
	p.mu.Lock()
	p.inflight++
	p.mu.Unlock()
	c, err := d.DialContext(ctx, network, dst.String())
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inflight--
	if err != nil {
		return nil, err
	}
	if p.upstreams == nil {
		p.upstreams = map[netip.AddrPort]bool{}
	}
	p.upstreams[addrPort(c.LocalAddr())] = true
	return c.(*net.TCPConn), nil
}

func (p *proxy) inboundSource(dst netip.Addr) netip.Addr {
	if dst.Is4() {
		return p.cfg.inboundSrc4
	}
	return p.cfg.inboundSrc6
}

// isOwnUpstream reports whether peer is the local address of one of our own
// upstream connections. The kernel completes a captured dial before Dial
// returns, so while dials are in flight it waits for them (up to loopWait).
func (p *proxy) isOwnUpstream(peer netip.AddrPort) bool {
	deadline := time.Now().Add(loopWait)
	for {
		p.mu.Lock()
		own, inflight := p.upstreams[peer], p.inflight
		p.mu.Unlock()
		if own || inflight == 0 || time.Now().After(deadline) {
			return own
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (p *proxy) forget(a netip.AddrPort) {
	p.mu.Lock()
	delete(p.upstreams, a)
	p.mu.Unlock()
}

// originalDst returns the destination of c before a nat REDIRECT, from
// conntrack: SO_ORIGINAL_DST at SOL_IP (a sockaddr_in) on IPv4 sockets,
// IP6T_SO_ORIGINAL_DST at SOL_IPV6 (a sockaddr_in6) on IPv6 ones.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	level, opt, name := unix.SOL_IP, unix.SO_ORIGINAL_DST, "SO_ORIGINAL_DST"
	if addrPort(c.LocalAddr()).Addr().Is6() {
		level, opt, name = unix.SOL_IPV6, ip6tSOOriginalDst, "IP6T_SO_ORIGINAL_DST"
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var b []byte
	var serr error
	if err := rc.Control(func(fd uintptr) { b, serr = getsockoptBytes(int(fd), level, opt, unix.SizeofSockaddrInet6) }); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt %s: %w", name, serr)
	}
	return parseSockaddr(b)
}

// getsockoptBytes is getsockopt(2) into a buffer of size bytes.
func getsockoptBytes(fd, level, opt, size int) ([]byte, error) {
	buf := make([]byte, size)
	l := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return nil, errno
	}
	return buf[:l], nil
}

// parseSockaddr decodes a raw sockaddr_in or sockaddr_in6: the family in
// host byte order, the port and address in network byte order.
func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("sockaddr of %d bytes", len(b))
	}
	fam := binary.NativeEndian.Uint16(b[0:2])
	switch fam {
	case unix.AF_INET:
		if len(b) < unix.SizeofSockaddrInet4 {
			return netip.AddrPort{}, fmt.Errorf("sockaddr_in of %d bytes", len(b))
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), nil
	case unix.AF_INET6:
		if len(b) < unix.SizeofSockaddrInet6 {
			return netip.AddrPort{}, fmt.Errorf("sockaddr_in6 of %d bytes", len(b))
		}
		// A mapped address stays mapped on the wire; callers compare
		// unmapped addresses.
		ip := netip.AddrFrom16([16]byte(b[8:24])).Unmap()
		return netip.AddrPortFrom(ip, binary.BigEndian.Uint16(b[2:4])), nil
	}
	return netip.AddrPort{}, fmt.Errorf("unknown address family %d", fam)
}

// sockopts returns a Control func setting IP(V6)_TRANSPARENT when
// transparent and SO_MARK when mark != 0.
func sockopts(transparent bool, mark int) func(network, address string, rc syscall.RawConn) error {
	return func(network, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if transparent {
				level, opt, name := unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT"
				if network[len(network)-1] == '6' {
					level, opt, name = unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"
				}
				if e := unix.SetsockoptInt(int(fd), level, opt, 1); e != nil {
					serr = fmt.Errorf("setsockopt %s: %w", name, e)
					return
				}
			}
			if mark != 0 {
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

// recorder appends JSON lines; one Write per line under a mutex so that
// concurrent connections never interleave and readers only see whole lines.
type recorder struct {
	mu sync.Mutex
	w  io.Writer
}

func (r *recorder) write(rec record.Record) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // keep "->" in errors greppable
	if err := enc.Encode(rec); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	_, err := r.w.Write(buf.Bytes())
	return err
}

// splice copies both ways; a clean EOF is passed on as a half-close, an
// error aborts both directions with a reset. Both are closed on return.
func splice(a, b *net.TCPConn) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			resetClose(a)
			resetClose(b)
		})
	}
	pipe := func(dst, src *net.TCPConn) {
		if _, err := io.Copy(dst, src); err != nil {
			abort()
			return
		}
		if dst.CloseWrite() != nil {
			abort()
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(b, a) }()
	go func() { defer wg.Done(); pipe(a, b) }()
	wg.Wait()
	a.Close()
	b.Close()
}

// resetClose closes c with SO_LINGER 0 so the peer sees a RST, as a proxy
// signals a failed upstream.
func resetClose(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

func addrPort(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	case *net.UDPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
