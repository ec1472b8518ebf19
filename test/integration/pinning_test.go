package integration

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// TestEnrolmentKeepsOpenConnections: connections open before a pod is
// enrolled keep flowing directly, both ways, while its new connections are
// captured; released, its captured connections keep their ztunnel.
func TestEnrolmentKeepsOpenConnections(t *testing.T) {
	n, z := oneNode(t, nil)
	a1, a2, p1 := n.ambient[0], n.ambient[1], n.plain[0]
	n.ambient = []*netnstest.Pod{a2} // a1 is not enrolled yet
	apply(t, n, n.state(true))

	out := netnstest.StartLineStream(t, a1.NS, ipPort(p1.IP, echoPort)) // a1 the client
	in := netnstest.StartLineStream(t, p1.NS, ipPort(a1.IP, echoPort))  // a1 the server
	time.Sleep(300 * time.Millisecond)
	out.Check(t, "before enrolment")
	in.Check(t, "before enrolment")

	n.ambient = []*netnstest.Pod{a1, a2}
	apply(t, n, n.state(true))
	// New connections are captured at once.
	before := len(z.all(t))
	roundTrip(t, a1.NS, ipPort(p1.IP, echoPort))
	if _, ok := z.find(t, func(r record.Record) bool {
		return r.Listener == 15001 && hostOf(r.Client) == a1.IP.String()
	}); !ok || len(z.all(t)) == before {
		t.Fatal("a new connection of the enrolled pod was not captured")
	}
	time.Sleep(5 * time.Second)
	out.Check(t, "5s after enrolment")
	in.Check(t, "5s after enrolment")

	// Captured before release, kept through its ztunnel after it.
	captured := netnstest.StartLineStream(t, a1.NS, ipPort(p1.IP, echoPort))
	time.Sleep(300 * time.Millisecond)
	n.ambient = []*netnstest.Pod{a2}
	apply(t, n, n.state(true))
	before = len(z.all(t))
	roundTrip(t, a1.NS, ipPort(p1.IP, echoPort))
	if got := z.all(t); len(got) != before {
		t.Fatalf("a released pod's new connection was captured: %+v", got[before:])
	}
	time.Sleep(5 * time.Second)
	captured.Check(t, "5s after release")
	out.Check(t, "5s after release")
	in.Check(t, "5s after release")
}

// TestSurgeRolloutKeepsOldConnections: during a surge rollout the old
// ztunnel keeps the connections it accepted while it runs (and across an
// agent restart), new ones go to the new ztunnel at once, and once the old
// one is gone its leftovers fail fast.
func TestSurgeRolloutKeepsOldConnections(t *testing.T) {
	n, zA := oneNode(t, nil)
	a1, p1 := n.ambient[0], n.plain[0]
	apply(t, n, n.state(true))
	requireCaptured(t, n, zA)
	out := netnstest.StartLineStream(t, a1.NS, ipPort(p1.IP, echoPort)) // outbound, through A
	in := netnstest.StartLineStream(t, p1.NS, ipPort(a1.IP, echoPort))  // inbound, through A
	time.Sleep(300 * time.Millisecond)

	podB := n.AddPod(t, "ztunnel-b")
	if err := os.Symlink(netnstest.NsPath(podB.NS), filepath.Join(n.nsDir, podB.NS)); err != nil {
		t.Fatal(err)
	}
	zB := startZtunnel(t, podB)
	podA := n.zt
	st := n.state(true)
	st.Ztunnel, st.Draining = ztunnelOf(podB), []*dataplane.Ztunnel{ztunnelOf(podA)}
	apply(t, n, st)
	n.zt = podB
	requireCaptured(t, n, zB) // new connections: the new ztunnel, at once
	time.Sleep(2 * time.Second)
	out.Check(t, "2s into the rollout")
	in.Check(t, "2s into the rollout")

	// An agent restart in the middle changes nothing.
	n.dp = newDataplane(t, n, nil)
	if res := apply(t, n, st); res.TotalWrites() != 0 {
		t.Fatalf("a restarted agent wrote %v mid-rollout:\n%s", res.Writes, strings.Join(res.Changes, "\n"))
	}
	time.Sleep(3 * time.Second)
	out.Check(t, "5s into the rollout, after an agent restart")
	in.Check(t, "5s into the rollout, after an agent restart")
	requireCaptured(t, n, zB)

	// The old ztunnel goes: its leftovers fail fast, new ones keep working.
	gone := time.Now()
	zA.proc.Stop()
	podA.Delete(t)
	st.Draining = nil
	apply(t, n, st)
	for _, s := range []*netnstest.LineStream{out, in} {
		for s.Failed() == nil {
			if time.Since(gone) > time.Second {
				t.Fatal("a connection of the deleted ztunnel still runs 1s after it went")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Logf("leftover connections failed %v after the old ztunnel went", time.Since(gone).Round(time.Millisecond))
	requireCaptured(t, n, zB)
}

// TestEnrolmentResetsOpenConnections: with --on-enroll=reset a pod's
// connections from before its enrolment are reset at their next packet,
// both ways, and its new connections are captured.
func TestEnrolmentResetsOpenConnections(t *testing.T) {
	n, z := oneNode(t, func(c *dataplane.Config) { c.OnEnroll = dataplane.OnEnrollReset })
	a1, a2, p1 := n.ambient[0], n.ambient[1], n.plain[0]
	n.ambient = []*netnstest.Pod{a2}
	apply(t, n, n.state(true))
	out := netnstest.StartLineStream(t, a1.NS, ipPort(p1.IP, echoPort))
	in := netnstest.StartLineStream(t, p1.NS, ipPort(a1.IP, echoPort))
	time.Sleep(300 * time.Millisecond)
	out.Check(t, "before enrolment")
	in.Check(t, "before enrolment")

	n.ambient = []*netnstest.Pod{a1, a2}
	enrolled := time.Now()
	apply(t, n, n.state(true))
	for _, s := range []*netnstest.LineStream{out, in} {
		for s.Failed() == nil {
			if time.Since(enrolled) > time.Second {
				t.Fatal("a connection from before enrolment still runs 1s after it")
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := s.Failed(); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("want a TCP reset, got %v", err)
		}
	}
	t.Logf("connections from before enrolment reset %v after it", time.Since(enrolled).Round(time.Millisecond))
	requireCaptured(t, n, z)
	captured := netnstest.StartLineStream(t, a1.NS, ipPort(p1.IP, echoPort))
	time.Sleep(time.Second)
	captured.Check(t, "a captured connection with --on-enroll=reset")
}
