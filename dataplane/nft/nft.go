// Package nft renders nftables rules as data: each rule is a list of terms
// that carry both their nft text (golden tests; the rule's comment, which
// is how a read-back recognises it) and their netlink expressions for
// github.com/google/nftables. It reads and writes no kernel itself.
package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Term is one match or statement of a rule.
type Term struct {
	text  string
	exprs []expr.Any
}

// Rule is one rule: its terms, in order.
type Rule []Term

func (r Rule) String() string {
	parts := make([]string, len(r))
	for i, t := range r {
		parts[i] = t.text
	}
	return strings.Join(parts, " ")
}

// Exprs are the rule's expressions, in order.
func (r Rule) Exprs() []expr.Any {
	var out []expr.Any
	for _, t := range r {
		out = append(out, t.exprs...)
	}
	return out
}

// Chain is one chain of the table: a base chain when hook is set.
type Chain struct {
	Name     string
	Hook     *nftables.ChainHook
	Priority *nftables.ChainPriority
	Type     nftables.ChainType
	Rules    []Rule
}

// Table is the whole desired table.
type Table struct {
	Name   string
	Chains []*Chain
}

// String is the table as nft would list it, near enough (golden tests).
func (t Table) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s\n", t.Name)
	for _, c := range t.Chains {
		fmt.Fprintf(&b, "  chain %s", c.Name)
		if c.Hook != nil {
			fmt.Fprintf(&b, " (%s hook %s priority %d)", c.Type, hookName(*c.Hook), *c.Priority)
		}
		b.WriteString("\n")
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "    %s\n", r)
		}
	}
	return b.String()
}

func hookName(h nftables.ChainHook) string {
	switch h {
	case *nftables.ChainHookPrerouting:
		return "prerouting"
	case *nftables.ChainHookOutput:
		return "output"
	case *nftables.ChainHookInput:
		return "input"
	case *nftables.ChainHookForward:
		return "forward"
	case *nftables.ChainHookPostrouting:
		return "postrouting"
	}
	return fmt.Sprint(uint32(h))
}

// Terms. Register 1 holds what a match loads; statements use 1 and 2.

func cmpEq(data []byte) expr.Any { return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data} }

func cmpOp(neg bool, data []byte) expr.Any {
	op := expr.CmpOpEq
	if neg {
		op = expr.CmpOpNeq
	}
	return &expr.Cmp{Op: op, Register: 1, Data: data}
}

func neq(neg bool) string {
	if neg {
		return "!= "
	}
	return ""
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func ne32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

func L4Proto(p byte, name string) Term {
	return Term{"meta l4proto " + name, []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, cmpEq([]byte{p})}}
}

func NotL4Proto(p byte, name string) Term {
	return Term{"meta l4proto != " + name, []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, cmpOp(true, []byte{p})}}
}

func TCP() Term { return L4Proto(unix.IPPROTO_TCP, "tcp") }
func UDP() Term { return L4Proto(unix.IPPROTO_UDP, "udp") }

// DPort matches the destination port; an l4proto term must come first.
func DPort(proto string, p uint16) Term { return dport(proto, false, p) }

// NotDPort matches any other destination port.
func NotDPort(proto string, p uint16) Term { return dport(proto, true, p) }

func dport(proto string, neg bool, p uint16) Term {
	return Term{fmt.Sprintf("%s dport %s%d", proto, neq(neg), p), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}, cmpOp(neg, be16(p))}}
}

// NFProto matches the packet's family.
func NFProto(v6 bool) Term {
	p, name := byte(unix.NFPROTO_IPV4), "ipv4"
	if v6 {
		p, name = unix.NFPROTO_IPV6, "ipv6"
	}
	return Term{"meta nfproto " + name, []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, cmpEq([]byte{p})}}
}

// addrField is where the source (src) or destination address of family
// v6 is in the network header, and how nft names it ("ip saddr").
func addrField(src, v6 bool) (off, size uint32, text string) {
	off, size, name, dir := uint32(16), uint32(4), "ip", "daddr"
	if src {
		off, dir = 12, "saddr"
	}
	if v6 {
		off, size, name = 24, 16, "ip6"
		if src {
			off = 8
		}
	}
	return off, size, name + " " + dir
}

// loadAddr is the family check an inet table needs before reading the
// header, then the address loaded into register 1.
func loadAddr(src, v6 bool) (string, []expr.Any) {
	off, size, text := addrField(src, v6)
	t := NFProto(v6)
	return text, append(t.exprs, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: size})
}

