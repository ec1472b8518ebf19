package controller

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func (c *Controller) handedOver(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.cni.Get(key)
	return ok
}

// matchesFullSync fails unless the dataplane holds what a full recompute gives.
func matchesFullSync(t *testing.T, c *Controller, dp *fakeDP) {
	t.Helper()
	st, _, _, _ := c.desired()
	want := map[string]dataplane.Pod{}
	for _, p := range st.Pods {
		want[p.UID] = p
	}
	if !reflect.DeepEqual(dp.pods, want) {
		t.Fatalf("dataplane holds %v; a full sync gives %v", dp.pods, want)
	}
}

// cniAnswer is what HandleCNI returned.
type cniAnswer struct {
	res cni.Response
	err error
}

// addAsync calls HandleCNI in the background, as the plugin does and
// waits.
func addAsync(ctx context.Context, c *Controller, req cni.Request) <-chan cniAnswer {
	got := make(chan cniAnswer, 1)
	go func() {
		res, err := c.HandleCNI(ctx, req)
		got <- cniAnswer{res, err}
	}()
	return got
}

// TestUnchangedDirtyPodKeepsItsAddress: a pod whose event changed nothing
// it is programmed with still owns its address when another pod of the
// same batch claims it.
func TestUnchangedDirtyPodKeepsItsAddress(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(ambientNS(), pod()) // apps/p, 10.244.1.5
	dp := &fakeDP{}
	c := startController(t, ctx, client, dp)
	pods := client.CoreV1().Pods("apps")
	p, _ := pods.Get(ctx, "p", metav1.GetOptions{})
	p.Labels = map[string]string{"x": "y"}
	if _, err := pods.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.Create(ctx, pod(func(p *corev1.Pod) { p.Name, p.UID = "q", "u2" }), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "both events", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.dirty["apps/p"] && c.dirty["apps/q"] })
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	matchesFullSync(t, c, dp)
}

var errLocate = errors.New("transient netns scan failure")

// flakyDP fails LocateZtunnel while fail is set.
type flakyDP struct {
	*fakeDP
	mu     sync.Mutex
	fail   bool
	lastZt *dataplane.Ztunnel
}

func (f *flakyDP) LocateZtunnel(net.IP) (string, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return "", "", errLocate
	}
	return "veth-zt", "/run/netns/zt", nil
}

func (f *flakyDP) Apply(ctx context.Context, st dataplane.State) (dataplane.Result, error) {
	f.mu.Lock()
	f.lastZt = st.Ztunnel
	f.mu.Unlock()
	return f.fakeDP.Apply(ctx, st)
}

