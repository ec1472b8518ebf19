package controller

import (
	"context"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ambient-redirect/ambient-redirect/controller/desired"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube"
)

// The informers and their caches: one generation of pod, namespace and
// ServiceCIDR informers (replaced after an API outage), the transforms that
// keep the caches small, and the event handlers that mark pods dirty.

// informerSet is one generation of informers and their listers.
type informerSet struct {
	pods corelisters.PodLister
	nss  corelisters.NamespaceLister
	// serviceCIDRs is nil when they are not watched (see probeServiceCIDRs).
	serviceCIDRs cache.Store
	synced       []cache.InformerSynced
	cancel       context.CancelFunc
}

// newInformers starts a pod informer (this node's pods only), a namespace
// informer and, when the API server lets us, a ServiceCIDR informer. They
// are built directly rather than through client-go's informer factory: the
// factory links the informers and listers of every API group, which made
// the binary and the agent's resident memory (the binary's mapped pages)
// several MiB larger.
func (c *Controller) newInformers(ctx context.Context) *informerSet {
	node := c.cfg.Selection.NodeName
	core := c.client
	newInformer := func(obj runtime.Object, transform cache.TransformFunc, lw *cache.ListWatch) cache.SharedIndexInformer {
		inf := cache.NewSharedIndexInformerWithOptions(lw, obj, cache.SharedIndexInformerOptions{
			Indexers: cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc},
		})
		_ = inf.SetTransform(transform)
		return inf
	}
	onNode := func(o *metav1.ListOptions) { o.FieldSelector = "spec.nodeName=" + node }
	podInf := newInformer(&corev1.Pod{}, minimalPod, &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			onNode(&o)
			return core.Pods(metav1.NamespaceAll).List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			onNode(&o)
			return core.Pods(metav1.NamespaceAll).Watch(ctx, o)
		},
	})
	nsInf := newInformer(&corev1.Namespace{}, stripManagedFields, &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return core.Namespaces().List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return core.Namespaces().Watch(ctx, o)
		},
	})
	_, _ = podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.podEvent(nil, obj) },
		UpdateFunc: func(old, cur any) { c.onUpdate(old, cur, c.podEvent) },
		DeleteFunc: func(obj any) { c.podEvent(nil, obj) },
	})
	_, _ = nsInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.queue() },
		UpdateFunc: func(old, cur any) { c.onUpdate(old, cur, func(any, any) { c.queue() }) },
		DeleteFunc: func(any) { c.queue() },
	})
	set := &informerSet{
		pods: corelisters.NewPodLister(podInf.GetIndexer()), nss: corelisters.NewNamespaceLister(nsInf.GetIndexer()),
		synced: []cache.InformerSynced{podInf.HasSynced, nsInf.HasSynced},
	}
	infs := []cache.SharedIndexInformer{podInf, nsInf}
	if c.watchServiceCIDRs {
		cidrInf := newInformer(&networkingv1.ServiceCIDR{}, minimalServiceCIDR, &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return c.client.ServiceCIDRs().List(ctx, o)
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return c.client.ServiceCIDRs().Watch(ctx, o)
			},
		})
		_, _ = cidrInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { c.queue() },
			UpdateFunc: func(old, cur any) {
				if serviceCIDRChanged(old, cur) {
					c.queue()
				}
			},
			DeleteFunc: func(any) { c.queue() },
		})
		set.serviceCIDRs = cidrInf.GetStore()
		set.synced = append(set.synced, cidrInf.HasSynced)
		infs = append(infs, cidrInf)
	}
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, inf := range infs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			inf.RunWithContext(sctx)
		}()
	}
	set.cancel = func() {
		cancel()
		wg.Wait()
	}
	return set
}

// waitSynced waits until every informer has synced, or done. It checks
// every 2 ms: cache.WaitForCacheSync checks every 100 ms, which alone was
// most of an agent's start-up (a node's first list takes a few ms).
func waitSynced(done <-chan struct{}, synced ...cache.InformerSynced) bool {
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		if !slices.ContainsFunc(synced, func(f cache.InformerSynced) bool { return !f() }) {
			return true
		}
		select {
		case <-done:
			return false
		case <-t.C:
		}
	}
}

func (c *Controller) listers() (corelisters.PodLister, corelisters.NamespaceLister) {
	c.infMu.Lock()
	defer c.infMu.Unlock()
	return c.inf.pods, c.inf.nss
}

// serviceCIDRObjects are the cached ServiceCIDR objects (none when they
// are not watched).
func (c *Controller) serviceCIDRObjects() []*networkingv1.ServiceCIDR {
	c.infMu.Lock()
	store := c.inf.serviceCIDRs
	c.infMu.Unlock()
	if store == nil {
		return nil
	}
	var out []*networkingv1.ServiceCIDR
	for _, o := range store.List() {
		if sc, ok := o.(*networkingv1.ServiceCIDR); ok {
			out = append(out, sc)
		}
	}
	return out
}

