package nft

// Flow maps: a TCP connection's 4-tuple mapped to a mark, written from
// the packet path by our own rules. They stand in for conntrack where a
// connection must stay out of it (no other table's NAT or state checks
// see it) yet its later packets must still follow its first one. The
// expressions are laid out as nft lays them out, so that `nft list
// ruleset` prints them.

import (
	"fmt"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Flow lifetimes: a flow is remembered for FlowIdle after its last packet
// from the client, and for FlowClosing after its first packet (a SYN yet
// unanswered) or a FIN or RST, as conntrack's TCP timeouts do.
const (
	FlowIdle    = 24 * time.Hour
	FlowClosing = 2 * time.Minute
)

// flowMapSize bounds a flow map (about 100 bytes an entry).
const flowMapSize = 1 << 18

const opDel = 2 // NFT_DYNSET_OP_DELETE

func (s Set) flowMap(t *nftables.Table) *nftables.Set {
	addr := nftables.TypeIPAddr
	if s.V6 {
		addr = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: s.Name, IsMap: true, Dynamic: true, HasTimeout: true, Timeout: FlowIdle,
		Concatenation: true, Size: flowMapSize, DataType: nftables.TypeMark,
		KeyType: nftables.MustConcatSetType(addr, nftables.TypeInetService, addr, nftables.TypeInetService)}
}

// flowKey loads a TCP packet's 4-tuple into register 1 on, client side
// first: the packet's source first, or (reply) its destination first.
func flowKey(v6, reply bool) (string, []expr.Any) {
	units, src, dst, name := uint32(1), uint32(12), uint32(16), "ip"
	if v6 {
		units, src, dst, name = 4, 8, 24, "ip6"
	}
	sport, dport := uint32(0), uint32(2)
	text := fmt.Sprintf("%s saddr . tcp sport . %s daddr . tcp dport", name, name)
	if reply {
		src, dst, sport, dport = dst, src, dport, sport
		text = fmt.Sprintf("%s daddr . tcp dport . %s saddr . tcp sport", name, name)
	}
	reg32 := func(unit uint32) uint32 { return unix.NFT_REG32_00 + unit }
	return text, []expr.Any{
		&expr.Payload{DestRegister: unix.NFT_REG_1, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: units * 4},
		&expr.Payload{DestRegister: reg32(units), Base: expr.PayloadBaseTransportHeader, Offset: sport, Len: 2},
		&expr.Payload{DestRegister: reg32(units + 1), Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: units * 4},
		&expr.Payload{DestRegister: reg32(2*units + 1), Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
	}
}

// dataReg is the first register past the key.
func dataReg(v6 bool) uint32 {
	if v6 {
		return unix.NFT_REG_4
	}
	return unix.NFT_REG_2
}

// flowOp applies a dynset operation to the packet's 4-tuple with mark as
// the value (timeout 0: the map's).
func flowOp(s Set, op uint32, verb string, mark uint32, timeout time.Duration) Term {
	text, key := flowKey(s.V6, false)
	t := ""
	if timeout > 0 {
		t = fmt.Sprintf(" timeout %s", timeout)
	}
	reg := dataReg(s.V6)
	return Term{fmt.Sprintf("%s @%s { %s%s : %#x }", verb, s.Name, text, t, mark), append(key,
		&expr.Immediate{Register: reg, Data: ne32(mark)},
		&expr.Dynset{SrcRegKey: unix.NFT_REG_1, SrcRegData: reg, Operation: op, SetName: s.Name, Timeout: timeout})}
}

// ForgetFlow deletes the packet's 4-tuple from the flow map s.
func ForgetFlow(s Set, mark uint32) Term { return flowOp(s, opDel, "delete", mark, 0) }

// RememberFlow adds the packet's 4-tuple with mark to the flow map s for
// timeout.
func RememberFlow(s Set, mark uint32, timeout time.Duration) Term {
	return flowOp(s, unix.NFT_DYNSET_OP_ADD, "add", mark, timeout)
}

// RenewFlow gives the packet's flow (whose mark is mark) timeout more (0:
// the map's).
func RenewFlow(s Set, mark uint32, timeout time.Duration) Term {
	return flowOp(s, unix.NFT_DYNSET_OP_UPDATE, "update", mark, timeout)
}

// MarkFromFlow matches a packet of a remembered flow and sets its mark to
// the flow's.
func MarkFromFlow(s Set) Term {
	text, key := flowKey(s.V6, false)
	return Term{fmt.Sprintf("meta mark set %s map @%s", text, s.Name), append(key,
		&expr.Lookup{SourceRegister: unix.NFT_REG_1, DestRegister: unix.NFT_REG_1, IsDestRegSet: true, SetName: s.Name},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: unix.NFT_REG_1})}
}

// ReplyOfFlow matches a packet going the other way of a remembered flow.
func ReplyOfFlow(s Set) Term {
	text, key := flowKey(s.V6, true)
	return Term{fmt.Sprintf("%s @%s", text, s.Name), append(key, &expr.Lookup{SourceRegister: unix.NFT_REG_1, SetName: s.Name})}
}

// FinOrRst matches a TCP packet with FIN or RST; a TCP term must come first.
func FinOrRst() Term {
	return Term{"tcp flags & (fin|rst) != 0", []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x01 | 0x04}, Xor: []byte{0}},
		cmpOp(true, []byte{0})}}
}