// TestZtunnelLookupFailureIsRetried: a sync whose apply worked but whose
// ztunnel lookup failed counts its pods as programmed, and its retry is a
// full sync that finds the ztunnel.
func TestZtunnelLookupFailureIsRetried(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	zt := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "ztunnel-a", UID: "zt", Labels: map[string]string{"app": "ztunnel"}},
		Spec:       corev1.PodSpec{NodeName: "n1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.2", PodIPs: []corev1.PodIP{{IP: "10.244.1.2"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	dp := &flakyDP{fakeDP: &fakeDP{}, fail: true}
	c := newTestController(t, ctx, fake.NewClientset(ambientNS(), ns("istio-system", nil), zt, pod()), dp, Hooks{})
	if err := c.syncOnce(ctx, true); !errors.Is(err, errLocate) {
		t.Fatalf("start-up sync: %v, want the lookup failure", err)
	}
	if len(dp.Programmed("u1")) == 0 {
		t.Fatal("a pod applied while the ztunnel lookup failed is not counted as programmed")
	}
	dp.mu.Lock()
	dp.fail = false
	dp.mu.Unlock()
	if err := c.syncOnce(ctx, false); err != nil { // what Run does after the backoff
		t.Fatal(err)
	}
	if dp.lastZt == nil {
		t.Fatal("the retry did not re-locate the ztunnel")
	}
}

// TestCNIAddForARecreatedPod: a pod recreated under the same name (new
// UID) while the cache still holds the old one is handed over by ADD; the
// old pod's deletion must not make ADD answer "not ambient".
func TestCNIAddForARecreatedPod(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(ambientNS(), pod()) // old apps/p, UID u1
	newPod := pod(func(p *corev1.Pod) {
		p.UID, p.Status.PodIP, p.Status.PodIPs, p.Status.Phase = "u-new", "", nil, corev1.PodPending
	})
	client.PrependReactor("get", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) { // the API is ahead of our watch
		if a.(k8stesting.GetAction).GetName() == "p" {
			return true, newPod.DeepCopy(), nil
		}
		return false, nil, nil
	})
	dp := &fakeDP{}
	c := startController(t, ctx, client, dp)
	got := addAsync(ctx, c, cni.Request{Command: cni.CommandAdd, PodNamespace: "apps", PodName: "p", PodUID: "u-new",
		ContainerID: "c2", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.7")}})
	waitFor(t, "ADD handed over", func() bool { return c.handedOver("apps/p") })
	podsGVR := schema.GroupVersionResource{Version: "v1", Resource: "pods"}
	if err := client.Tracker().Delete(podsGVR, "apps", "p"); err != nil {
		t.Fatal(err)
	}
	pods, _ := c.listers()
	waitFor(t, "old pod gone", func() bool { _, err := pods.Pods("apps").Get("p"); return err != nil })
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := client.Tracker().Add(newPod); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "new pod cached", func() bool { p, err := pods.Pods("apps").Get("p"); return err == nil && p.UID == "u-new" })
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	if a := <-got; a.err != nil || !a.res.Ambient || !a.res.Programmed {
		t.Fatalf("ADD of the recreated pod: %+v %v", a.res, a.err)
	}
	if p := dp.pods["u-new"]; !slices.Equal(p.IPs, []netip.Addr{netip.MustParseAddr("10.244.1.7")}) {
		t.Fatalf("dataplane holds %v", dp.pods)
	}
}

// TestCNIAddForARecreatedSandbox: a running pod whose sandbox is recreated
// with a new address (its DEL found nothing: it predates the plugin) is
// programmed with the new address at ADD, not the stale status one.
func TestCNIAddForARecreatedSandbox(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dp := &fakeDP{}
	c := startController(t, ctx, fake.NewClientset(ambientNS(), pod()), dp) // apps/p u1 10.244.1.5
	if _, err := c.HandleCNI(ctx, cni.Request{Command: cni.CommandDel, PodNamespace: "apps", PodName: "p", PodUID: "u1", ContainerID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, ok := dp.pods["u1"]; ok {
		t.Fatal("the deleted sandbox's address is still programmed")
	}
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	done := addAsync(rctx, c, cni.Request{Command: cni.CommandAdd, PodNamespace: "apps", PodName: "p", PodUID: "u1",
		ContainerID: "c2", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.8")}})
	waitFor(t, "ADD handed over", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		sb, _ := c.cni.Get("apps/p")
		return sb.ContainerID == "c2"
	})
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	if a := <-done; a.err != nil {
		t.Fatalf("ADD of the new sandbox: %v", a.err)
	}
	if p := dp.pods["u1"]; !slices.Equal(p.IPs, []netip.Addr{netip.MustParseAddr("10.244.1.8")}) {
		t.Fatalf("dataplane holds %v, want the new sandbox's address", dp.pods)
	}
}

// TestCNIPodWinsItsAddressFromAStaleObject: a stale pod object still
// claims the address IPAM just gave to a sandbox; the pod handed over by
// CNI is programmed with it, whatever the names' order.
func TestCNIPodWinsItsAddressFromAStaleObject(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stale := pod(func(p *corev1.Pod) { p.Name, p.UID = "a-stale", "u-stale" }) // 10.244.1.5, sorts first
	fresh := pod(func(p *corev1.Pod) {
		p.Name, p.UID, p.Status.PodIP, p.Status.PodIPs, p.Status.Phase = "b-fresh", "u-fresh", "", nil, corev1.PodPending
	})
	dp := &fakeDP{}
	c := startController(t, ctx, fake.NewClientset(ambientNS(), stale, fresh), dp)
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	done := addAsync(rctx, c, cni.Request{Command: cni.CommandAdd, PodNamespace: "apps", PodName: "b-fresh", PodUID: "u-fresh",
		ContainerID: "c1", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.5")}})
	waitFor(t, "ADD handed over", func() bool { return c.handedOver("apps/b-fresh") })
	for range 2 { // the incremental sync sees the claim and falls back to a full one
		if err := c.syncOnce(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	if a := <-done; a.err != nil {
		t.Fatalf("ADD: %v", a.err)
	}
	if _, ok := dp.pods["u-fresh"]; !ok {
		t.Fatalf("dataplane holds %v", dp.pods)
	}
	if _, ok := dp.pods["u-stale"]; ok {
		t.Fatalf("the stale object kept the address: %v", dp.pods)
	}
	matchesFullSync(t, c, dp)
}

// TestCNIAddWaitsForASyncThatSawTheSandbox: a pod the caches already know
// without an address (not enrolled) is handed over by CNI ADD; ADD must
// not answer from that earlier decision, only once a later sync has
// programmed the pod with the sandbox's addresses.
func TestCNIAddWaitsForASyncThatSawTheSandbox(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	noIP := pod(func(p *corev1.Pod) { p.Status.PodIP, p.Status.PodIPs, p.Status.Phase = "", nil, corev1.PodPending })
	dp := &fakeDP{}
	c := startController(t, ctx, fake.NewClientset(ambientNS(), noIP), dp)
	if st := c.Status(); len(st.Pods) != 1 || st.Pods[0].Enrolled {
		t.Fatalf("before ADD: %+v", st.Pods)
	}
	ip := netip.MustParseAddr("10.244.1.9")
	got := addAsync(ctx, c, cni.Request{Command: cni.CommandAdd, PodNamespace: noIP.Namespace, PodName: noIP.Name,
		PodUID: string(noIP.UID), IPs: []netip.Addr{ip}})
	select {
	case a := <-got:
		t.Fatalf("ADD answered before any sync saw the sandbox: %+v %v", a.res, a.err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	a := <-got
	if a.err != nil || !a.res.Ambient || !a.res.Programmed {
		t.Fatalf("ADD: %+v %v", a.res, a.err)
	}
	if p, ok := dp.pods[string(noIP.UID)]; !ok || !slices.Equal(p.IPs, []netip.Addr{ip}) {
		t.Fatalf("dataplane holds %+v", dp.pods)
	}
}

// TestCNICheck: CHECK fails (ambient, not programmed) for an ambient pod
// the agent has not programmed with this sandbox's addresses, whether it
// never saw an ADD, has no address yet, or holds other addresses; it passes
// for a programmed pod and for a pod that is not ambient.
func TestCNICheck(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	unprogrammed := pod(func(p *corev1.Pod) {
		p.Name, p.UID, p.Status.PodIP, p.Status.PodIPs, p.Status.Phase = "q", "u2", "", nil, corev1.PodPending
	})
	plain := pod(func(p *corev1.Pod) {
		p.Namespace, p.Name, p.UID, p.Status.PodIP, p.Status.PodIPs = "plain", "r", "u3", "10.244.1.6", nil
	})
	client := fake.NewClientset(ambientNS(), ns("plain", nil), pod(), unprogrammed, plain)
	c := startController(t, ctx, client, &fakeDP{})
	if err := c.syncOnce(ctx, true); err != nil {
		t.Fatal(err)
	}
	ip := func(s string) []netip.Addr { return []netip.Addr{netip.MustParseAddr(s)} }
	for _, tc := range []struct {
		name, ns, pod, uid string
		ips                []netip.Addr
		ambient, ok        bool
	}{
		{"programmed", "apps", "p", "u1", ip("10.244.1.5"), true, true},
		{"other sandbox addresses", "apps", "p", "u1", ip("10.244.1.9"), true, false},
		{"never added", "apps", "q", "u2", ip("10.244.1.8"), true, false},
		{"never added, no prevResult", "apps", "q", "u2", nil, true, false},
		{"not ambient", "plain", "r", "u3", ip("10.244.1.6"), false, false},
	} {
		res, err := c.HandleCNI(ctx, cni.Request{Command: cni.CommandCheck, PodNamespace: tc.ns, PodName: tc.pod, PodUID: tc.uid, IPs: tc.ips})
		if err != nil || res.Ambient != tc.ambient || res.Programmed != tc.ok {
			t.Errorf("%s: CHECK = %+v, %v; want ambient=%v programmed=%v", tc.name, res, err, tc.ambient, tc.ok)
		}
	}
}

// TestCNIAddWaitsForAZtunnelWhenFailClosed: with fail mode closed, the ADD
// of an ambient pod on a node with no ztunnel programmed waits (the pod
// would start with its TCP reset) and returns once a ztunnel is; with no
// ztunnel at all it fails at the plugin's timeout, saying why.
func TestCNIAddWaitsForAZtunnelWhenFailClosed(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(ambientNS(), ns("istio-system", nil))
	dp := &flakyDP{fakeDP: &fakeDP{}}
	c := newTestController(t, ctx, client, dp, Hooks{})
	c.cfg.WaitForZtunnel = true
	if err := c.syncOnce(ctx, true); err != nil {
		t.Fatal(err)
	}
	newPod := pod(func(p *corev1.Pod) { p.Status = corev1.PodStatus{Phase: corev1.PodPending} })
	if _, err := client.CoreV1().Pods("apps").Create(ctx, newPod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	req := cni.Request{Command: cni.CommandAdd, PodNamespace: "apps", PodName: "p", PodUID: "u1", ContainerID: "c1",
		IPs: []netip.Addr{netip.MustParseAddr("10.244.1.5")}}
	short, stop := context.WithTimeout(ctx, 300*time.Millisecond)
	go func() { // what the sync loop does on each event
		for short.Err() == nil {
			_ = c.syncOnce(ctx, false)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	_, err := c.HandleCNI(short, req)
	stop()
	if err == nil || !strings.Contains(err.Error(), "no ztunnel on this node yet") {
		t.Fatalf("ADD with no ztunnel, fail closed: %v; want a refusal naming the missing ztunnel", err)
	}
	got := addAsync(ctx, c, req)
	zt := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "ztunnel-a", UID: "zt", Labels: map[string]string{"app": "ztunnel"}},
		Spec:       corev1.PodSpec{NodeName: "n1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.2", PodIPs: []corev1.PodIP{{IP: "10.244.1.2"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	select {
	case a := <-got:
		t.Fatalf("ADD returned before a ztunnel existed: %+v %v", a.res, a.err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := client.CoreV1().Pods("istio-system").Create(ctx, zt, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pods, _ := c.listers()
	waitFor(t, "ztunnel cached", func() bool { _, err := pods.Pods("istio-system").Get("ztunnel-a"); return err == nil })
	if err := c.syncOnce(ctx, false); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-got:
		if a.err != nil || !a.res.Programmed {
			t.Fatalf("ADD once the ztunnel is programmed: %+v %v", a.res, a.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ADD did not return once a ztunnel was programmed")
	}
}
