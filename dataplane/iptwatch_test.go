package dataplane

import (
	"encoding/binary"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// nftEvent builds an nf_tables event as the kernel sends it.
func nftEvent(family uint8, msg uint16, attrs map[uint16]string) syscall.NetlinkMessage {
	data := []byte{family, 0, 0, 0}
	for _, typ := range []uint16{1, 2, 3} {
		v, ok := attrs[typ]
		if !ok {
			continue
		}
		a := make([]byte, 4, 4+len(v)+4)
		binary.NativeEndian.PutUint16(a[0:2], uint16(4+len(v)+1))
		binary.NativeEndian.PutUint16(a[2:4], typ)
		a = append(a, v...)
		a = append(a, 0)
		for len(a)%4 != 0 {
			a = append(a, 0)
		}
		data = append(data, a...)
	}
	return syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: unix.NFNL_SUBSYS_NFTABLES<<8 | msg}, Data: data}
}

func TestTouchesBuiltinChain(t *testing.T) {
	rule := func(table, chain string) map[uint16]string {
		return map[uint16]string{unix.NFTA_RULE_TABLE: table, unix.NFTA_RULE_CHAIN: chain}
	}
	for _, c := range []struct {
		name string
		m    syscall.NetlinkMessage
		want bool
	}{
		{"rule added to nat PREROUTING", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_NEWRULE, rule("nat", "PREROUTING")), true},
		{"rule deleted from mangle OUTPUT", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_DELRULE, rule("mangle", "OUTPUT")), true},
		{"rule in filter FORWARD", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_NEWRULE, rule("filter", "FORWARD")), true},
		{"kube-proxy's own chain", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_NEWRULE, rule("nat", "KUBE-SERVICES")), false},
		{"our own chain", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_NEWRULE, rule("nat", "ztunnel-PREROUTING")), false},
		{"a native nftables table", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_NEWRULE, rule("kube-proxy", "nat-prerouting")), false},
		{"ip6 family", nftEvent(unix.NFPROTO_IPV6, unix.NFT_MSG_NEWRULE, rule("nat", "PREROUTING")), true},
		{"bridge family", nftEvent(unix.NFPROTO_BRIDGE, unix.NFT_MSG_NEWRULE, rule("nat", "PREROUTING")), false},
		{"built-in chain deleted", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_DELCHAIN, map[uint16]string{unix.NFTA_CHAIN_TABLE: "nat", unix.NFTA_CHAIN_NAME: "PREROUTING"}), true},
		{"table deleted", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_DELTABLE, map[uint16]string{unix.NFTA_TABLE_NAME: "mangle"}), true},
		{"new generation", nftEvent(unix.NFPROTO_IPV4, unix.NFT_MSG_NEWGEN, nil), false},
	} {
		if got := touchesBuiltinChain(c.m); got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, got, c.want)
		}
	}
}
