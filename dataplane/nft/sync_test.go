package nft

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/google/nftables"
)

// TestDiff: the read-back compares chains (and a base chain's hook,
// priority and type) and each chain's rules by their text, in order.
func TestDiff(t *testing.T) {
	want := Table{Name: "t", Chains: []*Chain{
		{Name: "out", Hook: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest, Type: nftables.ChainTypeNAT,
			Rules: []Rule{R(TCP(), Jump("redir"))}},
		{Name: "redir", Rules: []Rule{R(TCP(), Redirect(15001))}},
	}}
	same := Actual{Exists: true, Chains: map[string]string{"out": Kind(want.Chains[0]), "redir": ""},
		Rules: map[string][]string{"out": {"meta l4proto tcp jump redir"}, "redir": {"meta l4proto tcp redirect to :15001"}}}
	if d := Diff(same, want); len(d) != 0 {
		t.Fatalf("equal tables differ: %v", d)
	}
	if d := Diff(want.Written(), want); len(d) != 0 {
		t.Fatalf("a table just written differs from itself: %v", d)
	}
	for name, c := range map[string]struct {
		mut  func(a *Actual)
		want string
	}{
		"missing table":   {func(a *Actual) { *a = Actual{} }, "create table inet t"},
		"missing chain":   {func(a *Actual) { delete(a.Chains, "redir"); delete(a.Rules, "redir") }, "add chain redir"},
		"foreign chain":   {func(a *Actual) { a.Chains["extra"] = ""; a.Rules["extra"] = nil }, "delete chain extra"},
		"other hook":      {func(a *Actual) { a.Chains["out"] = "1/-100/nat" }, "re-create chain out"},
		"flushed chain":   {func(a *Actual) { a.Rules["redir"] = []string{} }, "rewrite chain redir (1 rules, have 0)"},
		"reordered rules": {func(a *Actual) { a.Rules["out"] = []string{"x", "meta l4proto tcp jump redir"} }, "rewrite chain out (1 rules, have 2)"},
	} {
		a := Actual{Exists: true, Chains: map[string]string{}, Rules: map[string][]string{}}
		for k, v := range same.Chains {
			a.Chains[k] = v
		}
		for k, v := range same.Rules {
			a.Rules[k] = slices.Clone(v)
		}
		c.mut(&a)
		if d := Diff(a, want); !slices.Contains(d, c.want) {
			t.Errorf("%s: diff %v, want %q", name, d, c.want)
		}
	}
}

// TestAddrMasksPrefixes: a prefix match masks the address (a /12 matches
// its whole range), a host matches exactly.
func TestAddrMasksPrefixes(t *testing.T) {
	if got := len(Addr(false, false, Host(mustAddr("10.0.0.1"))).exprs); got != 4 {
		t.Fatalf("a host match has %d expressions, want 4 (family load and compare, address load and compare)", got)
	}
	if got := len(Addr(false, false, mustPrefix("10.96.0.0/12")).exprs); got != 5 {
		t.Fatalf("a prefix match has %d expressions, want 5 (a mask besides)", got)
	}
}

func mustAddr(s string) netip.Addr     { return netip.MustParseAddr(s) }
func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }
