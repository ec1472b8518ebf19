package controller

import (
	"context"
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
)

// benchController is a controller synced once over 250 dual-stack ambient
// pods, with a fake dataplane.
func benchController(ctx context.Context, b *testing.B) (*Controller, *fakeDP) {
	objs := []runtime.Object{ambientNS()}
	for i := range 250 {
		objs = append(objs, pod(func(p *corev1.Pod) {
			p.Name, p.UID = fmt.Sprintf("p%d", i), types.UID(fmt.Sprint("uid-", i))
			p.Status.PodIPs = []corev1.PodIP{{IP: fmt.Sprintf("10.244.%d.%d", i/250, 1+i%250)}, {IP: fmt.Sprintf("fd00::%x", i+1)}}
			p.Status.PodIP = p.Status.PodIPs[0].IP
		}))
	}
	dp := &fakeDP{}
	return startController(b, ctx, fake.NewClientset(objs...), dp), dp
}

// BenchmarkSyncOnce is the controller's own share of a pod event on a node
// with 250 dual-stack ambient pods (the dataplane is a fake).
func BenchmarkSyncOnce(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, dp := benchController(ctx, b)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		// As after the event of a pod that just got its address: the
		// controller has not seen it enrolled yet.
		key := fmt.Sprintf("apps/p%d", i%250)
		c.mu.Lock()
		delete(c.pods, key)
		c.dirty[key] = true
		c.mu.Unlock()
		if err := c.syncOnce(ctx, false); err != nil {
			b.Fatal(err)
		}
	}
	if dp.applies != 1 || dp.updates != b.N {
		b.Fatalf("%d full applies and %d pod updates over %d events", dp.applies, dp.updates, b.N)
	}
}

// BenchmarkFullSync is a full recomputation (resync, namespace event) at
// 250 pods, for comparison.
func BenchmarkFullSync(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, dp := benchController(ctx, b)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c.mu.Lock()
		c.dirtyAll = true
		c.mu.Unlock()
		dp.forget() // as after a change: no short cut
		if err := c.syncOnce(ctx, false); err != nil {
			b.Fatal(err)
		}
	}
}
