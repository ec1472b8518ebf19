package dataplane

// The nftables backend's chain writer: one family's base chains of our
// table in one netns, through netlink, one transaction per change.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/google/nftables"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

var errNoNFT = errors.New("no nftables in this kernel view")

// nftChains writes the chains of family fam in our table.
type nftChains struct {
	open func() (*nftables.Conn, func(), error)
	fam  Family
	// have are this family's chains as read back or last written (nil
	// Chains: unknown).
	have nft.Actual
}

func newNFTChains(k *kernel.Kernel, f Family) *nftChains {
	open := k.NFT
	if open == nil {
		open = func() (*nftables.Conn, func(), error) { return nil, nil, errNoNFT }
	}
	return &nftChains{open: open, fam: f}
}

// ours says chain is one of this family's (see nftChainName).
func (c *nftChains) ours(chain string) bool {
	return strings.HasSuffix(chain, nftChainName("", c.fam))
}

func (c *nftChains) read(context.Context) (map[string]map[string][]string, error) {
	conn, done, err := c.open()
	if err != nil {
		return nil, err
	}
	defer done()
	a, err := nft.ReadBack(conn, NFTTable)
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
	conn, done, err := c.open()
	if err != nil {
		return err
	}
	defer done()
	slices.Sort(drop)
	if _, err := nft.WriteChains(conn, NFTTable, r.Sets, r.Chains, c.have, drop); err != nil {
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
