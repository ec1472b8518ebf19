package controller

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/netip"
	"reflect"
	"slices"
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
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
)

// fakeDP returns the queued writes from each Apply and keeps the pods it
// was given, refusing an address two pods claim as the dataplane does.
type fakeDP struct {
	mu     sync.Mutex
	writes []map[string]int
	pods   map[string]dataplane.Pod
	zt     dataplane.State
	// sidecars are the sidecar pods of the last Apply, by UID.
	sidecars map[string]bool
	// applied: the last Apply worked (and forget was not called since).
	applied bool
	// applies and updates count full and pod-only applies.
	applies, updates int
}

func (f *fakeDP) Apply(_ context.Context, st dataplane.State) (dataplane.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := st.Validate(); err != nil {
		return dataplane.Result{}, err
	}
	f.applies++
	f.pods = map[string]dataplane.Pod{}
	for _, p := range st.Pods {
		f.pods[p.UID] = p
	}
	f.zt, f.applied = dataplane.State{Ztunnel: st.Ztunnel, Draining: st.Draining, Sidecars: st.Sidecars, ServiceCIDRs: st.ServiceCIDRs}, true
	f.sidecars = map[string]bool{}
	for _, s := range st.Sidecars {
		f.sidecars[s.UID] = true
	}
	return dataplane.Result{Writes: f.nextWrites()}, nil
}

func (f *fakeDP) UpdatePods(_ context.Context, upsert []dataplane.Pod, remove []string) (dataplane.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	next := maps.Clone(f.pods)
	for _, uid := range remove {
		delete(next, uid)
	}
	for _, p := range upsert {
		next[p.UID] = p
	}
	if err := (dataplane.State{Pods: slices.Collect(maps.Values(next))}).Validate(); err != nil {
		return dataplane.Result{}, err
	}
	f.updates++
	f.pods = next
	return dataplane.Result{Writes: f.nextWrites()}, nil
}

func (f *fakeDP) Applied() (dataplane.State, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.zt
	st.Pods = slices.Collect(maps.Values(f.pods))
	return st, f.applied
}

func (f *fakeDP) Programmed(uid string) []netip.Addr {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pods[uid].IPs
}

func (f *fakeDP) SidecarProgrammed(uid string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sidecars[uid], nil
}

func (f *fakeDP) Sidecars() []dataplane.SidecarState { return nil }

// forget makes what the kernel holds unknown, as a failed write does.
func (f *fakeDP) forget() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applied = false
}

func (f *fakeDP) nextWrites() map[string]int {
	var w map[string]int
	if len(f.writes) > 0 {
		w, f.writes = f.writes[0], f.writes[1:]
	}
	return w
}

// clientsetAPI is a client-go clientset (a fake here) as the API.
type clientsetAPI struct{ kubernetes.Interface }

func (c clientsetAPI) Pods(ns string) PodAPI    { return c.CoreV1().Pods(ns) }
func (c clientsetAPI) Namespaces() NamespaceAPI { return c.CoreV1().Namespaces() }
func (c clientsetAPI) ServiceCIDRs() ServiceCIDRAPI {
	return c.NetworkingV1().ServiceCIDRs()
}
func (c clientsetAPI) Readyz(ctx context.Context) error {
	return c.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Error()
}

// newTestController is a controller over client (its informers synced)
// and dp, before its first sync.
func newTestController(tb testing.TB, ctx context.Context, client *fake.Clientset, dp Dataplane, hooks Hooks) *Controller {
	tb.Helper()
	c := New(clientsetAPI{client}, Config{Selection: selOpts()}, nil, zap.NewNop(), hooks)
	c.inf, c.dp = c.newInformers(ctx), dp
	tb.Cleanup(c.inf.cancel)
	if !cache.WaitForCacheSync(ctx.Done(), c.inf.synced...) {
		tb.Fatal("caches did not sync")
	}
	return c
}

// startController is newTestController after its start-up sync.
func startController(tb testing.TB, ctx context.Context, client *fake.Clientset, dp Dataplane) *Controller {
	tb.Helper()
	c := newTestController(tb, ctx, client, dp, Hooks{})
	if err := c.syncOnce(ctx, true); err != nil {
		tb.Fatal(err)
	}
	return c
}

