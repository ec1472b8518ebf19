// Package record is the sidecar test proxy's record format: one JSON line per
// accepted connection (or, on the DNS port, per UDP datagram). The proxy
// (test/sidecar/proxy) writes it; tests read it.
package record

import ztrecord "github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"

// How the proxy learnt the original destination.
const (
	// MethodOrigDst is getsockopt SO_ORIGINAL_DST (IPv4) or
	// IP6T_SO_ORIGINAL_DST (IPv6): the destination before a nat REDIRECT.
	MethodOrigDst = "SO_ORIGINAL_DST"
	// MethodLocalAddr is the accepted socket's local address: TPROXY keeps
	// the destination unchanged, so the local address is the original one.
	MethodLocalAddr = "local-addr"
	// MethodNone: not known (a UDP datagram on the DNS port).
	MethodNone = "none"
)

// Record is one accepted connection (or UDP datagram).
type Record struct {
	// Listener is the port it arrived on: 15001 outbound, 15006 inbound,
	// 15053 DNS.
	Listener int `json:"listener"`
	// Proto is "tcp" or "udp".
	Proto string `json:"proto"`
	// Peer is the connection's remote address as the proxy sees it.
	Peer string `json:"peer"`
	// OrigDst is the original destination (ip:port), empty when not known;
	// Method says how it was found.
	OrigDst string `json:"orig_dst"`
	Method  string `json:"method"`
	// OrigDstError is why SO_ORIGINAL_DST failed (e.g. the connection
	// reached the listener without being redirected), if it did.
	OrigDstError string `json:"orig_dst_error,omitempty"`
	// UID and GID are the proxy process's own credentials when it accepted
	// the connection: tests check the proxy ran as 1337:1337, the identity
	// the pod's rules exempt.
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Upstream is the local address of the proxy's own upstream connection
	// (e.g. 127.0.0.6:port for inbound), empty when it was not dialled.
	Upstream string `json:"upstream,omitempty"`
	// DialError is why the upstream dial failed or was refused; empty on
	// success or when no dial was attempted (DNS).
	DialError string `json:"dial_error,omitempty"`
	Time      string `json:"time"`
}

// Read returns the records of a file; a missing file has none.
func Read(path string) ([]Record, error) { return ztrecord.ReadLines[Record](path) }
