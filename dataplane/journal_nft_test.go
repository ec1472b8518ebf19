package dataplane

// The journal oracle's reading of the nftables backend's chains: each
// rule's text (its comment, what the kernel holds beside the expressions)
// interpreted term by term with the matches and statements the backend
// writes; an unknown term fails the test instead of guessing.

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kerneltest"
)

// evalNFTChains runs p through the base chains names of our table in
// order (an accept or return ends one chain, not the hook): "" (went on),
// "REJECT", "DROP" or "TPROXY".
func evalNFTChains(f *kerneltest.FakeNFT, p *pkt, names ...string) string {
	for _, name := range names {
		if v := evalNFTChain(f, name, p); v != "" {
			return v
		}
	}
	return ""
}

func evalNFTChain(f *kerneltest.FakeNFT, chain string, p *pkt) string {
	for _, r := range f.Rules(NFTTable, chain) {
		switch v := evalNFTRule(f, r, p); v {
		case "":
		case "return", "accept":
			return ""
		case "TPROXY", "REJECT", "DROP":
			return v
		default:
			if v, ok := strings.CutPrefix(v, "jump "); ok {
				if got := evalNFTChain(f, v, p); got != "" {
					return got
				}
				continue
			}
			panic(oracleError("verdict " + v + " in " + r))
		}
	}
	return ""
}

// evalNFTRule matches one rule and applies its statements: "" (no
// verdict or no match) or the verdict.
func evalNFTRule(f *kerneltest.FakeNFT, rule string, p *pkt) string {
	tok := strings.Fields(rule)
	i := 0
	next := func() string {
		if i >= len(tok) {
			panic(oracleError("short rule " + rule))
		}
		i++
		return tok[i-1]
	}
	num := func(s string) uint32 {
		v, err := strconv.ParseUint(s, 0, 32)
		if err != nil {
			panic(oracleError(fmt.Sprintf("number %q in %q", s, rule)))
		}
		return uint32(v)
	}
	// cmp reads "== v" / "!= v" and compares x with v.
	cmp := func(x uint32) bool {
		op, v := next(), num(next())
		if op == "!=" {
			return x != v
		}
		return x == v
	}
	// set reads "| v", "& m", "& m ^ v" after "set <key>".
	set := func(x uint32) uint32 {
		switch next() {
		case "|":
			return x | num(next())
		case "&":
			x &= num(next())
			if i < len(tok) && tok[i] == "^" {
				i++
				x ^= num(next())
			}
			return x
		}
		panic(oracleError("mark statement in " + rule))
	}
	tproxied := false
	for i < len(tok) {
		ok := true
		switch t := next(); t {
		case "meta":
			switch key := next(); key {
			case "nfproto":
				neg := tok[i] == "!="
				if neg {
					i++
				}
				ok = (next() == "ipv6") == p.dst.Is6() != neg
			case "l4proto":
				neg := tok[i] == "!="
				if neg {
					i++
				}
				ok = (next() == "tcp") != neg // the probes are TCP
			case "mark":
				if tok[i] == "set" {
					i += 3 // "set meta mark"
					p.mark = set(p.mark)
					continue
				}
				next() // "&"
				ok = cmp(p.mark & num(next()))
			default:
				panic(oracleError("meta " + key + " in " + rule))
			}
		case "ct":
			switch key := next(); key {
			case "mark":
				if tok[i] == "set" {
					i += 3 // "set ct mark"
					p.connmark = set(p.connmark)
					continue
				}
				next()
				ok = cmp(p.connmark & num(next()))
			case "state":
				// A SYN opens a new connection: "new" matches, "& new == 0" does not.
				if tok[i] == "&" {
					i += 4
					ok = false
				} else {
					ok = next() == "new"
				}
			default:
				panic(oracleError("ct " + key + " in " + rule))
			}
		case "iifname":
			if tok[i] == "!=" {
				i++
				ok = p.iif != next()
			} else {
				ok = p.iif == next()
			}
		case "tcp", "udp":
			switch next() {
			case "dport":
				ok = t == "tcp" && next() == strconv.Itoa(p.dport)
			case "flags": // "& (fin|syn|rst|ack) == syn" (a pure SYN) or "!= syn"
				i++
				next()
				ok = next() == "=="
				next()
			default:
				panic(oracleError("tcp match in " + rule))
			}
		case "ip", "ip6":
			dir := next()
			a := p.src
			if dir == "daddr" {
				a = p.dst
			}
			neg := tok[i] == "!="
			if neg {
				i++
			}
			arg := next()
			if name, isSet := strings.CutPrefix(arg, "@"); isSet {
				ok = f.Has(NFTTable, name, a) != neg
			} else {
				pre, err := netip.ParsePrefix(arg)
				if err != nil {
					panic(oracleError(rule))
				}
				ok = pre.Contains(a) != neg
			}
		case "tproxy":
			next() // family
			next() // "to"
			next() // address:port
			tproxied = true
		case "return", "accept":
			if tproxied {
				return "TPROXY"
			}
			return t
		case "drop":
			return "DROP"
		case "reject":
			return "REJECT"
		case "jump":
			return "jump " + next()
		case "dnat", "snat", "notrack", "update", "add", "delete":
			panic(oracleError("statement the oracle does not model in " + rule))
		default:
			panic(oracleError(fmt.Sprintf("unknown term %q in %q", t, rule)))
		}
		if !ok {
			return ""
		}
	}
	return ""
}
