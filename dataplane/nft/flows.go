package nft

// Flow maps: a TCP connection's 4-tuple mapped to a mark, written from
// the packet path by our own rules. They stand in for conntrack where a
// connection must stay out of it (no other table's NAT or state checks
// see it) yet its later packets must still follow its first one.

import (
	"fmt"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// FlowTimeout is how long an idle flow is remembered; every packet of
// either direction renews it.
const FlowTimeout = 24 * time.Hour

// flowMapSize bounds a flow map (about 100 bytes an entry).
const flowMapSize = 1 << 18

const (
	regKey  = unix.NFT_REG32_00 // the 4-tuple: up to 10 32-bit registers (IPv6)
	regData = unix.NFT_REG32_12 // the mark, past the longest key
	opDel   = 2                 // NFT_DYNSET_OP_DELETE
)

func (s Set) flowMap(t *nftables.Table) *nftables.Set {
	addr := nftables.TypeIPAddr
	if s.V6 {
		addr = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: s.Name, IsMap: true, Dynamic: true, HasTimeout: true, Timeout: FlowTimeout,
		Concatenation: true, Size: flowMapSize, DataType: nftables.TypeMark,
		KeyType: nftables.MustConcatSetType(addr, nftables.TypeInetService, addr, nftables.TypeInetService)}
}

// flowKey loads a TCP packet's 4-tuple, client side first: the packet's
// source first, or (reply) its destination first.
func flowKey(v6, reply bool) (string, []expr.Any) {
	size, src, dst, name := uint32(4), uint32(12), uint32(16), "ip"
	if v6 {
		size, src, dst, name = 16, 8, 24, "ip6"
	}
	text := fmt.Sprintf("%s saddr . tcp sport . %s daddr . tcp dport", name, name)
	sport, dport := uint32(0), uint32(2)
	if reply {
		src, dst, sport, dport = dst, src, dport, sport
		text = fmt.Sprintf("%s daddr . tcp dport . %s saddr . tcp sport", name, name)
	}
	regs := size / 4
	return text, []expr.Any{
		&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: size},
		&expr.Payload{DestRegister: regKey + regs, Base: expr.PayloadBaseTransportHeader, Offset: sport, Len: 2},
		&expr.Payload{DestRegister: regKey + regs + 1, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: size},
		&expr.Payload{DestRegister: regKey + 2*regs + 1, Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
	}
}

// RememberFlow maps the packet's 4-tuple to mark in the flow map s,
// replacing what an older connection on the same 4-tuple left there.
func RememberFlow(s Set, mark uint32) Term {
	text, key := flowKey(s.V6, false)
	return Term{fmt.Sprintf("update @%s { %s : %#x }", s.Name, text, mark), append(key,
		&expr.Dynset{SrcRegKey: regKey, Operation: opDel, SetName: s.Name},
		&expr.Immediate{Register: regData, Data: ne32(mark)},
		&expr.Dynset{SrcRegKey: regKey, SrcRegData: regData, Operation: unix.NFT_DYNSET_OP_ADD, SetName: s.Name})}
}

// FollowFlow matches a packet of a remembered flow (reply: one going the
// other way), renews the flow and, unless reply, sets the packet's mark
// to the flow's.
func FollowFlow(s Set, reply bool) Term {
	text, key := flowKey(s.V6, reply)
	exprs := append(key,
		&expr.Lookup{SourceRegister: regKey, DestRegister: regData, IsDestRegSet: true, SetName: s.Name},
		&expr.Dynset{SrcRegKey: regKey, SrcRegData: regData, Operation: unix.NFT_DYNSET_OP_UPDATE, SetName: s.Name})
	if reply {
		return Term{fmt.Sprintf("%s @%s update", text, s.Name), exprs}
	}
	return Term{fmt.Sprintf("meta mark set %s map @%s update", text, s.Name),
		append(exprs, &expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: regData})}
}