func ambientNS() *corev1.Namespace {
	return ns("apps", map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient})
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
		ambientNS(),
		pod(),
	)
	m := NewMetrics()
	dp := &fakeDP{}
	c := newTestController(t, ctx, client, dp, m.Hooks())
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
	n, err := RemoveAnnotations(ctx, clientsetAPI{client}, "n1")
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
	if n, err := RemoveAnnotations(ctx, clientsetAPI{client}, "n1"); err != nil || n != 0 {
		t.Fatalf("second run removed %d, %v", n, err)
	}
}

// TestPodEventsSyncIncrementally: pod events are programmed as pod-only
// updates, namespace and address-conflict events as full applies, and
// after every step the dataplane holds exactly what a full recomputation
// from the caches gives.
func TestPodEventsSyncIncrementally(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(ambientNS(), ns("plain", nil), pod())
	dp := &fakeDP{}
	c := startController(t, ctx, client, dp)
	pods := client.CoreV1().Pods("apps")
	// step makes a change, waits for its event, syncs, and checks what
	// the dataplane holds and how it got there.
	step := func(name string, change func() error, wantApplies, wantUpdates int) {
		t.Helper()
		c.mu.Lock()
		c.pendingSince = time.Time{}
		c.mu.Unlock()
		if err := change(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			c.mu.Lock()
			seen := !c.pendingSince.IsZero()
			c.mu.Unlock()
			if seen {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no event", name)
			}
			time.Sleep(5 * time.Millisecond)
		}
		applies, updates := dp.applies, dp.updates
		if err := c.syncOnce(ctx, false); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if dp.applies-applies != wantApplies || dp.updates-updates != wantUpdates {
			t.Errorf("%s: %d full applies and %d pod updates, want %d and %d", name, dp.applies-applies, dp.updates-updates, wantApplies, wantUpdates)
		}
		st, _, _, _ := c.desired()
		want := map[string]dataplane.Pod{}
		for _, p := range st.Pods {
			want[p.UID] = p
		}
		if !reflect.DeepEqual(dp.pods, want) {
			t.Fatalf("%s: dataplane holds %+v, a full sync gives %+v", name, dp.pods, want)
		}
		if got := c.LastDesired(); !reflect.DeepEqual(got.Pods, st.Pods) && len(st.Pods) > 0 {
			t.Fatalf("%s: last desired %+v, want %+v", name, got.Pods, st.Pods)
		}
	}
	mk := func(name, uid, ip string, mut ...func(*corev1.Pod)) func() error {
		return func() error {
			p := pod(append([]func(*corev1.Pod){func(p *corev1.Pod) {
				p.Name, p.UID, p.Status.PodIP, p.Status.PodIPs = name, types.UID(uid), ip, []corev1.PodIP{{IP: ip}}
			}}, mut...)...)
			_, err := pods.Create(ctx, p, metav1.CreateOptions{})
			return err
		}
	}
	update := func(name string, mut func(*corev1.Pod)) func() error {
		return func() error {
			p, err := pods.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			before := p.Status.DeepCopy()
			mut(p)
			if reflect.DeepEqual(before, &p.Status) {
				_, err = pods.Update(ctx, p, metav1.UpdateOptions{})
			} else {
				_, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{})
			}
			return err // one event per step
		}
	}
	step("pod added", mk("p2", "u2", "10.244.1.6"), 0, 1)
	step("pod gets a second family", update("p2", func(p *corev1.Pod) {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::6"})
	}), 0, 1)
	step("pod opts out", update("p2", func(p *corev1.Pod) { p.Labels = map[string]string{selection.DataplaneModeLabel: "none"} }), 0, 1)
	step("pod opts in again", update("p2", func(p *corev1.Pod) { p.Labels = nil }), 0, 1)
	step("status-only change", update("p2", func(p *corev1.Pod) { p.Status.Message = "x" }), 0, 0)
	// The first by namespace/name keeps it: nothing to program.
	step("address claimed twice", mk("p3", "u3", "10.244.1.6"), 0, 0)
	// p3 takes the address over, which only a full sync sees.
	step("pod holding a contested address deleted", func() error { return pods.Delete(ctx, "p2", metav1.DeleteOptions{}) }, 1, 0)
	step("pod deleted", func() error { return pods.Delete(ctx, "p3", metav1.DeleteOptions{}) }, 0, 1)
	step("namespace label removed", func() error {
		n, err := client.CoreV1().Namespaces().Get(ctx, "apps", metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Labels = nil
		_, err = client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{})
		return err
	}, 1, 0)
}
