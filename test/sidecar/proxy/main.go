// Command test-sidecar-proxy is a test double for the Envoy sidecar of an
// Istio sidecar-mode pod. It runs inside the pod's network namespace as the
// proxy's identity, uid/gid 1337, which the pod's capture rules exempt; the
// test starts it so, with
//
//	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
//
// (test/sidecar/sidecartest.StartProxy does that and enters the netns). In
// --tproxy mode IP_TRANSPARENT needs CAP_NET_ADMIN, which Istio's injector
// adds to the sidecar for TPROXY: add AmbientCaps: []uintptr{unix.CAP_NET_ADMIN}.
//
// It listens on TCP 15001 (outbound) and 15006 (inbound) on 0.0.0.0 and [::]
// (a family the netns lacks is skipped) and optionally on UDP and TCP 15053
// (the DNS proxy's port; bound on 127.0.0.1 and ::1 as istio-agent's; it
// records the query and echoes it back). For each
// accepted connection it appends one JSON line (test/sidecar/record) to
// --record-file, then dials the original destination and splices bytes both
// ways:
//
//   - original destination: SO_ORIGINAL_DST (IPv4) / IP6T_SO_ORIGINAL_DST
//     (IPv6), the address before the nat REDIRECT; with --tproxy the inbound
//     listener's accepted socket's local address instead (TPROXY does not
//     rewrite it). Outbound stays on SO_ORIGINAL_DST in --tproxy mode, since
//     Istio's TPROXY mode keeps outbound on the nat REDIRECT.
//   - outbound (15001) dials from its own uid, with no source address: the
//     pod's rules must exempt uid/gid 1337 or the dial loops back to 15001
//     (seen as a record whose original destination is 15001 itself and a
//     refused dial).
//   - inbound (15006) dials from 127.0.0.6 (IPv4) or ::6 (IPv6), Envoy's
//     inbound passthrough bind addresses (Istio's pilot
//     InboundPassthroughBindIpv4/Ipv6), which the pod's rules return early
//     in ISTIO_OUTPUT ("-o lo -s 127.0.0.6/32" and "-s ::6/128"). 127.0.0.6
//     is on lo already (127/8); ::6 is not: istio-iptables adds ::6/128 to lo
//     when it writes IPv6 rules, so a rules writer that does not leaves the
//     IPv6 inbound dial failing with EADDRNOTAVAIL (recorded).
//   - inbound with --tproxy dials from the original client's address with
//     IP_TRANSPARENT and SO_MARK --tproxy-mark (1337), as Envoy's
//     original_src listener filter, which Istio adds in TPROXY mode, does.
//
// A connection whose original destination port is the listener's own port
// reached it without being redirected: it is recorded and reset, never
// dialled (it would loop).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

func main() {
	var (
		recordFile  = flag.String("record-file", "", "append one JSON line per accepted connection to this file (required)")
		readyFile   = flag.String("ready-file", "", "create this (empty) file once all listeners are bound")
		listenIP    = flag.String("listen-ip", "0.0.0.0,::", "comma-separated IPs the listeners bind to; one the netns lacks (no IPv6) is skipped")
		outbound    = flag.Int("outbound-port", 15001, "outbound listener port (Envoy's -p)")
		inbound     = flag.Int("inbound-port", 15006, "inbound listener port (Envoy's -z)")
		dnsPort     = flag.Int("dns-port", 0, "also listen on UDP and TCP here (15053 as istio-agent's DNS proxy), record and echo; 0 = no")
		tproxy      = flag.Bool("tproxy", false, "TPROXY mode: transparent listeners, inbound original destination from the local address, inbound dials spoof the client with --tproxy-mark")
		tproxyMark  = flag.Int("tproxy-mark", 1337, "SO_MARK of inbound upstream sockets in --tproxy mode (Envoy's original_src mark)")
		inboundSrcs = flag.String("inbound-source", "127.0.0.6,::6", "comma-separated source addresses, one per family, for inbound upstream dials (REDIRECT mode); empty = the kernel's choice")
	)
	flag.Parse()
	logger := log.New(os.Stderr, "test-sidecar-proxy: ", log.LstdFlags|log.Lmicroseconds)
	cfg := config{
		outboundPort: *outbound, inboundPort: *inbound, dnsPort: *dnsPort,
		tproxy: *tproxy, tproxyMark: *tproxyMark,
	}
	err := func() error {
		if *recordFile == "" {
			return errors.New("--record-file is required")
		}
		ips, err := parseIPs(*listenIP)
		if err != nil {
			return fmt.Errorf("--listen-ip: %w", err)
		}
		if cfg.inboundSrc4, cfg.inboundSrc6, err = parseSources(*inboundSrcs); err != nil {
			return fmt.Errorf("--inbound-source: %w", err)
		}
		for _, p := range []struct {
			name string
			v    int
		}{{"--outbound-port", cfg.outboundPort}, {"--inbound-port", cfg.inboundPort}} {
			if p.v <= 0 || p.v > 65535 {
				return fmt.Errorf("%s: bad port %d", p.name, p.v)
			}
		}
		if cfg.dnsPort < 0 || cfg.dnsPort > 65535 {
			return fmt.Errorf("--dns-port: bad port %d", cfg.dnsPort)
		}
		return run(*recordFile, *readyFile, ips, cfg, logger)
	}()
	if err != nil {
		logger.Print(err)
		os.Exit(1)
	}
}

func run(recordFile, readyFile string, ips []netip.Addr, cfg config, logger *log.Logger) error {
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

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	p := &proxy{cfg: cfg, rec: &recorder{w: f}, log: logger}
	lns, err := p.listenAll(ctx, ips)
	if err != nil {
		return err
	}
	defer closeAll(lns)
	if readyFile != "" {
		if err := os.WriteFile(readyFile, nil, 0o644); err != nil {
			return err
		}
	}
	logger.Printf("uid=%d gid=%d listening on %v: %s tproxy=%t", os.Getuid(), os.Getgid(), ips, describe(lns), cfg.tproxy)

	var wg sync.WaitGroup
	for _, l := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.serve(ctx, l)
		}()
	}
	<-ctx.Done()
	logger.Print("signal received, shutting down")
	closeAll(lns)
	wg.Wait()
	return nil
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

// parseSources reads "127.0.0.6,::6": at most one address per family, in any
// order; empty means none.
func parseSources(s string) (v4, v6 netip.Addr, err error) {
	if strings.TrimSpace(s) == "" {
		return v4, v6, nil
	}
	for _, f := range strings.Split(s, ",") {
		ip, err := netip.ParseAddr(strings.TrimSpace(f))
		if err != nil {
			return v4, v6, err
		}
		ip = ip.Unmap()
		dst := &v6
		if ip.Is4() {
			dst = &v4
		}
		if dst.IsValid() {
			return v4, v6, fmt.Errorf("two addresses of one family in %q", s)
		}
		*dst = ip
	}
	return v4, v6, nil
}

func describe(lns []listener) string {
	var parts []string
	for _, l := range lns {
		parts = append(parts, l.proto+"/"+l.addr.String()+"("+l.role.String()+")")
	}
	return strings.Join(parts, " ")
}

func (r role) String() string {
	switch r {
	case roleOutbound:
		return "outbound"
	case roleInbound:
		return "inbound"
	case roleDNS:
		return "dns"
	}
	return "role(" + strconv.Itoa(int(r)) + ")"
}
