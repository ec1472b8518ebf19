package dataplane

// The nftables backend's chain writer: one family's base chains of our
// table in one netns, through netlink, one transaction per change.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

var errNoNFT = errors.New("no nftables in this kernel view")

// nftChains writes the chains of family fam in our table.
type nftChains struct {
	nf  kernel.NFTables
	fam Family
	// have are this family's chains as read back or last written (nil
	// Chains: unknown).
	have nft.Actual
}

func newNFTChains(k *kernel.Kernel, f Family) *nftChains {
	return &nftChains{nf: nftOf(k), fam: f}
}

// nftOf is k's nf_tables (one that fails every call where k has none).
func nftOf(k *kernel.Kernel) kernel.NFTables {
	if k.NFT == nil {
		return noNFT{}
	}
	return k.NFT
}

type noNFT struct{}

func (noNFT) ReadBack(string) (nft.Actual, error) { return nft.Actual{}, errNoNFT }
func (noNFT) WriteChains(string, []nft.Set, []*nft.Chain, nft.Actual, []string) error {
	return errNoNFT
}
func (noNFT) Elements(string, nft.Set) (map[netip.Addr]string, bool, error) {
	return nil, false, errNoNFT
}
func (noNFT) UpdateElements(string, ...nft.ElementUpdate) error { return errNoNFT }
func (noNFT) DeleteTable(string) error                          { return errNoNFT }
func (noNFT) HasTable(string, string) (bool, error)             { return false, errNoNFT }

// ours says chain is one of this family's (see nftChainName).
func (c *nftChains) ours(chain string) bool {
	return strings.HasSuffix(chain, nftChainName("", c.fam))
}

func (c *nftChains) read(context.Context) (map[string]map[string][]string, error) {
	a, err := c.nf.ReadBack(NFTTable)
	if err != nil {
		return nil, err
	}
	maps.DeleteFunc(a.Chains, func(name, _ string) bool { return !c.ours(name) })
	maps.DeleteFunc(a.Rules, func(name string, _ []string) bool { return !c.ours(name) })
	c.have = a
	return map[string]map[string][]string{"inet " + NFTTable: a.Rules}, nil
}

func (c *nftChains) update(ctx context.Context, want ruleset, w *writer) error {
	if c.have.Chains == nil {
		if _, err := c.read(ctx); err != nil {
			return err
		}
	}
	var r NFTRuleset
	if want != nil {
		r = want.(NFTRuleset)
	}
	t := nft.Table{Name: NFTTable, Chains: r.Chains}
	var changes, drop []string
	for _, d := range nft.Diff(c.have, t) {
		if !strings.HasPrefix(d, "create table") {
			changes = append(changes, d)
		}
	}
	for name := range c.have.Chains {
		if !slices.ContainsFunc(r.Chains, func(ch *nft.Chain) bool { return ch.Name == name }) {
			drop = append(drop, name)
		}
	}
	if !c.have.Exists && want != nil {
		changes = append(changes, "create table inet "+NFTTable)
		for _, ch := range r.Chains {
			changes = append(changes, "add chain "+ch.Name)
		}
	}
	if len(changes) == 0 {
		return nil
	}
	for _, ch := range changes {
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: %v %s", KindNFT, c.fam, ch))
	}
	if w.dry {
		return nil
	}
	slices.Sort(drop)
	if err := c.nf.WriteChains(NFTTable, r.Sets, r.Chains, c.have, drop); err != nil {
		c.have = nft.Actual{}
		return err
	}
	w.res.Writes[KindNFT]++
	c.have = t.Written()
	return nil
}

func (c *nftChains) sync(ctx context.Context, want ruleset, w *writer) error {
	if _, err := c.read(ctx); err != nil {
		return err
	}
	return c.update(ctx, want, w)
}
