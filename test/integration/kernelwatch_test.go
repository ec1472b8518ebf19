package integration

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestNetlinkDriftRepairedAtOnce: a deleted route, rule, link or address of
// ours is repaired within a second, not at the resync; our own writes (pod
// churn) are not mistaken for drift.
func TestNetlinkDriftRepairedAtOnce(t *testing.T) {
	n, z := oneNode(t, nil)
	st := n.state(true)
	apply(t, n, st)
	baseline := netnstest.Dump(t, n.NS)

	var mu sync.Mutex
	var repaired []time.Time
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- n.dp.WatchNetlink(ctx, func() {
			n.dp.QueueResync()
			if _, err := n.dp.Apply(ctx, st); err != nil {
				t.Errorf("repair: %v", err)
			}
			mu.Lock()
			repaired = append(repaired, time.Now())
			mu.Unlock()
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("watch: %v", err)
		}
	})
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(repaired)
	}
	time.Sleep(100 * time.Millisecond) // subscribed

	// Our own writes are not drift.
	churn := st
	churn.Pods = st.Pods[:1]
	apply(t, n, churn)
	apply(t, n, st)
	time.Sleep(300 * time.Millisecond)
	if c := count(); c != 0 {
		t.Fatalf("our own pod churn was taken for drift (%d repairs)", c)
	}

	a2 := n.ambient[1].IP.String()
	for _, c := range []struct{ name, cmd string }{
		{"per-pod route", "ip route del " + a2 + "/32 table 100"},
		{"table 102 default", "ip route del default table 102"},
		{"ip rule 101", "ip rule del pref 101"},
		{"ip rule 0 (ours)", "ip rule del pref 0 fwmark 0/0x140 lookup local"},
		{"tunnel address", "ip addr del 192.168.126.1/30 dev istioin"},
		{"IPv6 per-pod route", "ip -6 route del " + n.ambient[1].IP6.String() + "/128 table 100"},
		{"IPv6 ip rule 102", "ip -6 rule del pref 102"},
		{"IPv6 tunnel address", "ip addr del fd00:a17:127::1/126 dev istioout"},
		{"tunnel down", "ip link set istioin down"},
		{"tunnel deleted", "ip link del istioout"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := count()
			start := time.Now()
			netnstest.Exec(t, n.NS, strings.Fields(c.cmd)...)
			for count() == before {
				if time.Since(start) > time.Second {
					t.Fatalf("%q not repaired within 1s", c.cmd)
				}
				time.Sleep(5 * time.Millisecond)
			}
			mu.Lock()
			took := repaired[len(repaired)-1].Sub(start)
			mu.Unlock()
			t.Logf("repaired %v after %q", took.Round(time.Millisecond), c.cmd)
			// Order-insensitive: re-added routes may be listed elsewhere.
			if diff := netnstest.LineDiff(baseline, netnstest.Dump(t, n.NS)); diff != "" {
				t.Fatalf("not back to the converged state:\n%s", diff)
			}
			requireCaptured(t, n, z)
		})
	}
}
