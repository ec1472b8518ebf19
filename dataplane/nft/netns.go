package nft

// NetNS is nf_tables in one netns, one connection per operation: what the
// node backend does with its tables, behind an interface the fake kernel
// implements too.

import (
	"net/netip"
	"slices"

	"github.com/google/nftables"
)

// NetNS is the netns at Path ("" the current one).
type NetNS struct{ Path string }

func (n NetNS) with(f func(c *nftables.Conn) error) error {
	c, done, err := Open(n.Path)
	if err != nil {
		return err
	}
	defer done()
	return f(c)
}

// ReadBack reads the inet table name.
func (n NetNS) ReadBack(table string) (a Actual, err error) {
	err = n.with(func(c *nftables.Conn) error { a, err = ReadBack(c, table); return err })
	return a, err
}

// WriteChains is WriteChains in this netns.
func (n NetNS) WriteChains(table string, sets []Set, want []*Chain, have Actual, drop []string) error {
	return n.with(func(c *nftables.Conn) error { _, err := WriteChains(c, table, sets, want, have, drop); return err })
}

// Elements is Elements in this netns.
func (n NetNS) Elements(table string, s Set) (m map[netip.Addr]string, exists bool, err error) {
	err = n.with(func(c *nftables.Conn) error { m, exists, err = Elements(c, table, s); return err })
	return m, exists, err
}

// UpdateElements is UpdateElements in this netns.
func (n NetNS) UpdateElements(table string, us ...ElementUpdate) error {
	return n.with(func(c *nftables.Conn) error { return UpdateElements(c, table, us...) })
}

// DeleteTable deletes the inet table (a missing one is not an error).
func (n NetNS) DeleteTable(table string) error {
	return n.with(func(c *nftables.Conn) error { return Delete(c, table) })
}

// HasTable reports a table of family ("ip", "ip6", "inet") name.
func (n NetNS) HasTable(family, name string) (found bool, err error) {
	fam := map[string]nftables.TableFamily{"ip": nftables.TableFamilyIPv4, "ip6": nftables.TableFamilyIPv6, "inet": nftables.TableFamilyINet}[family]
	err = n.with(func(c *nftables.Conn) error {
		tables, err := c.ListTablesOfFamily(fam)
		found = slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == name })
		return err
	})
	return found, err
}