// Addr matches the source (src) or destination address against a prefix.
func Addr(src, neg bool, p netip.Prefix) Term {
	field, exprs := loadAddr(src, p.Addr().Is6())
	size := uint32(p.Addr().BitLen() / 8)
	t := Term{fmt.Sprintf("%s %s%s", field, neq(neg), p), exprs}
	if p.Bits() < p.Addr().BitLen() {
		mask := netip.PrefixFrom(p.Addr(), p.Bits()).Masked()
		m := make([]byte, size)
		for i := range p.Bits() {
			m[i/8] |= 0x80 >> (i % 8)
		}
		t.exprs = append(t.exprs, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: size, Mask: m, Xor: make([]byte, size)})
		p = mask
	}
	t.exprs = append(t.exprs, cmpOp(neg, p.Addr().AsSlice()))
	return t
}

func ifname(key expr.MetaKey, dir string, neg bool, name string) Term {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return Term{fmt.Sprintf("%s %s%s", dir, neq(neg), name), []expr.Any{&expr.Meta{Key: key, Register: 1}, cmpOp(neg, b)}}
}

func OIF(name string, neg bool) Term { return ifname(expr.MetaKeyOIFNAME, "oifname", neg, name) }
func IIF(name string) Term           { return ifname(expr.MetaKeyIIFNAME, "iifname", false, name) }

// owner matches the socket's uid (gid) owner: output hook only.
func Owner(gid, neg bool, id uint32) Term {
	key, name := expr.MetaKeySKUID, "skuid"
	if gid {
		key, name = expr.MetaKeySKGID, "skgid"
	}
	return Term{fmt.Sprintf("meta %s %s%d", name, neq(neg), id), []expr.Any{&expr.Meta{Key: key, Register: 1}, cmpOp(neg, ne32(id))}}
}

func MarkIs(v uint32) Term { return markCmp(false, v) }

// MarkIsNot matches any other packet mark.
func MarkIsNot(v uint32) Term { return markCmp(true, v) }

func markCmp(neg bool, v uint32) Term {
	return Term{fmt.Sprintf("meta mark %s%#x", neq(neg), v), []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, cmpOp(neg, ne32(v))}}
}

// CtEstablished matches packets of established or related connections.
func CtEstablished() Term {
	return Term{"ct state established,related", []expr.Any{&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: ne32(0)},
		cmpOp(true, ne32(0))}}
}

func CtMarkIs(v uint32) Term {
	return Term{fmt.Sprintf("ct mark %#x", v), []expr.Any{&expr.Ct{Key: expr.CtKeyMARK, Register: 1}, cmpEq(ne32(v))}}
}

func CtInvalid() Term {
	return Term{"ct state invalid", []expr.Any{&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne32(expr.CtStateBitINVALID), Xor: ne32(0)},
		cmpOp(true, ne32(0))}}
}

// socketTransparent matches packets of a connection a transparent socket
// (the proxy's TPROXY listener) already owns.
func SocketTransparent() Term {
	return Term{"socket transparent 1", []expr.Any{&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1}, cmpEq([]byte{1})}}
}

func SetMark(v uint32) Term {
	return Term{fmt.Sprintf("meta mark set %#x", v), []expr.Any{&expr.Immediate{Register: 1, Data: ne32(v)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}}}
}

func SaveMark() Term {
	return Term{"ct mark set meta mark", []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true}}}
}

func RestoreMark() Term {
	return Term{"meta mark set ct mark", []expr.Any{&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}}}
}

func Redirect(port uint16) Term {
	return Term{fmt.Sprintf("redirect to :%d", port), []expr.Any{&expr.Immediate{Register: 1, Data: be16(port)},
		&expr.Redir{RegisterProtoMin: 1}}}
}

// TProxy hands the packet to the local socket at port on its destination
// address (no verdict).
func TProxy(v6 bool, port uint16) Term {
	fam, name := byte(nftables.TableFamilyIPv4), "ip"
	if v6 {
		fam, name = byte(nftables.TableFamilyIPv6), "ip6"
	}
	return Term{fmt.Sprintf("tproxy %s to :%d", name, port), []expr.Any{
		&expr.Immediate{Register: 1, Data: be16(port)},
		&expr.TProxy{Family: fam, TableFamily: byte(nftables.TableFamilyINet), RegPort: 1}}}
}

func verdict(k expr.VerdictKind, chain, text string) Term {
	return Term{text, []expr.Any{&expr.Verdict{Kind: k, Chain: chain}}}
}

func Return() Term           { return verdict(expr.VerdictReturn, "", "return") }
func Accept() Term           { return verdict(expr.VerdictAccept, "", "accept") }
func Drop() Term             { return verdict(expr.VerdictDrop, "", "drop") }
func Jump(chain string) Term { return verdict(expr.VerdictJump, chain, "jump "+chain) }

// R is a rule of terms.
func R(ts ...Term) Rule { return ts }

// Host is the single-address prefix of a.
func Host(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

func (t Term) String() string { return t.text }
