//go:build linux

package netnstest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Listen opens a stream listener (e.g. network "tcp") on addr inside the
// named namespace. It is closed in t.Cleanup.
func Listen(t testing.TB, ns, network, addr string) net.Listener {
	t.Helper()
	l, err := listen(ns, network, addr)
	if err != nil {
		t.Fatalf("netnstest: listen %s %s in %s: %v", network, addr, ns, err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func listen(ns, network, addr string) (net.Listener, error) {
	if err := checkLiteral(addr); err != nil {
		return nil, err
	}
	var l net.Listener
	err := Do(ns, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenUDP opens a UDP socket bound to addr inside the named namespace. It
// is closed in t.Cleanup.
func ListenUDP(t testing.TB, ns, addr string) net.PacketConn {
	t.Helper()
	pc, err := listenUDP(ns, addr)
	if err != nil {
		t.Fatalf("netnstest: listen udp %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	return pc
}

func listenUDP(ns, addr string) (net.PacketConn, error) {
	if err := checkLiteral(addr); err != nil {
		return nil, err
	}
	var pc net.PacketConn
	err := Do(ns, func() error {
		var err error
		pc, err = net.ListenPacket("udp", addr)
		return err
	})
	return pc, err
}

// Dial connects to addr from inside the named namespace.
func Dial(ns, network, addr string, timeout time.Duration) (net.Conn, error) {
	return DialFrom(ns, network, "", addr, timeout)
}

// DialFrom connects to raddr from inside the named namespace, binding the
// local end to laddr (e.g. "10.244.1.2:0"); an empty laddr lets the kernel
// choose.
func DialFrom(ns, network, laddr, raddr string, timeout time.Duration) (net.Conn, error) {
	if err := checkLiteral(raddr); err != nil {
		return nil, err
	}
	if err := checkLiteral(laddr); err != nil {
		return nil, err
	}
	d := net.Dialer{Timeout: timeout}
	if laddr != "" {
		var err error
		switch network {
		case "tcp", "tcp4", "tcp6":
			d.LocalAddr, err = net.ResolveTCPAddr(network, laddr)
		case "udp", "udp4", "udp6":
			d.LocalAddr, err = net.ResolveUDPAddr(network, laddr)
		default:
			err = fmt.Errorf("unsupported network %q for a local address", network)
		}
		if err != nil {
			return nil, fmt.Errorf("netnstest: local address %q: %w", laddr, err)
		}
	}
	var c net.Conn
	err := Do(ns, func() error {
		var err error
		c, err = d.Dial(network, raddr)
		return err
	})
	return c, err
}

// EchoServer starts a TCP echo server on addr inside the named namespace.
// Every connection gets its bytes echoed back until the client half-closes
// (EOF), after which the server closes the connection. The returned stop
// function (also run in t.Cleanup; idempotent) closes the listener and all
// open connections and waits for the handlers.
func EchoServer(t testing.TB, ns, addr string) (stop func()) {
	t.Helper()
	l, err := listen(ns, "tcp", addr)
	if err != nil {
		t.Fatalf("netnstest: echo server %s in %s: %v", addr, ns, err)
	}
	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		wg    sync.WaitGroup
		done  bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if done {
				mu.Unlock()
				_ = c.Close()
				return
			}
			conns[c] = struct{}{}
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					_ = c.Close()
				}()
				_, _ = io.Copy(c, c)
				if cw, ok := c.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
			}()
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			mu.Lock()
			done = true
			_ = l.Close()
			for c := range conns {
				_ = c.Close()
			}
			mu.Unlock()
			wg.Wait()
		})
	}
	t.Cleanup(stop)
	return stop
}

// Serve listens on addr (TCP) inside the named namespace and calls handle
// with every connection it accepts, one after the other, until the test
// ends (t.Cleanup closes the listener).
func Serve(t testing.TB, ns, addr string, handle func(net.Conn)) {
	t.Helper()
	l := Listen(t, ns, "tcp", addr)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
}

// WhoAmI answers every connection on addr in ns with the peer's address
// (host:port), then closes it: what a server sees as the source.
func WhoAmI(t testing.TB, ns, addr string) {
	t.Helper()
	Serve(t, ns, addr, func(c net.Conn) {
		fmt.Fprint(c, c.RemoteAddr().String())
		c.Close()
	})
}

// UDPEcho starts a UDP echo server on addr inside the named namespace: each
// datagram is sent back to its sender. stop (also run in t.Cleanup;
// idempotent) closes the socket and waits for the server goroutine.
func UDPEcho(t testing.TB, ns, addr string) (stop func()) {
	t.Helper()
	pc, err := listenUDP(ns, addr)
	if err != nil {
		t.Fatalf("netnstest: udp echo %s in %s: %v", addr, ns, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue // e.g. ICMP errors reported on the socket
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = pc.Close()
			<-done
		})
	}
	t.Cleanup(stop)
	return stop
}

// RoundTrip dials addr over TCP from inside the named namespace, writes
// payload, half-closes, and returns everything read until EOF. timeout bounds
// the whole exchange.
func RoundTrip(ns, addr string, payload []byte, timeout time.Duration) ([]byte, error) {
	return RoundTripFrom(ns, "", addr, payload, timeout)
}

// RoundTripFrom is RoundTrip with the local address bound to laddr.
func RoundTripFrom(ns, laddr, addr string, payload []byte, timeout time.Duration) ([]byte, error) {
	deadline := time.Now().Add(timeout)
	c, err := DialFrom(ns, "tcp", laddr, addr, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := c.Write(payload); err != nil {
		return nil, fmt.Errorf("write: %w", err)
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return nil, fmt.Errorf("close write: %w", err)
		}
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return b, fmt.Errorf("read: %w", err)
	}
	return b, nil
}

// UDPRoundTrip sends payload as one datagram to addr from inside the named
// namespace and returns the first datagram received back.
func UDPRoundTrip(ns, addr string, payload []byte, timeout time.Duration) ([]byte, error) {
	deadline := time.Now().Add(timeout)
	c, err := Dial(ns, "udp", addr, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := c.Write(payload); err != nil {
		return nil, fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	return buf[:n], nil
}
