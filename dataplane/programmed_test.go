package dataplane

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
)

// TestProgrammedIsWhatTheKernelHolds: the dataplane answers what is
// programmed from what it wrote (and read back), so a pod whose write
// failed is not programmed, and Applied is unknown until an apply works.
func TestProgrammedIsWhatTheKernelHolds(t *testing.T) {
	f := newFakeNode(t)
	d := f.dataplane(t, nil)
	ctx := context.Background()
	if _, ok := d.Applied(); ok {
		t.Fatal("applied state known before any apply")
	}
	base := pods(2)
	st := State{Ztunnel: f.zt, Pods: base}
	if _, err := d.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	got, ok := d.Applied()
	if !ok || !got.Equal(st) {
		t.Fatalf("applied %+v %v, want %+v", got, ok, st)
	}
	if ips := d.Programmed(base[0].UID); !slices.Equal(ips, base[0].IPs) {
		t.Fatalf("programmed %v, want %v", ips, base[0].IPs)
	}
	injected := errors.New("injected")
	f.nl.FailNext("IpsetAdd", injected)
	newPod := Pod{UID: "new", Name: "apps/new", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.99")}}
	if _, err := d.UpdatePods(ctx, []Pod{newPod}, nil); !errors.Is(err, injected) {
		t.Fatalf("update with a failing write: %v", err)
	}
	if ips := d.Programmed("new"); len(ips) != 0 {
		t.Fatalf("a pod whose member write failed counts as programmed: %v", ips)
	}
	if _, ok := d.Applied(); ok {
		t.Fatal("applied state known after a failed write")
	}
	if _, err := d.UpdatePods(ctx, []Pod{newPod}, nil); err != nil {
		t.Fatal(err)
	}
	if ips := d.Programmed("new"); !slices.Equal(ips, newPod.IPs) {
		t.Fatalf("programmed after the retry: %v", ips)
	}
	if got, ok := d.Applied(); !ok || !got.Equal(State{Ztunnel: f.zt, Pods: append(slices.Clone(base), newPod)}) {
		t.Fatalf("applied after the retry: %+v %v", got, ok)
	}
}

func TestStateEqualIgnoresPodOrder(t *testing.T) {
	ps := pods(3)
	a := State{Pods: ps}
	b := State{Pods: []Pod{ps[2], ps[0], ps[1]}}
	if !a.Equal(b) {
		t.Fatal("same pods in another order are not equal")
	}
	b.Pods[0].IPs = []netip.Addr{netip.MustParseAddr("10.9.9.9")}
	if a.Equal(b) {
		t.Fatal("a moved address is equal")
	}
}