// watchAPI restarts the informers when the API server comes back from an
// outage: client-go's reflectors back off up to 30s between attempts, and
// the node must converge within seconds of the API's return. While the API
// is down nothing changes: the caches (and the kernel) keep the last state.
func (c *Controller) watchAPI(ctx context.Context) {
	const every = time.Second
	down := false
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, every)
		err := c.client.Readyz(pctx)
		cancel()
		switch {
		case err != nil && !down:
			down = true
			c.log.Warn("API server unreachable; keeping the dataplane as it is", zap.Error(err))
		case err == nil && down:
			down = false
			c.log.Info("API server is back; re-listing")
			set := c.newInformers(ctx)
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			ok := waitSynced(sctx.Done(), set.synced...)
			cancel()
			if !ok {
				set.cancel()
				down = true // try again on the next tick
				continue
			}
			c.infMu.Lock()
			old := c.inf
			c.inf = set
			c.infMu.Unlock()
			go old.cancel()
			c.queue()
		}
	}
}

// stripManagedFields drops what we never read, to keep the caches small.
func stripManagedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.ObjectMetaAccessor); ok {
		m.GetObjectMeta().SetManagedFields(nil)
	}
	return obj, nil
}

// minimalPod keeps only the fields selection, ztunnel choice and
// annotations read: a node's pod cache then costs a few hundred bytes a pod
// instead of the whole spec and status.
func minimalPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return stripManagedFields(obj)
	}
	keep := map[string]string{}
	for _, k := range []string{selection.RedirectionAnno, selection.SidecarStatusAnno} {
		if v, ok := p.Annotations[k]; ok {
			if k == selection.SidecarStatusAnno && v != "" {
				v = "present" // only its presence matters; the value can be large
			}
			keep[k] = v
		}
	}
	var spec corev1.PodSpec
	if keep[selection.SidecarStatusAnno] != "" {
		spec = sidecarSpec(p, keep)
	}
	var conds []corev1.PodCondition
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			conds = append(conds, corev1.PodCondition{Type: c.Type, Status: c.Status})
		}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion,
			Labels: p.Labels, Annotations: keep, CreationTimestamp: p.CreationTimestamp, DeletionTimestamp: p.DeletionTimestamp,
		},
		Spec: corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork,
			InitContainers: spec.InitContainers, Containers: spec.Containers},
		Status: corev1.PodStatus{
			Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs,
			Conditions: conds, StartTime: p.Status.StartTime,
		},
	}, nil
}

// sidecarSpec keeps of a sidecar pod what its rules are read from: the
// annotations (into keep), the init containers' names, and the proxy
// container's uid/gid and the environment variables that matter.
func sidecarSpec(p *corev1.Pod, keep map[string]string) corev1.PodSpec {
	for k, v := range p.Annotations {
		if desired.SidecarAnnotation(k) {
			keep[k] = v
		}
	}
	var spec corev1.PodSpec
	for _, c := range p.Spec.InitContainers {
		spec.InitContainers = append(spec.InitContainers, corev1.Container{Name: c.Name})
	}
	for _, c := range p.Spec.Containers {
		if c.Name != desired.ProxyContainer {
			continue
		}
		pc := corev1.Container{Name: c.Name}
		if sc := c.SecurityContext; sc != nil {
			pc.SecurityContext = &corev1.SecurityContext{RunAsUser: sc.RunAsUser, RunAsGroup: sc.RunAsGroup}
		}
		for _, e := range c.Env {
			if desired.SidecarEnv(e.Name) {
				pc.Env = append(pc.Env, corev1.EnvVar{Name: e.Name, Value: e.Value})
			}
		}
		spec.Containers = append(spec.Containers, pc)
	}
	return spec
}

// minimalPodOf applies the cache's transform to a pod from a GET.
func minimalPodOf(p *corev1.Pod) *corev1.Pod {
	if m, err := minimalPod(p); err == nil {
		if mp, ok := m.(*corev1.Pod); ok {
			return mp
		}
	}
	return p
}

// onUpdate ignores periodic relists that change nothing.
func (c *Controller) onUpdate(old, cur any, changed func(old, cur any)) {
	o, ok1 := old.(metav1.Object)
	n, ok2 := cur.(metav1.Object)
	if ok1 && ok2 && o.GetResourceVersion() != "" && o.GetResourceVersion() == n.GetResourceVersion() {
		return
	}
	if ok2 && c.log.Core().Enabled(zap.DebugLevel) {
		c.log.Debug("update event", zap.String("namespace", n.GetNamespace()), zap.String("name", n.GetName()), zap.String("resourceVersion", n.GetResourceVersion()))
	}
	changed(old, cur)
}

// podEvent queues one pod, or everything when a ztunnel pod changed (it
// may become or stop being the active one).
func (c *Controller) podEvent(old, cur any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(cur)
	if d, ok := cur.(cache.DeletedFinalStateUnknown); ok {
		cur = d.Obj
	}
	p, ok := cur.(*corev1.Pod)
	o, _ := old.(*corev1.Pod)
	if err != nil || !ok || kube.IsZtunnel(p, c.cfg.Selection) || o != nil && kube.IsZtunnel(o, c.cfg.Selection) {
		c.queue()
		return
	}
	c.podKey(key)
}
