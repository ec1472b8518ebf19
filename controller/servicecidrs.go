package controller

import (
	"context"
	"slices"
	"time"

	"go.uber.org/zap"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The cluster's Service CIDRs: the ServiceCIDR objects (networking.k8s.io/v1,
// Kubernetes 1.33+) when the API server serves them to us, plus
// Config.ServiceCIDRs (--service-cidr).

// probeServiceCIDRs decides, once at start, whether ServiceCIDRs are
// watched. An API server that does not serve them, or RBAC that forbids
// listing them, would keep their informer from ever syncing, and the agent
// from ever being ready; why says which. Any other failure (the API server
// unreachable) says neither and is retried until ctx ends, as the other
// informers retry.
func (c *Controller) probeServiceCIDRs(ctx context.Context) (watched bool, why string, err error) {
	const maxDelay = time.Second
	delay := 50 * time.Millisecond
	for logged := false; ; logged = true {
		_, err := c.client.ServiceCIDRs().List(ctx, metav1.ListOptions{Limit: 1})
		switch {
		case err == nil:
			return true, "", nil
		case apierrors.IsNotFound(err):
			return false, "not served: " + err.Error(), nil
		case apierrors.IsForbidden(err):
			return false, "forbidden: " + err.Error(), nil
		}
		if !logged {
			c.log.Info("cannot tell yet whether the API server serves ServiceCIDRs; retrying", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return false, "", ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, maxDelay)
	}
}

// startServiceCIDRs probes (probeServiceCIDRs) and records where the
// desired Service CIDRs come from, logging it once when the objects cannot
// be watched.
func (c *Controller) startServiceCIDRs(ctx context.Context) error {
	watched, why, err := c.probeServiceCIDRs(ctx)
	if err != nil {
		return err
	}
	c.watchServiceCIDRs = watched
	source := serviceCIDRSource(watched, why, len(c.cfg.ServiceCIDRs) > 0)
	c.mu.Lock()
	c.status.ServiceCIDRSource = source
	c.mu.Unlock()
	if !watched {
		c.log.Info("not watching ServiceCIDR objects; the Service CIDRs are --service-cidr's alone",
			zap.String("reason", why), zap.Stringers("serviceCIDRs", c.cfg.ServiceCIDRs))
	}
	return nil
}

// serviceCIDRSource says, for /debug/state, where the Service CIDRs come
// from: the objects (watched) and/or the flag, and why not the objects.
func serviceCIDRSource(watched bool, why string, flag bool) string {
	switch {
	case watched && flag:
		return "ServiceCIDR objects + flag"
	case watched:
		return "ServiceCIDR objects"
	case flag:
		return "flag (ServiceCIDR API " + why + ")"
	}
	return "none (ServiceCIDR API " + why + "; no --service-cidr)"
}

// minimalServiceCIDR keeps what the desired state reads: the name, the
// CIDRs and whether the object is being deleted.
func minimalServiceCIDR(obj any) (any, error) {
	sc, ok := obj.(*networkingv1.ServiceCIDR)
	if !ok {
		return stripManagedFields(obj)
	}
	return &networkingv1.ServiceCIDR{
		ObjectMeta: metav1.ObjectMeta{Name: sc.Name, UID: sc.UID, ResourceVersion: sc.ResourceVersion, DeletionTimestamp: sc.DeletionTimestamp},
		Spec:       networkingv1.ServiceCIDRSpec{CIDRs: sc.Spec.CIDRs},
	}, nil
}

// serviceCIDRChanged ignores updates that change nothing the desired state
// reads (the controller-manager's status conditions, finalizers).
func serviceCIDRChanged(old, cur any) bool {
	o, ok1 := old.(*networkingv1.ServiceCIDR)
	n, ok2 := cur.(*networkingv1.ServiceCIDR)
	if !ok1 || !ok2 {
		return true
	}
	return (o.DeletionTimestamp == nil) != (n.DeletionTimestamp == nil) || !slices.Equal(o.Spec.CIDRs, n.Spec.CIDRs)
}
