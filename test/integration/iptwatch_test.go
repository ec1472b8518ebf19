package integration

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestForeignJumpInFrontIsUndone: another agent inserting its jump ahead of
// ours (kube-proxy on every start) is undone within 2 s, not at the resync.
func TestForeignJumpInFrontIsUndone(t *testing.T) {
	for _, backend := range []dataplane.IPTablesMode{dataplane.IPTablesNFT, dataplane.IPTablesLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			n, z := oneNode(t, func(c *dataplane.Config) { c.IPTablesMode, c.Backend = backend, dataplane.BackendIPTables })
			apply(t, n, n.state(true))
			repairs := watchRules(t, n)
			bin := "iptables-" + string(backend)
			for _, table := range []string{"nat", "mangle"} {
				chain := "KUBE-TEST-" + strings.ToUpper(table)
				netnstest.Exec(t, n.NS, bin, "-t", table, "-N", chain)
				start := time.Now()
				netnstest.Exec(t, n.NS, bin, "-t", table, "-I", "PREROUTING", "1", "-j", chain)
				for {
					rules := strings.Split(strings.TrimSpace(netnstest.Exec(t, n.NS, bin, "-t", table, "-S", "PREROUTING")), "\n")
					if len(rules) > 2 && strings.Contains(rules[1], "ztunnel-PREROUTING") && strings.Contains(rules[2], chain) {
						t.Logf("%s %s: our jump first again after %v", backend, table, time.Since(start).Round(time.Millisecond))
						break
					}
					if time.Since(start) > 2*time.Second {
						t.Fatalf("%s PREROUTING 2s after a foreign jump was put first:\n%s", table, strings.Join(rules, "\n"))
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			if repairs.Load() == 0 {
				t.Fatal("repairs were not reported")
			}
			requireCaptured(t, n, z)
		})
	}
}

// TestNFTablesDriftIsRepaired: with the nftables backend, a rule, chain,
// set element or the whole table of ours removed by someone else is put
// back within 2 s by the nf_tables event watch, not at the resync, and
// capture works again.
func TestNFTablesDriftIsRepaired(t *testing.T) {
	n, z := oneNode(t, func(c *dataplane.Config) { c.Backend = dataplane.BackendNFTables })
	apply(t, n, n.state(true))
	repairs := watchRules(t, n)
	table := "inet " + dataplane.NFTTable
	member := n.ambient[1].IP.String()
	intact := func() bool {
		rs, err := netnstest.ExecErr(n.NS, "nft", "list", "table", "inet", dataplane.NFTTable)
		return err == nil && strings.Contains(rs, "ip saddr @ztunnel-pods-ips meta mark set meta mark | 0x100") &&
			strings.Contains(netnstest.Exec(t, n.NS, "nft", "list", "set", "inet", dataplane.NFTTable, "ztunnel-pods-ips"), member)
	}
	for _, c := range []struct{ name, cmd string }{
		{"chain flushed", "nft flush chain " + table + " prerouting-ip"},
		{"set element deleted", "nft delete element " + table + " ztunnel-pods-ips { " + member + " }"},
		{"table deleted", "nft delete table " + table},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := repairs.Load()
			netnstest.Exec(t, n.NS, strings.Fields(c.cmd)...)
			start := time.Now()
			for !intact() {
				if time.Since(start) > 2*time.Second {
					t.Fatalf("not repaired 2s after %q:\n%s", c.cmd, netnstest.Exec(t, n.NS, "nft", "list", "ruleset"))
				}
				time.Sleep(10 * time.Millisecond)
			}
			t.Logf("%s: repaired after %v", c.name, time.Since(start).Round(time.Millisecond))
			repairReported(t, func() bool { return repairs.Load() > before })
			requireCaptured(t, n, z)
		})
	}
}

func repairReported(t *testing.T, cond func() bool) {
	t.Helper()
	for start := time.Now(); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Since(start) > 2*time.Second {
			t.Fatal("repair not reported")
		}
	}
}

// watchRules runs n's rule watch until the test ends; the counter is the
// writes of the repairs it reported.
func watchRules(t *testing.T, n *node) *atomic.Int64 {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	repairs := &atomic.Int64{}
	go func() {
		done <- n.dp.WatchIPTables(ctx, func(r dataplane.Result) { repairs.Add(int64(r.TotalWrites())) })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("watch: %v", err)
		}
	})
	time.Sleep(100 * time.Millisecond) // subscribed
	return repairs
}
