package nft

// Terms on marks, conntrack, sets and NAT: what the node's tables need
// beyond a sidecar pod's.

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

func masked(reg uint32, mask uint32) expr.Any {
	return &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: ne32(mask), Xor: ne32(0)}
}

// MarkHas matches packets whose mark has every bit of v.
func MarkHas(v uint32) Term { return MarkMasked(v, v) }

// MarkMasked matches packets whose mark's bits of mask are v.
func MarkMasked(v, mask uint32) Term {
	return Term{fmt.Sprintf("meta mark & %#x == %#x", mask, v), []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, masked(1, mask), cmpEq(ne32(v))}}
}

// CtMarkHas matches packets whose connection mark has every bit of v.
func CtMarkHas(v uint32) Term {
	return Term{fmt.Sprintf("ct mark & %#x == %#x", v, v), []expr.Any{&expr.Ct{Key: expr.CtKeyMARK, Register: 1}, masked(1, v), cmpEq(ne32(v))}}
}

// CtMarkLacks matches packets whose connection mark lacks a bit of v.
func CtMarkLacks(v uint32) Term {
	return Term{fmt.Sprintf("ct mark & %#x != %#x", v, v), []expr.Any{&expr.Ct{Key: expr.CtKeyMARK, Register: 1}, masked(1, v), cmpOp(true, ne32(v))}}
}

// xset is iptables' --set-xmark v/mask: the bits of mask cleared, then v
// xored in.
func xset(key string, load, store expr.Any, v, mask uint32) Term {
	var text string
	switch v {
	case mask:
		text = fmt.Sprintf("%s set %s | %#x", key, key, v)
	case 0:
		text = fmt.Sprintf("%s set %s & %#x", key, key, ^mask)
	default:
		text = fmt.Sprintf("%s set %s & %#x ^ %#x", key, key, ^mask, v)
	}
	return Term{text, []expr.Any{load, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne32(^mask), Xor: ne32(v)}, store}}
}

// SetMarkX sets the mark's bits of mask to v (iptables' MARK --set-xmark v/mask).
func SetMarkX(v, mask uint32) Term {
	return xset("meta mark", &expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, &expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}, v, mask)
}

// SetCtMarkX sets the connection mark's bits of mask to v.
func SetCtMarkX(v, mask uint32) Term {
	return xset("ct mark", &expr.Ct{Key: expr.CtKeyMARK, Register: 1}, &expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1}, v, mask)
}

// Syn matches a connection's opening packet, a pure SYN (neg: any other
// TCP packet); a TCP term must come first.
func Syn(neg bool) Term {
	const flags = 0x01 | 0x02 | 0x04 | 0x10 // fin, syn, rst, ack
	op := "=="
	if neg {
		op = "!="
	}
	return Term{fmt.Sprintf("tcp flags & (fin|syn|rst|ack) %s syn", op), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{flags}, Xor: []byte{0}},
		cmpOp(neg, []byte{0x02})}}
}

// CtNew matches a connection's first packet as conntrack sees it (neg:
// every other, untracked and invalid ones included, as iptables'
// "! --ctstate NEW").
func CtNew(neg bool) Term {
	op := expr.CmpOpNeq
	text := "ct state new"
	if neg {
		op, text = expr.CmpOpEq, "ct state & new == 0"
	}
	return Term{text, []expr.Any{&expr.Ct{Key: expr.CtKeySTATE, Register: 1}, masked(1, expr.CtStateBitNEW), &expr.Cmp{Op: op, Register: 1, Data: ne32(0)}}}
}

// CtUntracked matches packets conntrack was told to leave alone.
func CtUntracked() Term {
	return Term{"ct state untracked", []expr.Any{&expr.Ct{Key: expr.CtKeySTATE, Register: 1}, masked(1, expr.CtStateBitUNTRACKED), cmpOp(true, ne32(0))}}
}

// InSet matches the source (src) or destination address against a named
// set of the table, with the family check an inet table needs.
func InSet(src, v6 bool, set string) Term {
	field, exprs := loadAddr(src, v6)
	return Term{fmt.Sprintf("%s @%s", field, set), append(exprs, &expr.Lookup{SourceRegister: 1, SetName: set})}
}

// SocketExists matches packets of a local socket (meta skuid loads only
// then): iptables' "-m owner --socket-exists".
func SocketExists() Term {
	return Term{"meta skuid >= 0", []expr.Any{&expr.Meta{Key: expr.MetaKeySKUID, Register: 1}, &expr.Cmp{Op: expr.CmpOpGte, Register: 1, Data: ne32(0)}}}
}

// NotIIF matches packets that did not come in on name.
func NotIIF(name string) Term { return ifname(expr.MetaKeyIIFNAME, "iifname", true, name) }

// RejectReset answers a TCP packet with a reset.
func RejectReset() Term {
	return Term{"reject with tcp reset", []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}}}
}

// Notrack keeps the packet out of conntrack (raw priority only).
func Notrack() Term { return Term{"notrack", []expr.Any{&expr.Notrack{}}} }

func natFamily(v6 bool) (uint32, string) {
	if v6 {
		return unix.NFPROTO_IPV6, "ip6"
	}
	return unix.NFPROTO_IPV4, "ip"
}

// KeepDestination is an identity DNAT: the connection's destination NAT
// is set up, unchanged, so no later NAT chain on the hook (kube-proxy's,
// in any mode) rewrites it.
func KeepDestination(v6 bool) Term { return keepAddr(false, v6) }

// KeepSource is an identity SNAT: no later masquerade rewrites the source.
func KeepSource(v6 bool) Term { return keepAddr(true, v6) }

func keepAddr(src, v6 bool) Term {
	fam, name := natFamily(v6)
	off, size, field := addrField(src, v6)
	typ, verb := expr.NATTypeDestNAT, "dnat"
	if src {
		typ, verb = expr.NATTypeSourceNAT, "snat"
	}
	return Term{fmt.Sprintf("%s %s to %s", verb, name, field), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: size},
		&expr.NAT{Type: typ, Family: fam, RegAddrMin: 1}}}
}

// DNAT rewrites the destination to to.
func DNAT(to netip.AddrPort) Term {
	fam, name := natFamily(to.Addr().Is6())
	return Term{fmt.Sprintf("dnat %s to %s", name, to), []expr.Any{
		&expr.Immediate{Register: 1, Data: to.Addr().AsSlice()},
		&expr.Immediate{Register: 2, Data: be16(to.Port())},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: fam, RegAddrMin: 1, RegProtoMin: 2}}}
}

// TProxyTo hands the packet to the transparent socket at to (no verdict:
// a rule goes on when there is none).
func TProxyTo(to netip.AddrPort) Term {
	fam, name := byte(nftables.TableFamilyIPv4), "ip"
	if to.Addr().Is6() {
		fam, name = byte(nftables.TableFamilyIPv6), "ip6"
	}
	return Term{fmt.Sprintf("tproxy %s to %s", name, to), []expr.Any{
		&expr.Immediate{Register: 1, Data: to.Addr().AsSlice()},
		&expr.Immediate{Register: 2, Data: be16(to.Port())},
		&expr.TProxy{Family: fam, TableFamily: byte(nftables.TableFamilyINet), RegAddr: 1, RegPort: 2}}}
}

// NotFamily matches packets of the other family than v6 says.
func NotFamily(v6 bool) Term {
	t := NFProto(v6)
	t.text = "meta nfproto != " + t.text[len("meta nfproto "):]
	t.exprs[1] = cmpOp(true, t.exprs[1].(*expr.Cmp).Data)
	return t
}
