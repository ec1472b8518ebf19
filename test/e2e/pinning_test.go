package e2e

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestNoConnectionBrokenByRedirectionChanges: long-lived connections (a
// line every 100 ms, each echoed within 2 s) survive their pod's enrolment,
// its release, and a surge rollout of ztunnel with an agent restart in the
// middle; new connections follow each new state at once; the old ztunnel's
// leftovers fail fast once it is gone.
func TestNoConnectionBrokenByRedirectionChanges(t *testing.T) {
	T := t // streams and ztunnels outlive the subtest that starts them
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	const ns = "other" // not ambient yet
	c1 := e.RunPod(t, n, ns, "c1")
	p1 := e.RunPod(t, n, harness.PlainNS, "p1")
	e.StartAgent(t, n)
	zt := n.ZT
	dst := func(p *harness.Pod) string { return harness.Hostport(p.IP, harness.EchoPort) }

	// firstCaptured waits for a new connection c1 -> p1 to be captured by z
	// and returns how long after since that took.
	firstCaptured := func(t *testing.T, z *harness.Ztunnel, since time.Time) time.Duration {
		var took time.Duration
		harness.Eventually(t, 3*time.Second, func() error {
			before := z.Count(t, 15001, c1.IP, dst(p1))
			if err := harness.RoundTrip(c1, dst(p1)); err != nil {
				return err
			}
			took = time.Since(since)
			// The record trails the round trip by a little.
			for range 10 {
				if z.Count(t, 15001, c1.IP, dst(p1)) > before {
					return nil
				}
				time.Sleep(10 * time.Millisecond)
			}
			return fmt.Errorf("%s -> %s not captured", c1.IP, dst(p1))
		})
		return took
	}

	t.Run("enrolment keeps the pod's open connections", func(t *testing.T) {
		out := netnstest.StartLineStream(T, c1.Net.NS, dst(p1))
		in := netnstest.StartLineStream(T, p1.Net.NS, dst(c1))
		time.Sleep(300 * time.Millisecond)
		labelled := time.Now()
		e.LabelNamespace(t, ns, true)
		t.Logf("first new connection captured %v after the label", firstCaptured(t, zt, labelled).Round(time.Millisecond))
		time.Sleep(time.Until(labelled.Add(5 * time.Second)))
		out.Check(t, "5s after enrolment (outbound)")
		in.Check(t, "5s after enrolment (inbound)")
	})

	t.Run("release keeps the captured connections", func(t *testing.T) {
		captured := netnstest.StartLineStream(T, c1.Net.NS, dst(p1))
		time.Sleep(300 * time.Millisecond)
		released := time.Now()
		e.LabelNamespace(t, ns, false)
		harness.Eventually(t, 3*time.Second, func() error { return harness.Direct(t, c1, p1, zt) })
		t.Logf("new connections direct %v after the label went", time.Since(released).Round(time.Millisecond))
		time.Sleep(time.Until(released.Add(5 * time.Second)))
		captured.Check(t, "5s after release")
	})

	t.Run("surge rollout with an agent restart: the old ztunnel keeps its connections while it runs", func(t *testing.T) {
		e.LabelNamespace(t, ns, true)
		firstCaptured(t, zt, time.Now())
		out := netnstest.StartLineStream(T, c1.Net.NS, dst(p1)) // through the old ztunnel
		in := netnstest.StartLineStream(T, p1.Net.NS, dst(c1))
		time.Sleep(1100 * time.Millisecond) // creation timestamps have second resolution
		nz := e.StartZtunnel(T, n, "ztunnel-"+n.Name+"-v2")
		ready := time.Now()
		took := firstCaptured(t, nz, ready)
		t.Logf("first connection captured by the new ztunnel %v after it was Ready", took.Round(time.Millisecond))
		if took > 200*time.Millisecond {
			t.Errorf("the new ztunnel got new connections %v after it was Ready, want <= 200ms", took)
		}

		e.StopAgent(n)
		e.StartAgent(T, n)
		if w := e.KernelWrites(t, n); w != 0 {
			t.Fatalf("an agent restarted mid-rollout made %d kernel writes: %+v", w, e.State(t, n).LastSync)
		}
		firstCaptured(t, nz, time.Now())

		// Deleted gracefully: terminating, its process still running.
		grace := int64(30)
		if err := e.Client.CoreV1().Pods(zt.Pod.Obj.Namespace).Delete(t.Context(), zt.Pod.Obj.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Until(ready.Add(5 * time.Second)))
		out.Check(t, "5s into the rollout, old ztunnel terminating")
		in.Check(t, "5s into the rollout, old ztunnel terminating")

		// Gone: its leftovers fail fast, new connections keep working.
		gone := time.Now()
		zt.Proc.Stop()
		e.DeletePod(t, zt.Pod)
		for _, s := range []*netnstest.LineStream{out, in} {
			harness.Eventually(t, time.Second, func() error {
				if s.Failed() == nil {
					return fmt.Errorf("a connection of the deleted ztunnel still runs")
				}
				return nil
			})
		}
		t.Logf("leftover connections failed %v after the old ztunnel went", time.Since(gone).Round(time.Millisecond))
		n.ZT = nz
		firstCaptured(t, nz, time.Now())
	})
}

// TestOnEnrollReset: with --on-enroll=reset a pod's connections from
// before its enrolment get a TCP reset within a second of it, both ways,
// and its new connections are captured.
func TestOnEnrollReset(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	const ns = "other" // not ambient yet
	c1 := e.RunPod(t, n, ns, "c1")
	p1 := e.RunPod(t, n, harness.PlainNS, "p1")
	e.StartAgent(t, n, "--on-enroll", "reset")
	out := netnstest.StartLineStream(t, c1.Net.NS, harness.Hostport(p1.IP, harness.EchoPort))
	in := netnstest.StartLineStream(t, p1.Net.NS, harness.Hostport(c1.IP, harness.EchoPort))
	time.Sleep(300 * time.Millisecond)
	out.Check(t, "before enrolment (outbound)")
	in.Check(t, "before enrolment (inbound)")
	labelled := time.Now()
	e.LabelNamespace(t, ns, true)
	for _, s := range []*netnstest.LineStream{out, in} {
		harness.Eventually(t, time.Second, func() error {
			if err := s.Failed(); !errors.Is(err, syscall.ECONNRESET) {
				return fmt.Errorf("want a TCP reset, have %v", err)
			}
			return nil
		})
	}
	t.Logf("connections from before enrolment reset %v after the label", time.Since(labelled).Round(time.Millisecond))
	harness.Eventually(t, 3*time.Second, func() error { return harness.Captured(t, n.ZT, 15001, c1, p1) })
}
