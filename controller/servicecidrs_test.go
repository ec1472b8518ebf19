package controller

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func serviceCIDR(name string, cidrs ...string) *networkingv1.ServiceCIDR {
	return &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: cidrs}}
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// serviceCIDRController is a controller over client and dp with flag as
// --service-cidr, started as Run starts it (the ServiceCIDR probe, then
// the informers, synced), before its first sync.
func serviceCIDRController(t *testing.T, ctx context.Context, client *fake.Clientset, dp Dataplane, flag []netip.Prefix, log *zap.Logger) *Controller {
	t.Helper()
	c := New(clientsetAPI{client}, Config{Selection: selOpts(), ServiceCIDRs: flag}, nil, log, Hooks{})
	if err := c.startServiceCIDRs(ctx); err != nil {
		t.Fatal(err)
	}
	c.inf, c.dp = c.newInformers(ctx), dp
	t.Cleanup(c.inf.cancel)
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if !waitSynced(sctx.Done(), c.inf.synced...) {
		t.Fatal("caches did not sync")
	}
	return c
}

// queuedBy makes a change and waits until its event asked for a sync.
func queuedBy(t *testing.T, c *Controller, what string, change func() error) {
	t.Helper()
	c.mu.Lock()
	c.pendingSince = time.Time{}
	c.mu.Unlock()
	if err := change(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		queued := !c.pendingSince.IsZero() && c.dirtyAll
		c.mu.Unlock()
		if queued {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no full sync queued", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestServiceCIDRsFollowTheObjects: the desired Service CIDRs are the
// objects' and the flag's; creating, marking deleted and deleting an object
// each queue a full sync that applies the change, and an event that changes
// nothing applies nothing (the Service CIDRs the dataplane does not report
// still count as applied).
func TestServiceCIDRsFollowTheObjects(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(ambientNS(), pod(), serviceCIDR("kubernetes", "10.96.0.0/16", "fd00:10:96::/112"))
	dp := &fakeDP{}
	c := serviceCIDRController(t, ctx, client, dp, prefixes("192.168.0.0/24"), zap.NewNop())
	cidrs := client.NetworkingV1().ServiceCIDRs()
	check := func(step string, wantApplies int, want ...string) {
		t.Helper()
		applies := dp.applies
		if err := c.syncOnce(ctx, false); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if got := dp.applies - applies; got != wantApplies {
			t.Errorf("%s: %d full applies, want %d", step, got, wantApplies)
		}
		if got := c.LastDesired().ServiceCIDRs; !slices.Equal(got, prefixes(want...)) {
			t.Fatalf("%s: desired Service CIDRs %v, want %v", step, got, want)
		}
		if st := c.Status(); !slices.Equal(st.ServiceCIDRs, prefixes(want...)) || st.ServiceCIDRSource != "ServiceCIDR objects + flag" {
			t.Fatalf("%s: status shows %v from %q", step, st.ServiceCIDRs, st.ServiceCIDRSource)
		}
	}
	if err := c.syncOnce(ctx, true); err != nil {
		t.Fatal(err)
	}
	check("start", 0, "10.96.0.0/16", "192.168.0.0/24", "fd00:10:96::/112")

	queuedBy(t, c, "object created", func() error {
		_, err := cidrs.Create(ctx, serviceCIDR("extra", "10.100.0.0/24"), metav1.CreateOptions{})
		return err
	})
	check("object created", 1, "10.96.0.0/16", "10.100.0.0/24", "192.168.0.0/24", "fd00:10:96::/112")

	queuedBy(t, c, "namespace created", func() error {
		_, err := client.CoreV1().Namespaces().Create(ctx, ns("other", nil), metav1.CreateOptions{})
		return err
	})
	check("namespace created", 0, "10.96.0.0/16", "10.100.0.0/24", "192.168.0.0/24", "fd00:10:96::/112")

	queuedBy(t, c, "object being deleted", func() error {
		sc, err := cidrs.Get(ctx, "extra", metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		sc.DeletionTimestamp = &now
		_, err = cidrs.Update(ctx, sc, metav1.UpdateOptions{})
		return err
	})
	// Services may still hold addresses in it: it counts until it is gone.
	check("object being deleted", 0, "10.96.0.0/16", "10.100.0.0/24", "192.168.0.0/24", "fd00:10:96::/112")

	queuedBy(t, c, "object deleted", func() error { return cidrs.Delete(ctx, "extra", metav1.DeleteOptions{}) })
	check("object deleted", 1, "10.96.0.0/16", "192.168.0.0/24", "fd00:10:96::/112")

	queuedBy(t, c, "default object deleted", func() error { return cidrs.Delete(ctx, "kubernetes", metav1.DeleteOptions{}) })
	check("default object deleted", 1, "192.168.0.0/24")
}

// TestServiceCIDRNotServed: where the API server does not serve
// ServiceCIDRs, or RBAC forbids listing them, the caches sync without
// them, the flag's prefixes alone are desired, and the reason is logged
// once and shown.
func TestServiceCIDRNotServed(t *testing.T) {
	gr := schema.GroupResource{Group: "networking.k8s.io", Resource: "servicecidrs"}
	for _, tc := range []struct {
		name       string
		err        error
		flag       []netip.Prefix
		wantSource string
	}{
		{"not served", apierrors.NewNotFound(gr, ""), prefixes("10.96.0.0/16"), "flag (ServiceCIDR API not served: "},
		{"forbidden", apierrors.NewForbidden(gr, "", nil), prefixes("10.96.0.0/16"), "flag (ServiceCIDR API forbidden: "},
		{"not served, no flag", apierrors.NewNotFound(gr, ""), nil, "none (ServiceCIDR API not served: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			client := fake.NewClientset(ambientNS(), pod(), serviceCIDR("kubernetes", "10.200.0.0/16"))
			client.PrependReactor("*", "servicecidrs", func(k8stesting.Action) (bool, runtime.Object, error) {
				return true, nil, tc.err
			})
			core, logs := observer.New(zap.InfoLevel)
			c := serviceCIDRController(t, ctx, client, &fakeDP{}, tc.flag, zap.New(core))
			if c.watchServiceCIDRs || c.inf.serviceCIDRs != nil {
				t.Fatal("ServiceCIDRs watched")
			}
			if err := c.syncOnce(ctx, true); err != nil {
				t.Fatal(err)
			}
			if got := c.LastDesired().ServiceCIDRs; !slices.Equal(got, tc.flag) {
				t.Fatalf("desired Service CIDRs %v, want the flag's %v", got, tc.flag)
			}
			if src := c.Status().ServiceCIDRSource; !strings.HasPrefix(src, tc.wantSource) {
				t.Fatalf("source %q, want %q...", src, tc.wantSource)
			}
			if n := logs.FilterMessageSnippet("not watching ServiceCIDR objects").Len(); n != 1 {
				t.Fatalf("logged %d times, want once: %v", n, logs.All())
			}
		})
	}
}

// TestServiceCIDRProbeRetries: a failure that says neither "not served"
// nor "forbidden" (the API server unavailable) is retried, logged once,
// and the objects are watched once the API server answers.
func TestServiceCIDRProbeRetries(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(ambientNS(), serviceCIDR("kubernetes", "10.96.0.0/16"))
	failures := 3
	client.PrependReactor("list", "servicecidrs", func(k8stesting.Action) (bool, runtime.Object, error) {
		if failures == 0 {
			return false, nil, nil
		}
		failures--
		return true, nil, apierrors.NewServiceUnavailable("starting")
	})
	core, logs := observer.New(zap.InfoLevel)
	c := serviceCIDRController(t, ctx, client, &fakeDP{}, nil, zap.New(core))
	if !c.watchServiceCIDRs || failures != 0 {
		t.Fatalf("watched %v after %d failures left", c.watchServiceCIDRs, failures)
	}
	if n := logs.FilterMessageSnippet("retrying").Len(); n != 1 {
		t.Fatalf("logged %d times, want once: %v", n, logs.All())
	}
	if err := c.syncOnce(ctx, true); err != nil {
		t.Fatal(err)
	}
	if st := c.Status(); !slices.Equal(st.ServiceCIDRs, prefixes("10.96.0.0/16")) || st.ServiceCIDRSource != "ServiceCIDR objects" {
		t.Fatalf("status shows %v from %q", st.ServiceCIDRs, st.ServiceCIDRSource)
	}
	// Cancelled while the API server is away: the probe gives up.
	client.PrependReactor("list", "servicecidrs", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewServiceUnavailable("away")
	})
	cctx, ccancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer ccancel()
	if _, _, err := c.probeServiceCIDRs(cctx); err == nil {
		t.Fatal("probe returned without an answer or cancellation")
	}
}

// TestMinimalServiceCIDR: the cache keeps what the desired state reads, and
// updates of anything else (the controller-manager's status) queue nothing.
func TestMinimalServiceCIDR(t *testing.T) {
	full := serviceCIDR("kubernetes", "10.96.0.0/16")
	full.ResourceVersion, full.Finalizers = "7", []string{"networking.k8s.io/service-cidr-finalizer"}
	full.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kube-apiserver"}}
	full.Status.Conditions = []metav1.Condition{{Type: "Ready", Status: metav1.ConditionTrue}}
	obj, err := minimalServiceCIDR(full)
	if err != nil {
		t.Fatal(err)
	}
	min := obj.(*networkingv1.ServiceCIDR)
	if min.Name != "kubernetes" || min.ResourceVersion != "7" || !slices.Equal(min.Spec.CIDRs, full.Spec.CIDRs) ||
		min.ManagedFields != nil || min.Finalizers != nil || len(min.Status.Conditions) != 0 {
		t.Fatalf("minimal %+v", min)
	}
	statusOnly := full.DeepCopy()
	statusOnly.Status.Conditions[0].Status = metav1.ConditionFalse
	deleting := full.DeepCopy()
	now := metav1.Now()
	deleting.DeletionTimestamp = &now
	widened := full.DeepCopy()
	widened.Spec.CIDRs = append(widened.Spec.CIDRs, "fd00::/112")
	for _, tc := range []struct {
		name string
		cur  *networkingv1.ServiceCIDR
		want bool
	}{{"status only", statusOnly, false}, {"being deleted", deleting, true}, {"another CIDR", widened, true}} {
		if got := serviceCIDRChanged(full, tc.cur); got != tc.want {
			t.Errorf("%s: changed %v, want %v", tc.name, got, tc.want)
		}
	}
}
