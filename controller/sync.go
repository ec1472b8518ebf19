package controller

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/cache"

	"github.com/ambient-redirect/ambient-redirect/controller/desired"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// One sync: the incremental path (syncPods, the dirty pods alone) or the
// full one (syncAll), and the record of what the last sync programmed.

func (c *Controller) syncOnce(ctx context.Context, resync bool) error {
	c.mu.Lock()
	pending := c.pendingSince
	c.pendingSince = time.Time{}
	dirty, all := c.dirty, c.dirtyAll
	c.dirty, c.dirtyAll = map[string]bool{}, false
	c.started++
	incremental := !resync && !all
	c.mu.Unlock()
	if incremental {
		if done, err := c.syncPods(ctx, dirty, pending); done {
			return err
		}
	}
	return c.syncAll(ctx, resync, pending)
}

// syncPods programs the changes of the dirty pods alone: its cost grows
// with them, not with the node's pods. It is not done (the caller makes a
// full sync) when an address moves between pods.
func (c *Controller) syncPods(ctx context.Context, dirty map[string]bool, pending time.Time) (bool, error) {
	podLister, nsLister := c.listers()
	var upsert []dataplane.Pod
	var remove []string
	next := map[string]podEntry{}
	gone := map[string]bool{}
	c.mu.Lock()
	for key := range dirty {
		ns, name, _ := cache.SplitMetaNamespaceKey(key)
		p, err := podLister.Pods(ns).Get(name)
		p, err = c.withHandedOver(key, p, err)
		if apierrors.IsNotFound(err) {
			gone[key] = true
			continue
		}
		var e podEntry
		if err == nil {
			nsObj, _ := nsLister.Get(ns)
			e = c.entry(p, nsObj)
		}
		next[key] = e
	}
	for key := range dirty {
		old, e := c.pods[key], next[key] // zero when absent or gone
		if (old.Sidecar != nil || e.Sidecar != nil) && !reflect.DeepEqual(old.Sidecar, e.Sidecar) {
			// A sidecar pod's netns is converged by the full path (its
			// cost is the pod's own, not the node's).
			c.mu.Unlock()
			return false, nil
		}
		if samePod(old.Pod, e.Pod) {
			continue
		}
		if old.Pod != nil {
			remove = append(remove, old.Pod.UID)
		}
		if e.Pod != nil {
			upsert = append(upsert, *e.Pod)
		}
	}
	conflicted := c.conflicted > 0 && len(remove) > 0
	c.mu.Unlock()
	if conflicted {
		return false, nil
	}
	var res dataplane.Result
	var err error
	start := time.Now()
	if len(upsert) > 0 || len(remove) > 0 {
		res, err = c.dp.UpdatePods(ctx, upsert, remove)
		if errors.Is(err, dataplane.ErrInvalidState) {
			// Refused before anything was written: an address two pods
			// claim (dataplane.Claim), for the full sync to decide from
			// every pod.
			return false, nil
		}
	}
	c.mu.Lock()
	for key := range dirty {
		c.setPod(key, next[key], gone[key])
	}
	if len(upsert) > 0 || len(remove) > 0 {
		c.recordSync(start, res, err)
	}
	if err != nil {
		c.dirtyAll = true // the next sync is a full one
		if !pending.IsZero() && c.pendingSince.IsZero() {
			c.pendingSince = pending
		}
	}
	enrolled := c.enrolled
	c.notifySynced()
	c.mu.Unlock()
	if len(upsert) > 0 || len(remove) > 0 {
		c.log.Debug("pods synced", zap.Int("upsert", len(upsert)), zap.Int("remove", len(remove)), zap.Error(err))
		if c.hooks.OnSync != nil {
			c.hooks.OnSync(res, false, enrolled, err)
		}
	}
	if err == nil {
		if !pending.IsZero() && c.hooks.OnProgrammed != nil {
			c.hooks.OnProgrammed(time.Since(pending))
		}
		c.kickAnnotations()
	}
	return true, err
}

// notifySynced wakes whoever waits for a sync. Called with c.mu held.
func (c *Controller) notifySynced() {
	c.done = c.started
	close(c.synced)
	c.synced = make(chan struct{})
}

// samePod reports that two programmed pods (nil: none) are the same UID
// with the same addresses.
func samePod(a, b *dataplane.Pod) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.UID == b.UID && slices.Equal(a.IPs, b.IPs)
}

