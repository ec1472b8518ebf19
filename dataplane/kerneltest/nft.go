package kerneltest

// FakeNFT is nf_tables in one fake netns: our inet tables with their
// chains (rules as their texts) and address sets, journalled like the
// other fakes.

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

type fakeTable struct {
	chains map[string]string   // name -> kind
	rules  map[string][]string // name -> rule texts
	sets   map[string]map[netip.Addr]string
}

// FakeNFT holds inet tables by name; Foreign lists other tables by
// "family name" (kube-proxy's, say).
type FakeNFT struct {
	mu      sync.Mutex
	tables  map[string]*fakeTable
	Foreign map[string]bool
	// Writes counts transactions.
	Writes  int
	Journal *Journal
	NS      string
}

var _ kernel.NFTables = (*FakeNFT)(nil)

func NewFakeNFT() *FakeNFT {
	return &FakeNFT{tables: map[string]*fakeTable{}, Foreign: map[string]bool{}}
}

// record counts and journals a write; called without the lock held (the
// journal's observers read this fake).
func (f *FakeNFT) record(op Op, format string, a ...any) {
	f.mu.Lock()
	f.Writes++
	f.mu.Unlock()
	if f.Journal != nil {
		f.Journal.record(Entry{NS: f.NS, Kind: "nftables", Op: op, Object: fmt.Sprintf(format, a...)})
	}
}

// table is the table name, a new empty one if there is none (not
// stored: the caller's write does that).
func (f *FakeNFT) table(name string) *fakeTable {
	if t, ok := f.tables[name]; ok {
		return t
	}
	return &fakeTable{chains: map[string]string{}, rules: map[string][]string{}, sets: map[string]map[netip.Addr]string{}}
}

func (f *FakeNFT) ReadBack(table string) (nft.Actual, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := nft.Actual{Chains: map[string]string{}, Rules: map[string][]string{}}
	t, ok := f.tables[table]
	if !ok {
		return a, nil
	}
	a.Exists = true
	for name, kind := range t.chains {
		a.Chains[name], a.Rules[name] = kind, slices.Clone(t.rules[name])
	}
	return a, nil
}

// WriteChains writes without looking at have: the result is the same.
func (f *FakeNFT) WriteChains(table string, sets []nft.Set, want []*nft.Chain, _ nft.Actual, drop []string) error {
	f.mu.Lock()
	t := f.table(table)
	f.tables[table] = t
	for _, s := range sets {
		if t.sets[s.Name] == nil {
			t.sets[s.Name] = map[netip.Addr]string{}
		}
	}
	var names []string
	for _, ch := range want {
		t.chains[ch.Name], t.rules[ch.Name] = nft.Kind(ch), ch.Texts()
		names = append(names, ch.Name)
	}
	for _, name := range drop {
		delete(t.chains, name)
		delete(t.rules, name)
	}
	f.mu.Unlock()
	f.record(OpReplace, "inet %s chains %v, dropped %v", table, names, drop)
	return nil
}

// Rules are a chain's rule texts (the oracle's reading).
func (f *FakeNFT) Rules(table, chain string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t, ok := f.tables[table]; ok {
		return slices.Clone(t.rules[chain])
	}
	return nil
}

func (f *FakeNFT) Elements(table string, s nft.Set) (map[netip.Addr]string, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tables[table]
	if !ok || t.sets[s.Name] == nil {
		return nil, false, nil
	}
	return maps.Clone(t.sets[s.Name]), true, nil
}

// Has reports a as an element of set.
func (f *FakeNFT) Has(table, set string, a netip.Addr) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tables[table]
	if !ok {
		return false
	}
	_, has := t.sets[set][a]
	return has
}

func (f *FakeNFT) UpdateElements(table string, us ...nft.ElementUpdate) error {
	f.mu.Lock()
	t := f.table(table)
	sets := map[string]map[netip.Addr]string{}
	for name, m := range t.sets {
		sets[name] = maps.Clone(m)
	}
	var what []string
	for _, u := range us {
		if sets[u.Set.Name] == nil {
			sets[u.Set.Name] = map[netip.Addr]string{}
		}
		for _, a := range append(slices.Clone(u.Relabel), u.Del...) {
			if _, ok := sets[u.Set.Name][a]; !ok {
				f.mu.Unlock()
				return fmt.Errorf("delete %s from %s: no such element", a, u.Set.Name)
			}
			delete(sets[u.Set.Name], a)
		}
		maps.Copy(sets[u.Set.Name], u.Add)
		what = append(what, fmt.Sprintf("%s +%v -%v", u.Set.Name, slices.SortedFunc(maps.Keys(u.Add), netip.Addr.Compare), u.Del))
	}
	t.sets, f.tables[table] = sets, t // all or nothing, as a transaction
	f.mu.Unlock()
	f.record(OpReplace, "inet %s sets %s", table, strings.Join(what, ", "))
	return nil
}

func (f *FakeNFT) DeleteTable(table string) error {
	f.mu.Lock()
	_, ok := f.tables[table]
	delete(f.tables, table)
	f.mu.Unlock()
	if ok {
		f.record(OpDelete, "inet %s", table)
	}
	return nil
}

func (f *FakeNFT) HasTable(family, name string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.Foreign[family+" "+name], nil
}
