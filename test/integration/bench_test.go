package integration

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// BenchmarkPodChurn measures one pod added to and removed from a node with
// 250 enrolled pods, on a real kernel: time per op (add + remove, two
// applies) and kernel writes per op. Per-pod work is ipset members and
// table-100 routes through netlink, with no process launched.
func BenchmarkPodChurn(b *testing.B) {
	_, nodes := cluster(b, 1, 0, 0)
	n := nodes[0]
	n.dp = newDataplane(b, n, nil)
	base := dataplane.State{Ztunnel: ztunnelOf(n.zt)}
	for i := range 250 {
		base.Pods = append(base.Pods, dataplane.Pod{UID: fmt.Sprintf("uid-%d", i), IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 250, byte(i / 200), byte(1 + i%200)})}})
	}
	apply(b, n, base)
	with := base
	with.Pods = append(append([]dataplane.Pod{}, base.Pods...), dataplane.Pod{UID: "churn", IPs: []netip.Addr{netip.MustParseAddr("10.250.9.9")}})
	ctx := context.Background()

	b.Run("add+remove", func(b *testing.B) {
		writes := map[string]int{}
		for b.Loop() {
			for _, st := range []dataplane.State{with, base} {
				res, err := n.dp.Apply(ctx, st)
				if err != nil {
					b.Fatal(err)
				}
				for k, v := range res.Writes {
					writes[k] += v
				}
			}
		}
		total := 0
		for _, v := range writes {
			total += v
		}
		b.ReportMetric(float64(total)/float64(b.N), "writes/op")
		b.ReportMetric(float64(writes[dataplane.KindIPSet])/float64(b.N), "ipset-writes/op")
		b.ReportMetric(float64(writes[dataplane.KindRoute])/float64(b.N), "route-writes/op")
		b.ReportMetric(float64(writes[dataplane.KindIPTables])/float64(b.N), "iptables-restores/op")
	})
	// What a pod event costs in the agent: UpdatePods with the pod alone,
	// dual-stack (2 members and 2 routes each way).
	b.Run("update-pods add+remove", func(b *testing.B) {
		pod := dataplane.Pod{UID: "churn6", IPs: []netip.Addr{netip.MustParseAddr("10.250.9.10"), netip.MustParseAddr("fd00:250::9:10")}}
		writes := 0
		for b.Loop() {
			for _, up := range [][]dataplane.Pod{{pod}, nil} {
				var rm []string
				if up == nil {
					rm = []string{pod.UID}
				}
				res, err := n.dp.UpdatePods(ctx, up, rm)
				if err != nil {
					b.Fatal(err)
				}
				writes += res.TotalWrites()
			}
		}
		b.ReportMetric(float64(writes)/float64(b.N), "writes/op")
	})
	b.Run("no-change", func(b *testing.B) {
		writes := 0
		for b.Loop() {
			res, err := n.dp.Apply(ctx, base)
			if err != nil {
				b.Fatal(err)
			}
			writes += res.TotalWrites()
		}
		b.ReportMetric(float64(writes)/float64(b.N), "writes/op")
	})
	b.Run("full-resync", func(b *testing.B) {
		writes := 0
		for b.Loop() {
			n.dp.QueueResync()
			res, err := n.dp.Apply(ctx, base)
			if err != nil {
				b.Fatal(err)
			}
			writes += res.TotalWrites()
		}
		b.ReportMetric(float64(writes)/float64(b.N), "writes/op")
	})
}