// setPods makes pods the node's pods (a full sync). Called with c.mu held.
func (c *Controller) setPods(pods map[string]podEntry) {
	c.pods, c.conflicted, c.enrolled = pods, 0, 0
	for _, e := range pods {
		c.count(e, 1)
	}
}

// setPod records one pod's entry (gone: the pod is). Called with c.mu held.
func (c *Controller) setPod(key string, e podEntry, gone bool) {
	if old, ok := c.pods[key]; ok {
		c.count(old, -1)
	}
	if gone {
		delete(c.pods, key)
		return
	}
	c.pods[key] = e
	c.count(e, 1)
}

// count adds (sign 1) or removes (-1) an entry from the enrolled pods and
// from those programmed without some of their addresses (dedupeIPs).
func (c *Controller) count(e podEntry, sign int) {
	if e.Status.Enrolled && (e.Pod == nil || len(e.Pod.IPs) < len(e.Status.IPs)) {
		c.conflicted += sign
	}
	if e.Pod != nil {
		c.enrolled += sign
	}
}

// kickAnnotations asks the annotation reconciler for a pass.
func (c *Controller) kickAnnotations() { c.anno.Kick() }

// entry is a pod's selection outcome and, when enrolled, what to program
// (desired.PodEntry). Called with c.mu held.
func (c *Controller) entry(p *corev1.Pod, ns *corev1.Namespace) podEntry {
	return desired.PodEntry(p, ns, c.cfg.Selection, c.withCNI)
}

// applied is the state the kernel holds (nil: unknown).
func (c *Controller) applied() *dataplane.State {
	a, ok := c.dp.Applied()
	if !ok {
		return nil
	}
	return &a
}

// syncAll recomputes the node's whole desired state from the caches and
// applies it.
func (c *Controller) syncAll(ctx context.Context, resync bool, pending time.Time) error {
	st, pods, zs, zerr := c.desired()
	if pods == nil && zerr != nil {
		return zerr
	}
	applied := c.applied()
	if zerr != nil && applied != nil && applied.Ztunnel != nil && zs != nil && applied.Ztunnel.Pod == zs.Pod {
		// The running ztunnel could not be re-located (a transient netlink
		// or netns-scan failure): keep it rather than tear capture down;
		// the error still shows and the sync is retried.
		st.Ztunnel = applied.Ztunnel
	}
	base := dataplane.State{Ztunnel: st.Ztunnel, Draining: st.Draining, ServiceCIDRs: st.ServiceCIDRs}
	if !resync && zerr == nil && applied != nil && st.Equal(*applied) {
		// The event changed nothing the kernel carries (a plain pod, a
		// status or annotation update): no kernel work. Drift is the
		// resync's job.
		c.mu.Lock()
		c.setPods(pods)
		c.status.Ztunnel, c.wantBase = zs, base
		c.notifySynced()
		c.mu.Unlock()
		if !pending.IsZero() && c.hooks.OnProgrammed != nil {
			c.hooks.OnProgrammed(time.Since(pending))
		}
		c.kickAnnotations()
		return nil
	}
	// Only a resync towards the state the kernel already held after the last
	// successful apply repairs drift; the first sync on a fresh node, or one
	// that also carries a change, creates rather than restores.
	drift := resync && applied != nil && st.Equal(*applied)
	start := time.Now()
	res, applyErr := c.dp.Apply(ctx, st)
	err := errors.Join(zerr, applyErr)
	c.mu.Lock()
	c.setPods(pods)
	c.wantBase = base
	c.status.Draining = nil
	for _, z := range st.Draining {
		c.status.Draining = append(c.status.Draining, z.Pod)
	}
	c.status.Ztunnel = zs
	c.recordSync(start, res, err)
	if err != nil {
		if !pending.IsZero() && c.pendingSince.IsZero() {
			c.pendingSince = pending // still not programmed
		}
		c.dirtyAll = true // the retry recomputes everything (and re-locates the ztunnel)
	} else if drift {
		for k, v := range res.Writes {
			c.status.DriftRepairs[k] += v
		}
	}
	c.notifySynced()
	c.mu.Unlock()
	if c.hooks.OnSync != nil {
		c.hooks.OnSync(res, drift && err == nil, len(st.Pods), err)
	}
	if err == nil {
		if !pending.IsZero() && c.hooks.OnProgrammed != nil {
			c.hooks.OnProgrammed(time.Since(pending))
		}
		c.kickAnnotations()
	}
	return err
}
