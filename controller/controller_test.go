package controller

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/ambient-redirect/ambient-redirect/controller/selection"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// fakeDP returns the queued writes from each Apply.
type fakeDP struct {
	mu     sync.Mutex
	writes []map[string]int
}

func (f *fakeDP) Apply(_ context.Context, _ dataplane.State) (dataplane.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var w map[string]int
	if len(f.writes) > 0 {
		w, f.writes = f.writes[0], f.writes[1:]
	}
	return dataplane.Result{Writes: w}, nil
}
func (f *fakeDP) QueueResync() {}
func (f *fakeDP) WatchIPTables(ctx context.Context, _ func(dataplane.Result)) error {
	<-ctx.Done()
	return nil
}

func (f *fakeDP) WatchNetlink(ctx context.Context, _ func()) error {
	<-ctx.Done()
	return nil
}

func (f *fakeDP) LocateZtunnel(net.IP) (string, string, error) {
	return "", "", errors.New("no ztunnel in this test")
}

func (f *fakeDP) next(w map[string]int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writes = append(f.writes, w)
}

// driftMetric sums ambient_redirect_drift_repairs_total.
func driftMetric(t *testing.T, m *Metrics) int {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0.0
	for _, mf := range mfs {
		if mf.GetName() == "ambient_redirect_drift_repairs_total" {
			for _, s := range mf.GetMetric() {
				n += s.GetCounter().GetValue()
			}
		}
	}
	return int(n)
}

// TestDriftRepairsCountOnlyRestoredState: the first sync's writes create
// state (no drift), a resync's writes towards the state already applied are
// repairs, and a resync that also carries a change is not; /debug/state's
// count and the metric agree.
func TestDriftRepairsCountOnlyRestoredState(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(
		ns("apps", map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient}),
		pod(),
	)
	m := NewMetrics()
	dp := &fakeDP{}
	c := New(client, Config{Selection: selOpts()}, nil, zap.NewNop(), m.Hooks())
	c.inf, c.dp = c.newInformers(ctx), dp
	defer c.inf.cancel()
	if !cache.WaitForCacheSync(ctx.Done(), c.inf.synced...) {
		t.Fatal("caches did not sync")
	}
	check := func(step string, want int) {
		t.Helper()
		got := 0
		for _, v := range c.Status().DriftRepairs {
			got += v
		}
		if got != want || driftMetric(t, m) != want {
			t.Fatalf("%s: drift repairs %v (metric %d), want %d", step, c.Status().DriftRepairs, driftMetric(t, m), want)
		}
	}

	dp.next(map[string]int{dataplane.KindIPSet: 2, dataplane.KindRoute: 5, dataplane.KindIPTables: 1})
	if err := c.syncOnce(ctx, true); err != nil { // startup is a resync
		t.Fatal(err)
	}
	check("first sync on a fresh node", 0)

	dp.next(map[string]int{dataplane.KindRoute: 1, dataplane.KindIPTables: 1})
	if err := c.syncOnce(ctx, true); err != nil {
		t.Fatal(err)
	}
	check("resync restoring the applied state", 2)
	if got := c.Status().DriftRepairs[dataplane.KindRoute]; got != 1 {
		t.Fatalf("route repairs %d", got)
	}

	dp.next(map[string]int{dataplane.KindRoute: 1})
	if err := c.syncOnce(ctx, false); err != nil { // an event, not a resync
		t.Fatal(err)
	}
	check("event sync", 2)

	p2 := pod(func(p *corev1.Pod) {
		p.Name, p.UID, p.Status.PodIP, p.Status.PodIPs = "p2", "u2", "10.244.1.6", []corev1.PodIP{{IP: "10.244.1.6"}}
	})
	if _, err := client.CoreV1().Pods("apps").Create(ctx, p2, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for pods, _ := c.listers(); ; {
		if l, _ := pods.List(labels.Everything()); len(l) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("new pod not in the cache")
		}
		time.Sleep(10 * time.Millisecond)
	}
	dp.next(map[string]int{dataplane.KindIPSet: 1, dataplane.KindRoute: 1})
	if err := c.syncOnce(ctx, true); err != nil {
		t.Fatal(err)
	}
	check("resync carrying a new pod", 2)
}

// TestRemoveAnnotations: only this node's "enabled" annotations go; an
// opt-out is never touched, even one set while cleanup runs.
func TestRemoveAnnotations(t *testing.T) {
	ctx := context.Background()
	anno := func(v string) func(*corev1.Pod) {
		return func(p *corev1.Pod) { p.Annotations = map[string]string{selection.RedirectionAnno: v, "keep": "me"} }
	}
	named := func(name string) func(*corev1.Pod) {
		return func(p *corev1.Pod) { p.Name, p.UID, p.ResourceVersion = name, types.UID("uid-"+name), "1" }
	}
	client := fake.NewClientset(
		pod(named("enabled-1"), anno(selection.RedirectionEnabled)),
		pod(named("enabled-2"), anno(selection.RedirectionEnabled)),
		pod(named("racing"), anno(selection.RedirectionEnabled)), // opted out between list and patch
		pod(named("disabled"), anno(selection.RedirectionDisabled)),
		pod(named("plain")),
		pod(named("other-node"), anno(selection.RedirectionEnabled), func(p *corev1.Pod) { p.Spec.NodeName = "n2" }),
	)
	raced := false
	client.PrependReactor("patch", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.(k8stesting.PatchAction).GetName() != "racing" || raced {
			return false, nil, nil
		}
		raced = true
		p, err := client.Tracker().Get(schema.GroupVersionResource{Version: "v1", Resource: "pods"}, "apps", "racing")
		if err != nil {
			return true, nil, err
		}
		p.(*corev1.Pod).Annotations[selection.RedirectionAnno] = selection.RedirectionDisabled
		if err := client.Tracker().Update(schema.GroupVersionResource{Version: "v1", Resource: "pods"}, p, "apps"); err != nil {
			return true, nil, err
		}
		return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "pods"}, "racing", errors.New("changed"))
	})
	n, err := RemoveAnnotations(ctx, client, "n1")
	if err != nil || n != 2 {
		t.Fatalf("removed %d, %v; want 2", n, err)
	}
	want := map[string]string{"enabled-1": "", "enabled-2": "", "racing": selection.RedirectionDisabled, "disabled": selection.RedirectionDisabled, "plain": "", "other-node": selection.RedirectionEnabled}
	for name, v := range want {
		p, err := client.CoreV1().Pods("apps").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := p.Annotations[selection.RedirectionAnno]; got != v || (v == "" && ok) {
			t.Errorf("%s: annotation %q (present %v), want %q", name, got, ok, v)
		}
		if name != "plain" && p.Annotations["keep"] != "me" {
			t.Errorf("%s: other annotations lost: %v", name, p.Annotations)
		}
	}
	if !raced {
		t.Fatal("the racing pod was never patched")
	}
	if n, err := RemoveAnnotations(ctx, client, "n1"); err != nil || n != 0 {
		t.Fatalf("second run removed %d, %v", n, err)
	}
}
