package integration

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/coexist"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestCoexistWithCNIs writes the rules, routes and marks of Cilium, Calico
// and the AWS VPC CNI into each node, then: our defaults are refused with
// the documented error and write nothing; the README's settings converge
// and every packet path works (each family); the CNI's rules and routes
// stay; cleanup leaves the node exactly as the CNI had it.
func TestCoexistWithCNIs(t *testing.T) {
	for _, name := range []string{"cilium", "calico", "aws-vpc-cni"} {
		for _, fam := range families {
			t.Run(name+"/"+fam.name, func(t *testing.T) { coexistWith(t, name, fam.v6) })
		}
	}
}

func fixture(name, ambientIP string) coexist.CNI {
	switch name {
	case "cilium":
		return coexist.Cilium(ambientIP)
	case "calico":
		return coexist.Calico()
	}
	return coexist.AWSVPC(ambientIP)
}

func coexistWith(t *testing.T, name string, v6 bool) {
	before := map[*node]string{}
	setup := func(n *node) {
		cni := fixture(name, n.ambient[1].IP.String())
		cni.Write(t, n.NS)
		before[n] = netnstest.Dump(t, n.NS)
		// Our defaults: refused, naming their object and our flag.
		cfg := dataplane.DefaultConfig()
		cfg.NetNSDir, cfg.IPTablesMode = n.nsDir, dataplane.IPTablesNFT
		_, err := dataplane.New(context.Background(), cfg, dataplane.Options{NodeNetNS: netnstest.NsPath(n.NS)})
		var ce *dataplane.ConflictError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), cni.DefaultConflict) {
			t.Fatalf("defaults next to %s: want a conflict saying %q, got %v", name, cni.DefaultConflict, err)
		}
		t.Logf("defaults refused: %v", err)
		if after := netnstest.Dump(t, n.NS); after != before[n] {
			t.Fatalf("refusing wrote:\n%s", netnstest.LineDiff(before[n], after))
		}
	}
	settings := func(c *dataplane.Config) { coexist.Settings(c); c.IPTablesMode = dataplane.IPTablesNFT }
	nodes := packetPathsWith(t, netnstest.DualStack, v6, setup, settings)
	for _, n := range nodes {
		// Theirs stayed while ours ran: every rule and route they had is
		// there (the kernel's rule 0, which ours replaces, aside).
		for _, sec := range []string{"ip -4 rule", "ip -6 rule", "ip -4 route table all", "ip -6 route table all"} {
			now := section(netnstest.Dump(t, n.NS), sec)
			for _, l := range strings.Split(section(before[n], sec), "\n") {
				if l != "" && !strings.HasPrefix(l, "0:\tfrom all lookup local") && !strings.Contains(now, l) {
					t.Errorf("%s: %s: %q is gone", n.Name, sec, l)
				}
			}
		}
		if _, err := n.dp.Cleanup(context.Background()); err != nil {
			t.Fatalf("cleanup: %v", err)
		}
		// Compared without the raw nft view: iptables-nft keeps the empty
		// built-in chains (policy accept) our jumps were in when the table
		// already existed (theirs); the iptables-nft-save sections still
		// show every rule.
		if after := withoutSection(netnstest.Dump(t, n.NS), "nft list ruleset"); after != withoutSection(before[n], "nft list ruleset") {
			t.Fatalf("%s: cleanup did not leave %s's state as it was:\n%s", n.Name, name, netnstest.LineDiff(withoutSection(before[n], "nft list ruleset"), after))
		}
	}
}

// section returns one "### title" section of a netnstest.Dump.
func section(dump, title string) string {
	_, rest, ok := strings.Cut(dump, "### "+title+"\n")
	if !ok {
		return ""
	}
	s, _, _ := strings.Cut(rest, "\n### ")
	return s
}

// withoutSection drops one "### title" section of a netnstest.Dump.
func withoutSection(dump, title string) string {
	return strings.Replace(dump, "### "+title+"\n"+section(dump, title), "", 1)
}

// TestLaterConflictReportedNothingRemoved starts another agent's rule at
// one of our priorities while ours run: it is reported within 2 s, the
// next apply refuses to write, and nothing of ours is removed.
func TestLaterConflictReportedNothingRemoved(t *testing.T) {
	n, z := oneNode(t, func(c *dataplane.Config) { coexist.Settings(c) })
	apply(t, n, n.state(true))
	requireCaptured(t, n, z)
	ours := netnstest.Dump(t, n.NS)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reports := make(chan []dataplane.Conflict, 16)
	go func() { _ = n.dp.WatchConflicts(ctx, time.Minute, func(cs []dataplane.Conflict) { reports <- cs }) }()
	if cs := <-reports; len(cs) != 0 {
		t.Fatalf("conflicts before another agent came: %v", cs)
	}
	added := time.Now()
	netnstest.Exec(t, n.NS, "ip", "rule", "add", "pref", "13", "lookup", "main")
	deadline := time.After(2 * time.Second)
	for found := false; !found; {
		select {
		case cs := <-reports:
			for _, c := range cs {
				found = found || strings.Contains(c.String(), "holds priority 13, which our outbound rule needs; move ours with --rule-priority-outbound")
			}
		case <-deadline:
			t.Fatal("the foreign rule at priority 13 was not reported within 2s")
		}
	}
	t.Logf("reported %v after the foreign rule", time.Since(added))
	n.dp.QueueResync()
	res, err := n.dp.Apply(context.Background(), n.state(true))
	var ce *dataplane.ConflictError
	if !errors.As(err, &ce) || res.TotalWrites() != 0 {
		t.Fatalf("apply next to the conflict: writes %v, err %v", res.Writes, err)
	}
	netnstest.Exec(t, n.NS, "ip", "rule", "del", "pref", "13", "lookup", "main")
	if now := netnstest.Dump(t, n.NS); now != ours {
		t.Fatalf("ours changed while the conflict lasted:\n%s", netnstest.LineDiff(ours, now))
	}
	// The other agent gone, capture works again without a write of ours.
	requireCaptured(t, n, z)
}
