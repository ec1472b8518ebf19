// Command test-ztunnel is a test double for Istio's ztunnel L4 proxy in
// node-level ambient mode. It runs inside the ztunnel pod's network namespace,
// accepts TPROXY-redirected connections (IPv4 on 127.0.0.1, IPv6 on ::1) and
// forwards them to their original destination, spoofing the original
// client's source IP. Connections to pods in --hbone-cidrs are tunnelled to
// <dst>:15008 with a one-line plaintext "CONNECT <dst> <client>" header
// standing in for HBONE.
//
// Every accepted connection is appended as one JSON line to --record-file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	var (
		recordFile = flag.String("record-file", "", "append one JSON line per accepted connection to this file (required)")
		readyFile  = flag.String("ready-file", "", "create this (empty) file once all listeners are bound")
		hboneCIDRs = flag.String("hbone-cidrs", "", "comma-separated CIDRs whose destinations are reached via <dst>:<hbone port> with a CONNECT header")
		listenIP   = flag.String("listen-ip", "127.0.0.1,::1", "comma-separated IPs the listeners bind to; one the netns lacks (e.g. ::1 with IPv6 disabled) is skipped")
		ports      = flag.String("ports", "15001,15006,15008", "outbound,inbound,hbone listener ports, in that order")
		mark       = flag.Int("mark", 0, "SO_MARK to set on upstream sockets (0 = none)")
		healthAddr = flag.String("health-addr", "", "serve GET /healthz/ready (200 once every listener is bound) here, e.g. :15021 as the real ztunnel; empty = none")
	)
	flag.Parse()
	logger := log.New(os.Stderr, "test-ztunnel: ", log.LstdFlags|log.Lmicroseconds)
	if err := run(*recordFile, *readyFile, *hboneCIDRs, *listenIP, *ports, *healthAddr, *mark, logger); err != nil {
		logger.Print(err)
		os.Exit(1)
	}
}

func run(recordFile, readyFile, cidrs, listenIPs, portList, healthAddr string, mark int, logger *log.Logger) error {
	if recordFile == "" {
		return errors.New("--record-file is required")
	}
	ips, err := parseIPs(listenIPs)
	if err != nil {
		return fmt.Errorf("--listen-ip: %w", err)
	}
	portNums, err := parsePorts(portList)
	if err != nil {
		return fmt.Errorf("--ports: %w", err)
	}
	prefixes, err := parseCIDRs(cidrs)
	if err != nil {
		return fmt.Errorf("--hbone-cidrs: %w", err)
	}
	// A stale ready file from a previous run would let tests start too early.
	if readyFile != "" {
		if err := os.Remove(readyFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}

	f, err := os.OpenFile(recordFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()

	s := &server{
		hboneCIDRs: prefixes,
		hbonePort:  portNums[roleHBONE],
		dial:       systemDial(mark),
		rec:        &recorder{w: f},
		log:        logger,
		self:       map[netip.AddrPort]bool{},
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	lns, err := listenAll(ctx, ips, portNums, logger)
	if err != nil {
		return err
	}
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for _, l := range lns {
		s.self[addrPort(l.Addr())] = true
	}
	if readyFile != "" {
		if err := os.WriteFile(readyFile, nil, 0o644); err != nil {
			return err
		}
	}
	// The kubelet probes a pod from the node, so a readiness check needs an
	// address outside the pod's loopback (the real ztunnel's is :15021).
	if healthAddr != "" {
		hl, err := net.Listen("tcp", healthAddr)
		if err != nil {
			return fmt.Errorf("--health-addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ready\n") })
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = hs.Serve(hl) }()
		defer hs.Close()
	}
	logger.Printf("listening on %v ports %v hbone-cidrs=%v", ips, portNums, prefixes)

	var wg sync.WaitGroup
	for _, l := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serve(ctx, l.Listener, l.role, int(l.port))
		}()
	}
	<-ctx.Done()
	logger.Print("signal received, shutting down")
	for _, l := range lns {
		l.Close()
	}
	wg.Wait()
	return nil
}

// listener is a bound transparent listener and what it serves.
type listener struct {
	net.Listener
	role role
	port uint16
}

// listenAll binds every port on every IP with IP(V6)_TRANSPARENT. An IP the
// kernel refuses (EAFNOSUPPORT: no IPv6; EADDRNOTAVAIL) is skipped, so that
// the default "127.0.0.1,::1" also works without IPv6.
func listenAll(ctx context.Context, ips []netip.Addr, ports []uint16, logger *log.Logger) ([]listener, error) {
	lc := net.ListenConfig{Control: sockoptControl(true, false, 0)}
	var out []listener
	closeAll := func(ls []listener) {
		for _, l := range ls {
			l.Close()
		}
	}
	for _, ip := range ips {
		var got []listener
		var skip error
		for i, p := range ports {
			addr := netip.AddrPortFrom(ip, p)
			ln, err := lc.Listen(ctx, "tcp", addr.String())
			if errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) {
				skip = err
				break
			}
			if err != nil {
				closeAll(got)
				closeAll(out)
				return nil, fmt.Errorf("listen %s: %w", addr, err)
			}
			got = append(got, listener{Listener: ln, role: role(i), port: p})
		}
		if skip != nil {
			closeAll(got)
			logger.Printf("not listening on %s: %v", ip, skip)
			continue
		}
		out = append(out, got...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no usable listen IP in %v", ips)
	}
	return out, nil
}

// serve accepts until the listener is closed. In-flight connections are not
// drained: the process exits right after shutdown, like a killed ztunnel.
func (s *server) serve(ctx context.Context, ln net.Listener, r role, port int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient (e.g. EMFILE): back off instead of spinning.
			s.log.Printf("accept on %d: %v", port, err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go s.handle(ctx, c, r, port)
	}
}

func parsePorts(s string) ([]uint16, error) {
	parts := strings.Split(s, ",")
	if len(parts) != 3 {
		return nil, fmt.Errorf("want 3 ports (outbound,inbound,hbone), got %q", s)
	}
	out := make([]uint16, 0, 3)
	for _, p := range parts {
		n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("bad port %q", p)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

func parseIPs(s string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, f := range strings.Split(s, ",") {
		ip, err := netip.ParseAddr(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		out = append(out, ip.Unmap())
	}
	return out, nil
}

func parseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, c := range strings.Split(s, ",") {
		c = strings.TrimSpace(c)
		if c == "" {
			continue
		}
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Masked())
	}
	return out, nil
}
