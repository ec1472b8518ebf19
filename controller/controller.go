package controller

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ambient-redirect/ambient-redirect/controller/selection"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// Dataplane is what the controller needs of the dataplane.
type Dataplane interface {
	Apply(ctx context.Context, st dataplane.State) (dataplane.Result, error)
	// UpdatePods programs pod changes on top of the last Apply, at a cost
	// that does not grow with the node's pods.
	UpdatePods(ctx context.Context, upsert []dataplane.Pod, remove []string) (dataplane.Result, error)
	QueueResync()
	LocateZtunnel(ip net.IP) (veth, netnsPath string, err error)
	// WatchIPTables repairs our jumps as soon as another agent moves them
	// (kube-proxy on start), reporting each repair; it runs until ctx ends.
	WatchIPTables(ctx context.Context, repaired func(dataplane.Result)) error
	// WatchNetlink calls drifted when links, addresses, routes or rules of
	// ours change under us; it runs until ctx ends.
	WatchNetlink(ctx context.Context, drifted func()) error
}

// Config of the controller.
type Config struct {
	Selection    selection.Options
	ResyncPeriod time.Duration
	// MaxBackoff bounds the retry delay after a failed sync.
	MaxBackoff time.Duration
}

// PodStatus is one pod's selection outcome.
type PodStatus struct {
	Namespace  string   `json:"namespace"`
	Name       string   `json:"name"`
	UID        string   `json:"uid"`
	IPs        []string `json:"ips"`
	Enrolled   bool     `json:"enrolled"`
	Reason     string   `json:"reason"`
	Annotation string   `json:"annotation,omitempty"`
	// ViaCNI: the CNI plugin handed this pod's sandbox over.
	ViaCNI bool `json:"viaCNI,omitempty"`
}

// ZtunnelStatus is the active ztunnel.
type ZtunnelStatus struct {
	Pod      string `json:"pod"`
	IP       string `json:"ip"`
	HostVeth string `json:"hostVeth"`
	NetNS    string `json:"netns"`
	Error    string `json:"error,omitempty"`
}

// SyncStatus describes the last sync.
type SyncStatus struct {
	Time     time.Time      `json:"time"`
	Duration string         `json:"duration"`
	Writes   map[string]int `json:"writes"`
	Changes  []string       `json:"changes,omitempty"`
	Error    string         `json:"error,omitempty"`
}

// Status is the controller's view, for the debug endpoint.
type Status struct {
	Synced        bool           `json:"cachesSynced"`
	FirstSyncDone bool           `json:"firstSyncDone"`
	Ztunnel       *ZtunnelStatus `json:"ztunnel"`
	Draining      []string       `json:"draining,omitempty"`
	Pods          []PodStatus    `json:"pods"`
	LastSync      *SyncStatus    `json:"lastSync,omitempty"`
	LastSuccess   time.Time      `json:"lastSuccess"`
	PendingSince  *time.Time     `json:"pendingSince,omitempty"`
	DriftRepairs  map[string]int `json:"driftRepairs"`
	Syncs         int            `json:"syncs"`
	Failures      int            `json:"failures"`
}

// Hooks let the caller observe syncs (metrics) without the controller
// depending on them.
type Hooks struct {
	// OnSync is called after every sync with its result, whether its writes
	// were drift repairs (see syncOnce) and its error.
	OnSync func(res dataplane.Result, drift bool, enrolled int, err error)
	// OnRepair is called with every repair made between syncs (our
	// iptables jumps put first again): drift repairs all.
	OnRepair func(res dataplane.Result)
	// OnProgrammed is called once per pod event that led to programmed state,
	// with the time from the event to programming.
	OnProgrammed func(d time.Duration)
}

