package nft

// Writing some chains of a shared table in one transaction, and a set's
// elements: the node backend's kernel operations.

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Set is an address set of the table (one family), or a flow map.
type Set struct {
	Name string
	V6   bool
	// Flows makes it a map of TCP 4-tuples to marks that rules fill from
	// the packet path (see flows.go).
	Flows bool
}

func (s Set) of(t *nftables.Table) *nftables.Set {
	if s.Flows {
		return s.flowMap(t)
	}
	typ := nftables.TypeIPAddr
	if s.V6 {
		typ = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: s.Name, KeyType: typ}
}

func inet(name string) *nftables.Table {
	return &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
}

// WriteChains makes the chains of want exactly what they hold, and
// deletes the chains named in drop, in one transaction: the table and the
// sets are created if missing (their elements are left as they are), and
// a chain that have (the table as read back or last written) already
// holds is not touched.
func WriteChains(c *nftables.Conn, table string, sets []Set, want []*Chain, have Actual, drop []string) (int, error) {
	t := inet(table)
	c.AddTable(t)
	for _, s := range sets {
		if err := c.AddSet(s.of(t), nil); err != nil {
			return 0, err
		}
	}
	writes := 0
	var rewrite []*Chain
	added := map[string]*nftables.Chain{}
	// Every chain first, then the rules: a rule may jump to a chain that
	// comes later.
	for _, ch := range want {
		kind, exists := have.Chains[ch.Name]
		if exists && kind == Kind(ch) && slices.Equal(have.Rules[ch.Name], ch.texts()) {
			continue
		}
		writes++
		nc := &nftables.Chain{Name: ch.Name, Table: t}
		if exists {
			c.FlushChain(nc)
			if kind != Kind(ch) {
				c.DelChain(nc)
				exists = false
			}
		}
		if ch.Hook != nil {
			accept := nftables.ChainPolicyAccept
			nc.Hooknum, nc.Priority, nc.Type, nc.Policy = ch.Hook, ch.Priority, ch.Type, &accept
		}
		if !exists {
			c.AddChain(nc)
		}
		rewrite, added[ch.Name] = append(rewrite, ch), nc
	}
	for _, ch := range rewrite {
		for _, r := range ch.Rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: added[ch.Name], Exprs: r.Exprs(),
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.String())})
		}
	}
	for _, name := range drop {
		writes++
		nc := &nftables.Chain{Name: name, Table: t}
		c.FlushChain(nc)
		c.DelChain(nc)
	}
	if err := c.Flush(); err != nil {
		return 0, fmt.Errorf("write chains of table inet %s: %w", table, err)
	}
	return writes, nil
}

// Elements are the addresses of a set with their comments; exists is
// false when the table or the set is not there.
func Elements(c *nftables.Conn, table string, s Set) (map[netip.Addr]string, bool, error) {
	set, err := c.GetSetByName(inet(table), s.Name)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("set %s of table inet %s: %w", s.Name, table, err)
	}
	if set.KeyType.Name != s.of(nil).KeyType.Name {
		return nil, true, fmt.Errorf("set %s of table inet %s holds %s, not %s", s.Name, table, set.KeyType.Name, s.of(nil).KeyType.Name)
	}
	elems, err := c.GetSetElements(set)
	if err != nil {
		return nil, true, fmt.Errorf("elements of set %s: %w", s.Name, err)
	}
	out := map[netip.Addr]string{}
	for _, e := range elems {
		if a, ok := netip.AddrFromSlice(e.Key); ok {
			out[a] = e.Comment
		}
	}
	return out, true, nil
}

// ElementUpdate is what one transaction does to one set: adds (or
// re-labels: Relabel lists the addresses there now under another comment)
// and deletes.
type ElementUpdate struct {
	Set     Set
	Add     map[netip.Addr]string
	Relabel []netip.Addr
	Del     []netip.Addr
}

// UpdateElements applies us in one transaction, creating the table and
// sets if missing.
func UpdateElements(c *nftables.Conn, table string, us ...ElementUpdate) error {
	t := inet(table)
	c.AddTable(t)
	for _, u := range us {
		set := u.Set.of(t)
		if err := c.AddSet(set, nil); err != nil {
			return err
		}
		var gone []nftables.SetElement
		for _, a := range append(slices.Clone(u.Relabel), u.Del...) {
			gone = append(gone, nftables.SetElement{Key: a.AsSlice()})
		}
		if len(gone) > 0 {
			if err := c.SetDeleteElements(set, gone); err != nil {
				return err
			}
		}
		var elems []nftables.SetElement
		for a, comment := range u.Add {
			elems = append(elems, nftables.SetElement{Key: a.AsSlice(), Comment: comment})
		}
		if len(elems) > 0 {
			if err := c.SetAddElements(set, elems); err != nil {
				return err
			}
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("update sets of table inet %s: %w", table, err)
	}
	return nil
}
