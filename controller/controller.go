package controller

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"

	"github.com/ambient-redirect/ambient-redirect/controller/desired"
	"github.com/ambient-redirect/ambient-redirect/controller/handover"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube"
)

// Dataplane is what the controller needs of the dataplane.
type Dataplane interface {
	Apply(ctx context.Context, st dataplane.State) (dataplane.Result, error)
	// UpdatePods programs pod changes on top of the last Apply, at a cost
	// that does not grow with the node's pods.
	UpdatePods(ctx context.Context, upsert []dataplane.Pod, remove []string) (dataplane.Result, error)
	QueueResync()
	// Applied is the state the kernel holds (pods by UID); ok is false when
	// that is unknown (before the first apply, after a failed write).
	Applied() (st dataplane.State, ok bool)
	// Programmed returns the captured addresses of pod uid (none: not
	// programmed). The dataplane is the one record of what is programmed.
	Programmed(uid string) []netip.Addr
	// SidecarProgrammed reports whether a sidecar pod's rules are in
	// place, or what keeps them from it; Sidecars lists them all.
	SidecarProgrammed(uid string) (bool, error)
	Sidecars() []dataplane.SidecarState
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
	// WaitForZtunnel makes a CNI ADD of an ambient pod wait while the node
	// has no ztunnel programmed (fail mode closed): the pod starts captured
	// from its first packet once one is, instead of starting with its TCP
	// reset.
	WaitForZtunnel bool
	// ServiceCIDRs (--service-cidr, masked) are added to the ServiceCIDR
	// objects' CIDRs, and are all there is where those are not served.
	ServiceCIDRs []netip.Prefix
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
	// watchServiceCIDRs: the API server serves ServiceCIDRs to us (decided
	// once at start, before the first informer set).
	watchServiceCIDRs bool

	kick chan struct{}
	// anno keeps the redirection annotations following programmed.
	anno *annotator
	// driftKick asks for a resync at once: the kernel changed under us.
	driftKick chan struct{}

	mu     sync.Mutex
	status Status
	// pods are every pod of the node as the last sync saw it, by
	// namespace/name: its status and, when enrolled, what is programmed.
	pods map[string]podEntry
	// wantBase is the last full sync's desired state without its pods and
	// sidecars: the ztunnels and the Service CIDRs, which pod-only syncs
	// leave as they are.
	wantBase     dataplane.State
	pendingSince time.Time // oldest event not yet programmed
	// dirty are the pods (namespace/name) changed since the last sync;
	// dirtyAll asks for a full one (a namespace or ztunnel changed, the
	// first sync, a failed one).
	dirty    map[string]bool
	dirtyAll bool
	// conflicted counts the enrolled pods that lost an address to another
	// pod claiming it (dedupeIPs): a pod leaving may hand it back, which
	// only a full sync decides.
	conflicted int
	// enrolled counts the pods with something to program.
	enrolled int
	// cni are the pods the CNI plugin handed over, by namespace/name.
	cni *handover.Store
	// synced is closed (and replaced) after every sync: CNI ADDs wait on it.
	synced chan struct{}
	// started numbers the syncs (each takes the dirty set when it starts);
	// done is the number of the last one that finished.
	started, done uint64
}

// podEntry is one pod as the last sync saw it.
type podEntry = desired.Entry

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
		kick: make(chan struct{}, 1), driftKick: make(chan struct{}, 1),
		dirty: map[string]bool{}, dirtyAll: true, cni: handover.New(), synced: make(chan struct{}),
	}
	c.status.DriftRepairs = map[string]int{}
	c.anno = newAnnotator(client, log, func() corelisters.PodLister { pods, _ := c.listers(); return pods },
		func(uid types.UID) bool { return len(c.dp.Programmed(string(uid))) > 0 })
	return c
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

// Run syncs until ctx ends. It returns after the loop stopped; the kernel
// state is left in place on purpose (see cmd).
func (c *Controller) Run(ctx context.Context) error {
	if err := c.startServiceCIDRs(ctx); err != nil {
		return errors.New("the ServiceCIDR probe did not finish before shutdown")
	}
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
	go c.anno.run(ctx)
	go c.watchAPI(ctx)

	r := &syncRunner{
		sync: c.syncOnce, queueResync: dp.QueueResync, kick: c.kick, driftKick: c.driftKick,
		resyncPeriod: c.cfg.ResyncPeriod, maxBackoff: c.cfg.MaxBackoff, log: c.log,
	}
	return r.run(ctx)
}

// desired builds the desired state from the caches, and every pod's entry.
func (c *Controller) desired() (dataplane.State, map[string]podEntry, *ZtunnelStatus, error) {
	podLister, nsLister := c.listers()
	pods, err := podLister.List(labels.Everything())
	if err != nil {
		return dataplane.State{}, nil, nil, err
	}
	c.mu.Lock()
	if c.cni.Len() > 0 {
		cached := make(map[string]int, len(pods))
		for i, p := range pods {
			cached[p.Namespace+"/"+p.Name] = i
		}
		for key := range c.cni.Keys() {
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
	sandboxes := c.cni.Snapshot()
	c.mu.Unlock()
	out := desired.Build(desired.Input{
		Pods: pods, Sandboxes: sandboxes, Selection: c.cfg.Selection, Log: c.log,
		ServiceCIDRObjects: c.serviceCIDRObjects(), FlagServiceCIDRs: c.cfg.ServiceCIDRs,
		Namespace: func(name string) *corev1.Namespace { ns, _ := nsLister.Get(name); return ns },
	})
	st := out.State
	entries := out.Entries
	zt := out.Ztunnel
	for _, p := range out.Draining {
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
	ip := kube.PodIPs(zt)[0] // its primary address (kube.PickZtunnel: it has one)
	zs.IP = ip.String()
	veth, nsPath, err := c.dp.LocateZtunnel(net.IP(ip.AsSlice()))
	zs.HostVeth, zs.NetNS = veth, nsPath
	if err != nil {
		// Treat it as absent (the fail mode applies) and retry.
		zs.Error = err.Error()
		return st, entries, zs, fmt.Errorf("ztunnel %s: %w", zs.Pod, err)
	}
	st.Ztunnel = &dataplane.Ztunnel{Pod: zs.Pod, IPs: kube.PodIPs(zt), HostVeth: veth, NetNS: nsPath}
	return st, entries, zs, nil
}

// appliedDraining is the draining ztunnel pod the kernel holds.
func (c *Controller) appliedDraining(pod string) *dataplane.Ztunnel {
	applied, ok := c.dp.Applied()
	if !ok {
		return nil
	}
	for _, z := range applied.Draining {
		if z.Pod == pod {
			return z
		}
	}
	return nil
}

// locate finds a ztunnel pod's host veth and netns.
func (c *Controller) locate(p *corev1.Pod) (*dataplane.Ztunnel, error) {
	ips := kube.PodIPs(p)
	if len(ips) == 0 {
		return nil, fmt.Errorf("ztunnel %s/%s has no address", p.Namespace, p.Name)
	}
	veth, nsPath, err := c.dp.LocateZtunnel(net.IP(ips[0].AsSlice()))
	if err != nil {
		return nil, err
	}
	return &dataplane.Ztunnel{Pod: p.Namespace + "/" + p.Name, IPs: ips, HostVeth: veth, NetNS: nsPath}, nil
}