// Controller keeps this node's dataplane converged from the API.
type Controller struct {
	cfg    Config
	client API
	log    *zap.Logger
	hooks  Hooks
	// newDP creates the dataplane once the caches have synced: not even a
	// probe touches the kernel before then.
	newDP func(ctx context.Context) (Dataplane, error)
	dp    Dataplane

	// inf is the current informer set; it is replaced after an API outage.
	infMu sync.Mutex
	inf   *informerSet

	kick     chan struct{}
	annoKick chan struct{}
	// driftKick asks for a resync at once: the kernel changed under us.
	driftKick chan struct{}

	mu     sync.Mutex
	status Status
	// pods are every pod of the node as the last sync saw it, by
	// namespace/name: its status and, when enrolled, what is programmed.
	pods map[string]podEntry
	// wantZt is the ztunnel part of the last sync's desired state.
	wantZt dataplane.State
	// applied is the ztunnel part of the last successful apply (nil after
	// a failure); with pods it is what the kernel holds.
	applied      *dataplane.State
	pendingSince time.Time // oldest event not yet programmed
	programmed   map[types.UID]bool
	// dirty are the pods (namespace/name) changed since the last sync;
	// dirtyAll asks for a full one (a namespace or ztunnel changed).
	dirty    map[string]bool
	dirtyAll bool
	// conflicted counts the enrolled pods that lost an address to another
	// pod claiming it (dedupeIPs): a pod leaving may hand it back, which
	// only a full sync decides.
	conflicted int
	// owners maps each programmed address to its pod (namespace/name).
	owners map[netip.Addr]string
	// cni are the pods the CNI plugin handed over, by namespace/name.
	cni map[string]cniPod
	// synced is closed (and replaced) after every sync: CNI ADDs wait on it.
	synced chan struct{}
	// started numbers the syncs (each takes the dirty set when it starts);
	// done is the number of the last one that finished.
	started, done uint64
}

// podEntry is one pod as the last sync saw it.
type podEntry struct {
	status PodStatus
	// pod is what is programmed for it; nil when it is not enrolled.
	pod *dataplane.Pod
}

// New builds a controller. newDP is called after the caches synced.
func New(client API, cfg Config, newDP func(ctx context.Context) (Dataplane, error), log *zap.Logger, hooks Hooks) *Controller {
	if cfg.ResyncPeriod <= 0 {
		cfg.ResyncPeriod = 30 * time.Second
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	c := &Controller{
		cfg: cfg, client: client, log: log, hooks: hooks, newDP: newDP,
		kick: make(chan struct{}, 1), annoKick: make(chan struct{}, 1), driftKick: make(chan struct{}, 1),
		programmed: map[types.UID]bool{}, dirty: map[string]bool{}, cni: map[string]cniPod{}, synced: make(chan struct{}),
	}
	c.status.DriftRepairs = map[string]int{}
	return c
}

// informerSet is one generation of informers and their listers.
type informerSet struct {
	pods   corelisters.PodLister
	nss    corelisters.NamespaceLister
	synced []cache.InformerSynced
	cancel context.CancelFunc
}

// newInformers starts a pod informer (this node's pods only) and a
// namespace informer. They are built directly rather than through
// client-go's informer factory: the factory links the informers and
// listers of every API group, which made the binary and the agent's
// resident memory (the binary's mapped pages) several MiB larger.
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
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, inf := range []cache.SharedIndexInformer{podInf, nsInf} {
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
		Spec: corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork},
		Status: corev1.PodStatus{
			Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs,
			Conditions: conds, StartTime: p.Status.StartTime,
		},
	}, nil
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
	if err != nil || !ok || c.cfg.Selection.IsZtunnel(p) || o != nil && c.cfg.Selection.IsZtunnel(o) {
		c.queue()
		return
	}
	c.podKey(key)
}

// queue asks for a full sync; the sync loop coalesces any number of marks.
func (c *Controller) queue() { c.mark(func() { c.dirtyAll = true }) }

func (c *Controller) mark(what func()) {
	c.mu.Lock()
	what()
	if c.pendingSince.IsZero() {
		c.pendingSince = time.Now()
	}
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Status returns a copy of the controller's status.
func (c *Controller) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.summary()
	s.Pods = make([]PodStatus, 0, len(c.pods))
	for _, e := range c.pods {
		s.Pods = append(s.Pods, e.status)
	}
	slices.SortFunc(s.Pods, func(a, b PodStatus) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return s
}

// Summary is Status without the pods: what the health and readiness
// probes read, at a cost (and a hold on the sync loop's lock) that does
// not grow with the node's pods.
func (c *Controller) Summary() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.summary()
}

// summary is Status without the pods. Called with c.mu held.
func (c *Controller) summary() Status {
	s := c.status
	s.DriftRepairs = map[string]int{}
	for k, v := range c.status.DriftRepairs {
		s.DriftRepairs[k] = v
	}
	if !c.pendingSince.IsZero() {
		t := c.pendingSince
		s.PendingSince = &t
	}
	return s
}

// LastDesired returns the desired state of the last sync (nil before it).
func (c *Controller) LastDesired() *dataplane.State {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pods == nil {
		return nil
	}
	st := c.stateOf(c.wantZt)
	return &st
}

