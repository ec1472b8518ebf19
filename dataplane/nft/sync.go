package nft

// Reading a table back and replacing it in one transaction.

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Open connects to nf_tables in the netns at path ("" the current one).
// Close the returned closer when done.
func Open(path string) (*nftables.Conn, func(), error) {
	if path == "" {
		c, err := nftables.New()
		return c, func() {}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("nftables in %s: %w", path, err)
	}
	return c, func() { _ = c.CloseLasting(); f.Close() }, nil
}

// Actual is a table as read back: its chains (hook, priority and type of a
// base chain as "hook/priority/type") and each chain's rules by comment.
type Actual struct {
	Exists bool
	Chains map[string]string
	Rules  map[string][]string
}

// ReadBack reads the inet table name.
func ReadBack(c *nftables.Conn, name string) (Actual, error) {
	a := Actual{Chains: map[string]string{}, Rules: map[string][]string{}}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return a, fmt.Errorf("list tables: %w", err)
	}
	i := slices.IndexFunc(tables, func(t *nftables.Table) bool { return t.Name == name })
	if i < 0 {
		return a, nil
	}
	a.Exists = true
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return a, fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name != name {
			continue
		}
		a.Chains[ch.Name] = chainKind(ch)
		rules, err := c.GetRules(tables[i], ch)
		if err != nil {
			return a, fmt.Errorf("list rules of %s: %w", ch.Name, err)
		}
		a.Rules[ch.Name] = []string{}
		for _, r := range rules {
			text, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			a.Rules[ch.Name] = append(a.Rules[ch.Name], text)
		}
	}
	return a, nil
}

// Kind is a base chain's "hook/priority/type" ("" for a regular chain).
func Kind(c *Chain) string {
	return chainKind(&nftables.Chain{Hooknum: c.Hook, Priority: c.Priority, Type: c.Type})
}

func chainKind(c *nftables.Chain) string {
	if c.Hooknum == nil || c.Priority == nil {
		return ""
	}
	return fmt.Sprintf("%d/%d/%s", *c.Hooknum, *c.Priority, c.Type)
}

// Written is t as ReadBack finds it once Replace wrote it.
func (t Table) Written() Actual {
	a := Actual{Exists: true, Chains: map[string]string{}, Rules: map[string][]string{}}
	for _, c := range t.Chains {
		a.Chains[c.Name], a.Rules[c.Name] = Kind(c), c.texts()
	}
	return a
}

// Texts are the chain's rules as their comments carry them.
func (c *Chain) Texts() []string { return c.texts() }

func (c *Chain) texts() []string {
	out := []string{}
	for _, r := range c.Rules {
		out = append(out, r.String())
	}
	return out
}

// Diff lists how the table read back differs from t (nothing: equal).
func Diff(a Actual, t Table) []string {
	if !a.Exists {
		return []string{"create table inet " + t.Name}
	}
	var out []string
	want := map[string]bool{}
	for _, ch := range t.Chains {
		want[ch.Name] = true
		kind, ok := a.Chains[ch.Name]
		if !ok {
			out = append(out, "add chain "+ch.Name)
			continue
		}
		if kind != Kind(ch) {
			out = append(out, "re-create chain "+ch.Name)
		}
		if rules := ch.texts(); !slices.Equal(rules, a.Rules[ch.Name]) {
			out = append(out, fmt.Sprintf("rewrite chain %s (%d rules, have %d)", ch.Name, len(rules), len(a.Rules[ch.Name])))
		}
	}
	for name := range a.Chains {
		if !want[name] {
			out = append(out, "delete chain "+name)
		}
	}
	slices.Sort(out)
	return out
}

// Replace makes the table exactly t in one transaction: the old one (if
// any) and the new one are never both half there.
func Replace(c *nftables.Conn, t Table, exists bool) error {
	table := &nftables.Table{Name: t.Name, Family: nftables.TableFamilyINet}
	if exists {
		c.DelTable(table)
	}
	c.AddTable(table)
	chains := map[string]*nftables.Chain{}
	for _, ch := range t.Chains {
		nc := &nftables.Chain{Name: ch.Name, Table: table}
		if ch.Hook != nil {
			nc.Hooknum, nc.Priority, nc.Type = ch.Hook, ch.Priority, ch.Type
			accept := nftables.ChainPolicyAccept
			nc.Policy = &accept
		}
		chains[ch.Name] = c.AddChain(nc)
	}
	for _, ch := range t.Chains {
		for _, r := range ch.Rules {
			c.AddRule(&nftables.Rule{Table: table, Chain: chains[ch.Name], Exprs: r.Exprs(),
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.String())})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("replace table inet %s: %w", t.Name, err)
	}
	return nil
}

// Delete removes the inet table name; a missing one is not an error.
func Delete(c *nftables.Conn, name string) error {
	c.DelTable(&nftables.Table{Name: name, Family: nftables.TableFamilyINet})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete table inet %s: %w", name, err)
	}
	return nil
}