// stateOf is zt's ztunnels with the pods of the last sync, in the order
// desired() gives them. Called with c.mu held.
func (c *Controller) stateOf(zt dataplane.State) dataplane.State {
	var es []podEntry
	for _, e := range c.pods {
		if e.pod != nil {
			es = append(es, e)
		}
	}
	slices.SortFunc(es, func(a, b podEntry) int { // desired()'s order
		return cmp.Or(strings.Compare(a.status.Namespace, b.status.Namespace), strings.Compare(a.status.Name, b.status.Name))
	})
	for _, e := range es {
		zt.Pods = append(zt.Pods, *e.pod)
	}
	return zt
}

// Run syncs until ctx ends. It returns after the loop stopped; the kernel
// state is left in place on purpose (see cmd).
func (c *Controller) Run(ctx context.Context) error {
	c.inf = c.newInformers(ctx)
	defer func() {
		c.infMu.Lock()
		defer c.infMu.Unlock()
		c.inf.cancel()
	}()
	c.log.Info("waiting for caches to sync")
	if !waitSynced(ctx.Done(), c.inf.synced...) {
		return errors.New("caches did not sync before shutdown")
	}
	c.mu.Lock()
	c.status.Synced = true
	c.mu.Unlock()
	c.log.Info("caches synced")
	dp, err := c.newDP(ctx)
	if err != nil {
		return err
	}
	c.dp = dp
	go func() {
		if err := dp.WatchIPTables(ctx, c.repaired); err != nil {
			c.log.Warn("not watching iptables; jumps moved by other agents are repaired by the resync only", zap.Error(err))
		}
	}()
	go func() {
		err := dp.WatchNetlink(ctx, func() {
			select {
			case c.driftKick <- struct{}{}:
			default:
			}
		})
		if err != nil {
			c.log.Warn("not watching netlink; drift is repaired by the resync only", zap.Error(err))
		}
	}()
	go c.annotationLoop(ctx)
	go c.watchAPI(ctx)

	resync := time.NewTicker(c.cfg.ResyncPeriod)
	defer resync.Stop()
	var retry <-chan time.Time
	backoff := 100 * time.Millisecond
	isResync := true // startup is a full resync
	dp.QueueResync()
	for {
		err := c.syncOnce(ctx, isResync)
		isResync = false
		if err != nil {
			c.log.Error("sync failed; will retry", zap.Error(err), zap.Duration("backoff", backoff))
			retry = time.After(backoff)
			backoff = min(backoff*2, c.cfg.MaxBackoff)
		} else {
			retry, backoff = nil, 100*time.Millisecond
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.kick:
		case <-retry:
		case <-resync.C:
			dp.QueueResync()
			isResync = true
		case <-c.driftKick:
			dp.QueueResync()
			isResync = true
		}
	}
}

// desired builds the desired state from the caches, and every pod's entry.
func (c *Controller) desired() (dataplane.State, map[string]podEntry, *ZtunnelStatus, error) {
	podLister, nsLister := c.listers()
	pods, err := podLister.List(labels.Everything())
	if err != nil {
		return dataplane.State{}, nil, nil, err
	}
	var st dataplane.State
	entries := make(map[string]podEntry, len(pods))
	c.mu.Lock()
	if len(c.cni) > 0 {
		cached := make(map[string]int, len(pods))
		for i, p := range pods {
			cached[p.Namespace+"/"+p.Name] = i
		}
		for key := range c.cni {
			i, ok := cached[key]
			var p *corev1.Pod
			var err error = apierrors.NewNotFound(corev1.Resource("pods"), key)
			if ok {
				p, err = pods[i], nil
			}
			p, err = c.withHandedOver(key, p, err)
			switch {
			case ok && err == nil:
				pods[i] = p // the sandbox's pod, when the cache still has an older one
			case err == nil:
				pods = append(pods, p)
			}
		}
	}
	slices.SortFunc(pods, func(a, b *corev1.Pod) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	for _, p := range pods {
		ns, _ := nsLister.Get(p.Namespace)
		e := c.entry(p, ns)
		if e.pod != nil {
			st.Pods = append(st.Pods, *e.pod)
			e.pod = nil // set again below unless dedupe drops it
		}
		entries[p.Namespace+"/"+p.Name] = e
	}
	c.mu.Unlock()
	// A pod the CNI plugin handed over holds its sandbox's addresses now: a
	// stale object still claiming one loses it, whatever their names.
	viaCNI := func(p dataplane.Pod) bool { return entries[p.Name].status.ViaCNI }
	slices.SortStableFunc(st.Pods, func(a, b dataplane.Pod) int {
		return cmp.Compare(boolRank(!viaCNI(a)), boolRank(!viaCNI(b)))
	})
	st.Pods = dedupeIPs(st.Pods, c.log)
	slices.SortStableFunc(st.Pods, func(a, b dataplane.Pod) int { // back to namespace/name order
		ea, eb := entries[a.Name].status, entries[b.Name].status
		return cmp.Or(strings.Compare(ea.Namespace, eb.Namespace), strings.Compare(ea.Name, eb.Name))
	})
	for i := range st.Pods {
		e := entries[st.Pods[i].Name]
		e.pod = &st.Pods[i]
		entries[st.Pods[i].Name] = e
	}
	zt := selection.PickZtunnel(pods, c.cfg.Selection)
	for _, p := range selection.DrainingZtunnels(pods, c.cfg.Selection, zt) {
		z, err := c.locate(p)
		if err != nil {
			// Gone (no veth or netns), or not found this time: keep what
			// was applied, the dataplane tells the two apart.
			z = c.appliedDraining(p.Namespace + "/" + p.Name)
		}
		if z != nil {
			st.Draining = append(st.Draining, z)
		}
	}
	if zt == nil {
		return st, entries, nil, nil
	}
	zs := &ZtunnelStatus{Pod: zt.Namespace + "/" + zt.Name}
	ip := selection.PodIPs(zt)[0] // its primary address (selection.PickZtunnel: it has one)
	zs.IP = ip.String()
	veth, nsPath, err := c.dp.LocateZtunnel(net.IP(ip.AsSlice()))
	zs.HostVeth, zs.NetNS = veth, nsPath
	if err != nil {
		// Treat it as absent (the fail mode applies) and retry.
		zs.Error = err.Error()
		return st, entries, zs, fmt.Errorf("ztunnel %s: %w", zs.Pod, err)
	}
	st.Ztunnel = &dataplane.Ztunnel{Pod: zs.Pod, IPs: selection.PodIPs(zt), HostVeth: veth, NetNS: nsPath}
	return st, entries, zs, nil
}

// appliedDraining is the draining ztunnel pod of the last successful apply.
func (c *Controller) appliedDraining(pod string) *dataplane.Ztunnel {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.applied == nil {
		return nil
	}
	for _, z := range c.applied.Draining {
		if z.Pod == pod {
			return z
		}
	}
	return nil
}

// locate finds a ztunnel pod's host veth and netns.
func (c *Controller) locate(p *corev1.Pod) (*dataplane.Ztunnel, error) {
	ips := selection.PodIPs(p)
	if len(ips) == 0 {
		return nil, fmt.Errorf("ztunnel %s/%s has no address", p.Namespace, p.Name)
	}
	veth, nsPath, err := c.dp.LocateZtunnel(net.IP(ips[0].AsSlice()))
	if err != nil {
		return nil, err
	}
	return &dataplane.Ztunnel{Pod: p.Namespace + "/" + p.Name, IPs: ips, HostVeth: veth, NetNS: nsPath}, nil
}

func boolRank(b bool) int {
	if b {
		return 1
	}
	return 0
}

// dedupeIPs keeps the first pod claiming an IP (a stale pod object whose IP
// was reused must not block the new one; both cannot be programmed).
func dedupeIPs(pods []dataplane.Pod, log *zap.Logger) []dataplane.Pod {
	seen := make(map[netip.Addr]string, 2*len(pods))
	out := pods[:0]
	for _, p := range pods {
		ips, dropped := p.IPs, false // copied only when one goes
		for i, a := range p.IPs {
			if other, ok := seen[a]; ok {
				log.Warn("pod IP claimed by two enrolled pods; keeping the first", zap.String("ip", a.String()), zap.String("pod", p.Name), zap.String("other", other))
				if !dropped {
					ips, dropped = slices.Clone(p.IPs[:i]), true
				}
				continue
			}
			seen[a] = p.Name
			if dropped {
				ips = append(ips, a)
			}
		}
		if len(ips) > 0 {
			p.IPs = ips
			out = append(out, p)
		}
	}
	return out
}

func (c *Controller) syncOnce(ctx context.Context, resync bool) error {
	c.mu.Lock()
	pending := c.pendingSince
	c.pendingSince = time.Time{}
	dirty, all := c.dirty, c.dirtyAll
	c.dirty, c.dirtyAll = map[string]bool{}, false
	c.started++
	incremental := !resync && !all && c.applied != nil
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
	// An address two pods claim is for the full sync to decide: two of
	// the batch, changed or not, or one whose addresses change and one
	// outside the batch.
	owners := map[netip.Addr]string{}
	for key, e := range next {
		if e.pod == nil {
			continue
		}
		for _, a := range e.pod.IPs {
			if o, ok := owners[a]; ok && o != key {
				c.mu.Unlock()
				return false, nil
			}
			owners[a] = key
		}
	}
	for key := range dirty {
		old, e := c.pods[key], next[key] // zero when absent or gone
		if samePod(old.pod, e.pod) {
			continue
		}
		if old.pod != nil {
			remove = append(remove, old.pod.UID)
		}
		if e.pod != nil {
			for _, a := range e.pod.IPs {
				if c.ownerOf(a, key, dirty) != "" {
					c.mu.Unlock()
					return false, nil
				}
			}
			upsert = append(upsert, *e.pod)
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
	}
	c.mu.Lock()
	for key := range dirty {
		c.setPod(key, next[key], gone[key])
	}
	if len(upsert) > 0 || len(remove) > 0 {
		c.recordSync(start, res, err)
	}
	if err != nil {
		c.applied = nil // the next sync is a full one
		if !pending.IsZero() && c.pendingSince.IsZero() {
			c.pendingSince = pending
		}
	} else {
		for _, uid := range remove {
			delete(c.programmed, types.UID(uid))
		}
		for _, p := range upsert {
			c.programmed[types.UID(p.UID)] = true
		}
	}
	enrolled := len(c.programmed)
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
	c.pods, c.owners, c.conflicted = pods, map[netip.Addr]string{}, 0
	for key, e := range pods {
		c.index(key, e, 1)
	}
}

// setPod records one pod's entry (gone: the pod is). Called with c.mu held.
func (c *Controller) setPod(key string, e podEntry, gone bool) {
	if old, ok := c.pods[key]; ok {
		c.index(key, old, -1)
	}
	if gone {
		delete(c.pods, key)
		return
	}
	c.pods[key] = e
	c.index(key, e, 1)
}

// index adds (sign 1) or removes (-1) an entry's programmed addresses and
// its count among the pods programmed without some of their addresses
// (dedupeIPs).
func (c *Controller) index(key string, e podEntry, sign int) {
	if e.status.Enrolled && (e.pod == nil || len(e.pod.IPs) < len(e.status.IPs)) {
		c.conflicted += sign
	}
	if e.pod == nil {
		return
	}
	for _, a := range e.pod.IPs {
		if sign > 0 {
			c.owners[a] = key
		} else if c.owners[a] == key {
			delete(c.owners, a)
		}
	}
}

// ownerOf is the enrolled pod (key) other than key, and not about to
// change, that holds address a. Called with c.mu held.
func (c *Controller) ownerOf(a netip.Addr, key string, dirty map[string]bool) string {
	if o := c.owners[a]; o != "" && o != key && !dirty[o] {
		return o
	}
	return ""
}

// entry is a pod's selection outcome and, when enrolled, what to program.
// Called with c.mu held.
func (c *Controller) entry(p *corev1.Pod, ns *corev1.Namespace) podEntry {
	p, viaCNI, deleted := c.withCNI(p)
	ok, why := selection.Enrolled(p, ns, c.cfg.Selection)
	if deleted {
		ok, why = false, ReasonSandboxDeleted
	}
	ps := PodStatus{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID), Enrolled: ok, Reason: why, Annotation: p.Annotations[selection.RedirectionAnno]}
	for _, a := range p.Status.PodIPs {
		ps.IPs = append(ps.IPs, a.IP)
	}
	if len(ps.IPs) == 0 && p.Status.PodIP != "" {
		ps.IPs = []string{p.Status.PodIP}
	}
	ps.ViaCNI = viaCNI
	e := podEntry{status: ps}
	if ok {
		ips := selection.PodIPs(p)
		slices.SortFunc(ips, netip.Addr.Compare) // the status's and CNI's orders may differ
		e.pod = &dataplane.Pod{UID: string(p.UID), Name: p.Namespace + "/" + p.Name, IPs: ips}
	}
	return e
}

// recordSync records a sync's outcome for the debug endpoint. Called
// with c.mu held.
func (c *Controller) recordSync(start time.Time, res dataplane.Result, err error) {
	ss := &SyncStatus{Time: start, Duration: time.Since(start).String(), Writes: res.Writes, Changes: res.Changes}
	if err != nil {
		ss.Error = err.Error()
		c.status.Failures++
	} else {
		c.status.LastSuccess = time.Now()
		c.status.FirstSyncDone = true
	}
	c.status.Syncs++
	c.status.LastSync = ss
}

// syncAll recomputes the node's whole desired state from the caches and
// applies it.
func (c *Controller) syncAll(ctx context.Context, resync bool, pending time.Time) error {
	st, pods, zs, zerr := c.desired()
	if pods == nil && zerr != nil {
		return zerr
	}
	c.mu.Lock()
	var applied *dataplane.State
	if c.applied != nil {
		a := c.stateOf(*c.applied)
		applied = &a
	}
	c.mu.Unlock()
	if zerr != nil && applied != nil && applied.Ztunnel != nil && zs != nil && applied.Ztunnel.Pod == zs.Pod {
		// The running ztunnel could not be re-located (a transient netlink
		// or netns-scan failure): keep it rather than tear capture down;
		// the error still shows and the sync is retried.
		st.Ztunnel = applied.Ztunnel
	}
	zt := dataplane.State{Ztunnel: st.Ztunnel, Draining: st.Draining}
	if !resync && zerr == nil && applied != nil && reflect.DeepEqual(st, *applied) {
		// The event changed nothing the kernel carries (a plain pod, a
		// status or annotation update): no kernel work. Drift is the
		// resync's job.
		c.mu.Lock()
		c.setPods(pods)
		c.status.Ztunnel, c.wantZt = zs, zt
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
	drift := resync && applied != nil && reflect.DeepEqual(st, *applied)
	start := time.Now()
	res, applyErr := c.dp.Apply(ctx, st)
	err := errors.Join(zerr, applyErr)
	c.mu.Lock()
	c.setPods(pods)
	c.wantZt = zt
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
	if applyErr == nil { // programmed, even if the ztunnel lookup failed
		c.programmed = map[types.UID]bool{}
		for _, p := range st.Pods {
			c.programmed[types.UID(p.UID)] = true
		}
	}
	// What the kernel holds: st when the apply worked (even if the ztunnel
	// lookup failed and the previous one was kept), unknown otherwise.
	c.applied = nil
	if applyErr == nil {
		c.applied = &zt
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

// repaired records a repair the dataplane made between syncs.
func (c *Controller) repaired(res dataplane.Result) {
	c.mu.Lock()
	for k, v := range res.Writes {
		c.status.DriftRepairs[k] += v
	}
	c.mu.Unlock()
	if c.hooks.OnRepair != nil {
		c.hooks.OnRepair(res)
	}
}

func (c *Controller) kickAnnotations() {
	select {
	case c.annoKick <- struct{}{}:
	default:
	}
}

// annotationLoop makes the redirection annotation follow what is
// programmed: set once a pod's redirection is in the kernel, removed when it
// leaves. It runs apart from the kernel loop so an API outage never delays it.
func (c *Controller) annotationLoop(ctx context.Context) {
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.annoKick:
		case <-retry:
		}
		retry = nil
		if err := c.syncAnnotations(ctx); err != nil {
			c.log.Info("annotation sync incomplete; will retry", zap.Error(err))
			retry = time.After(time.Second)
		}
	}
}

func (c *Controller) syncAnnotations(ctx context.Context) error {
	podLister, _ := c.listers()
	pods, err := podLister.List(labels.Everything())
	if err != nil {
		return err
	}
	type patch struct {
		pod   *corev1.Pod
		value any
	}
	var todo []patch
	c.mu.Lock() // programmed changes in place
	for _, p := range pods {
		cur := p.Annotations[selection.RedirectionAnno]
		want := c.programmed[p.UID]
		switch {
		case want && cur == "":
			todo = append(todo, patch{p, selection.RedirectionEnabled})
		case !want && cur == selection.RedirectionEnabled:
			todo = append(todo, patch{p, nil}) // JSON null removes the key
		}
		// Otherwise in place, or an opt-out ("disabled") we never touch.
	}
	c.mu.Unlock()
	var errs []error
	for _, t := range todo {
		p := t.pod
		err := patchRedirection(ctx, c.client, p, t.value, "")
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("annotate %s/%s: %w", p.Namespace, p.Name, err))
		}
	}
	return errors.Join(errs...)
}
