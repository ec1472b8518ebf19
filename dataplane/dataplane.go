package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// ChainPrefix is the prefix of every iptables chain we own.
const ChainPrefix = "ztunnel-"

// Write kinds, for counting kernel writes.
const (
	KindIPSet    = "ipset"
	KindLink     = "link"
	KindAddr     = "addr"
	KindNeigh    = "neigh"
	KindRoute    = "route"
	KindRule     = "rule"
	KindSysctl   = "sysctl"
	KindIPTables = "iptables"
	KindNFT      = "nftables"
)

// Dataplane converges the kernel of one node (and its ztunnel's netns) to a
// desired State.
//
// Hazards it handles:
//   - Leaks and stalls mid-transition: writes follow the make-before-break
//     order of transition.go, in converge and Cleanup alike.
//   - Capture gaps: the ipset is updated in place and never re-created;
//     tunnels are kept across ztunnel changes (geneve changes its remote in
//     place, vxlan swaps a static FDB entry); the new ztunnel netns is set up
//     before the node is pointed at it; routes are replaced, not deleted and
//     re-added.
//   - Zero writes when nothing changed: a full apply (the first, after a
//     failure, on QueueResync, on a ztunnel change) reads every object back
//     and writes only differences; in between, pod churn diffs ipset members
//     and table-100 routes against what the last full apply left, reading
//     nothing and starting no process.
//   - Ownership: routes and rules carry our protocol number, chains our
//     prefix, links and sets fixed names; nothing else is ever deleted.
//   - The node is never without a local-table rule: ours is added before the
//     kernel's unconditional one is removed, and restored before ours is
//     removed on cleanup.
//   - Rule-priority conflicts with another agent are refused, not overwritten.
type Dataplane struct {
	cfg    Config
	log    *zap.Logger
	node   *kernel.Kernel
	openNS func(path string) (*kernel.Kernel, error)

	backend       string
	backendReason string
	// filter is the backend our rules are written with (iptables or
	// nftables), filterReason why.
	filter       Backend
	filterReason string
	// otherRetired says the other backend's rules (a restart with the
	// other one) are gone.
	otherRetired bool
	// iptReader reads other agents' iptables when ours are nftables.
	iptReader    map[Family]*iptables.Syncer
	tunnel       TunnelType
	tunnelReason string

	// fams are the families this node can carry: IPv4, and IPv6 unless
	// the kernel was booted without it.
	fams []Family

	// order runs converge's phases (a test may swap two).
	order phaseOrder

	mu sync.Mutex
	// mgr are the managers: what the agent last wrote or read back, all of
	// it.
	mgr managers
	// fast holds what a pod-only apply needs from the last full one; nil
	// forces a full apply, as does a manager with a resync queued.
	fast *fastPath
	// pods are the desired pods by UID.
	pods map[string]Pod
	// wanted is the ztunnel part of the last successful full apply's state
	// (UpdatePods builds on it).
	wanted State

	locMu   sync.Mutex
	located *located
}

// fastPath is the ztunnel-dependent input of per-pod routes, as of the last
// successful full apply: with it, a pod change is rendered and written
// without reading anything back.
type fastPath struct {
	zt   *ztRuntime   // k is closed: only addresses and links are used
	live []*ztRuntime // likewise
}

// Options are the dependencies of a Dataplane; zero values mean the real kernel.
type Options struct {
	Logger *zap.Logger
	// NodeNetNS is the path of the node's netns; "" means the current one.
	NodeNetNS string
	// Node overrides the node kernel (fakes).
	Node *kernel.Kernel
	// OpenNS opens a ztunnel netns (fakes); default kernel.Open.
	OpenNS func(path string) (*kernel.Kernel, error)
	// SkipConflictCheck is for cleanup, which only removes what is ours.
	SkipConflictCheck bool
}

// Result reports what one Apply or Cleanup did (or, dry, would do).
type Result struct {
	Writes  map[string]int `json:"writes"`
	Changes []string       `json:"changes"`
	Elapsed time.Duration  `json:"elapsed"`
}

// TotalWrites is the number of kernel writes.
func (r Result) TotalWrites() int {
	n := 0
	for _, v := range r.Writes {
		n += v
	}
	return n
}

// New validates cfg, opens the node's kernel and resolves the iptables
// backend and tunnel type.
func New(ctx context.Context, cfg Config, o Options) (_ *Dataplane, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d := &Dataplane{cfg: cfg, log: o.Logger, node: o.Node, openNS: o.OpenNS, mgr: newManagers(),
		pods: map[string]Pod{}}
	if d.log == nil {
		d.log = zap.NewNop()
	}
	if d.openNS == nil {
		d.openNS = kernel.Open
	}
	if d.node == nil {
		k, err := kernel.Open(o.NodeNetNS)
		if err != nil {
			return nil, err
		}
		d.node = k
		defer func() {
			if err != nil {
				k.Close()
			}
		}()
	}
	if err := d.chooseBackend(ctx); err != nil {
		return nil, err
	}
	d.fams = []Family{IPv4}
	if _, err := d.node.Sysctl.Get("net.ipv6.conf.all.forwarding"); err == nil {
		d.fams = append(d.fams, IPv6)
	} else {
		d.log.Info("IPv6 is disabled in this kernel (no net.ipv6 sysctls): programming IPv4 only", zap.Error(err))
	}
	for _, f := range []Family{IPv4, IPv6} {
		d.mgr.sets[f] = newSetManager(cfg, f, d.node.NL)
	}
	if err := d.useBackend(); err != nil {
		return nil, err
	}
	if err := d.resolveTunnel(); err != nil {
		return nil, err
	}
	d.mgr.routes = newRouteManager(d.node.NL, cfg.RouteProtocol)
	for _, f := range d.fams {
		d.mgr.rules[f] = newRuleManager(d.node.NL, f, cfg.RouteProtocol)
	}
	d.mgr.tunnels = newTunnelManager(d.node, NodeInLink, NodeOutLink)
	d.mgr.sysctls = newSysctlManager(d.node.Sysctl)
	if !o.SkipConflictCheck {
		if err := d.checkNodeConflicts(ctx); err != nil {
			return nil, err
		}
	}
	d.warnKubeProxy()
	d.log.Info("dataplane ready", zap.String("backend", string(d.filter)), zap.String("backendReason", d.filterReason),
		zap.String("iptablesBackend", d.backend), zap.String("iptablesReason", d.backendReason),
		zap.String("tunnel", string(d.tunnel)), zap.String("tunnelReason", d.tunnelReason))
	return d, nil
}

// Close releases kernel handles.
func (d *Dataplane) Close() { d.node.Close() }

// IPTablesBackend returns the backend in use and why.
func (d *Dataplane) IPTablesBackend() (string, string) { return d.backend, d.backendReason }

// Tunnel returns the tunnel type in use, why, and the port of the last apply.
func (d *Dataplane) Tunnel() (TunnelType, string, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	port := 0
	if f := d.mgr.nodeFilter[IPv4]; f != nil && f.params != nil {
		port = f.params.TunnelPort // what our rules were written with
	}
	return d.tunnel, d.tunnelReason, port
}

func (d *Dataplane) resolveTunnel() error {
	if d.cfg.Tunnel == TunnelVXLAN {
		d.tunnel, d.tunnelReason = TunnelVXLAN, "forced by configuration"
		return nil
	}
	if d.cfg.Tunnel == TunnelAuto {
		if l, err := d.node.NL.LinkByName(NodeInLink); err == nil {
			if info, ok := readTunnel(l); ok {
				d.tunnel, d.tunnelReason = info.Type, "auto: adopting the existing "+NodeInLink
				return nil
			}
		}
	}
	probeErr := d.probeGeneve()
	switch {
	case probeErr == nil && d.cfg.Tunnel == TunnelGeneve:
		d.tunnel, d.tunnelReason = TunnelGeneve, "forced by configuration"
	case probeErr == nil:
		d.tunnel, d.tunnelReason = TunnelGeneve, "auto: kernel supports geneve"
	case d.cfg.Tunnel == TunnelGeneve:
		return fmt.Errorf("tunnel geneve: the kernel cannot create geneve devices (CONFIG_GENEVE?): %w", probeErr)
	default:
		d.tunnel, d.tunnelReason = TunnelVXLAN, fmt.Sprintf("auto: no geneve in this kernel (%v), using vxlan", probeErr)
	}
	return nil
}

// probeGeneve creates and deletes a throwaway geneve device.
func (d *Dataplane) probeGeneve() error {
	name := "ar-probe-gnv"
	l := &netlink.Geneve{LinkAttrs: netlink.LinkAttrs{Name: name}, ID: 1, Remote: net.IPv4(127, 0, 0, 2), Dport: 1}
	if old, err := d.node.NL.LinkByName(name); err == nil {
		_ = d.node.NL.LinkDel(old) // left by an agent that died mid-probe; ours by name
	}
	if err := d.node.NL.LinkAdd(l); err != nil {
		return err
	}
	if err := d.node.NL.LinkDel(l); err != nil {
		return fmt.Errorf("delete geneve probe device %s: %w", name, err)
	}
	return nil
}

// writer performs (or, dry, only records) kernel writes and counts them.
type writer struct {
	dry bool
	res *Result
}

func newWriter(dry bool) *writer {
	return &writer{dry: dry, res: &Result{Writes: map[string]int{}}}
}

// merge adds what another writer recorded.
func (w *writer) merge(o *writer) {
	w.res.Changes = append(w.res.Changes, o.res.Changes...)
	for k, v := range o.res.Writes {
		w.res.Writes[k] += v
	}
}

func (w *writer) do(kind, what string, f func() error) error {
	w.res.Changes = append(w.res.Changes, kind+": "+what)
	if w.dry {
		return nil
	}
	if err := f(); err != nil {
		return fmt.Errorf("%s: %s: %w", kind, what, err)
	}
	w.res.Writes[kind]++
	return nil
}

// Apply converges the kernel to st. An error means the kernel may be only
// partly converged; calling Apply again continues from what is there.
func (d *Dataplane) Apply(ctx context.Context, st State) (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.applyLocked(ctx, st)
}

func (d *Dataplane) applyLocked(ctx context.Context, st State) (Result, error) {
	start := time.Now()
	w := newWriter(false)
	d.followKubeProxy()
	err := d.converge(ctx, st, w)
	if err != nil {
		// A failure may leave anything half-done: verify everything next time.
		queueResync(d.mgr.all())
	} else if !d.otherRetired {
		if rerr := d.retireOtherBackend(ctx, w); rerr != nil {
			d.log.Info("rules of the other backend not removed yet; the next apply retries", zap.Error(rerr))
		} else {
			d.otherRetired = true
		}
	}
	w.res.Elapsed = time.Since(start)
	if n := w.res.TotalWrites(); n > 0 || err != nil {
		d.log.Info("dataplane apply", zap.Int("pods", len(st.Pods)), zap.Bool("ztunnel", st.Ztunnel != nil),
			zap.Any("writes", w.res.Writes), zap.Duration("elapsed", w.res.Elapsed), zap.Error(err))
	}
	return *w.res, err
}

// QueueResync makes the next Apply read back and repair everything,
// including the iptables chains.
func (d *Dataplane) QueueResync() {
	d.mu.Lock()
	defer d.mu.Unlock()
	queueResync(d.mgr.all())
}

// Diff returns what Apply(st) would change, writing nothing, the state
// left in retired ztunnel netns included. It always reads back everything,
// into copies of the managers: the dataplane's lock is held only to take
// them, so pod events are not held up by the read-back.
func (d *Dataplane) Diff(ctx context.Context, st State) ([]string, error) {
	w := newWriter(true)
	err := d.diffView().converge(ctx, st, w)
	return w.res.Changes, err
}

// diffView is a Dataplane for one dry convergence: the same kernel and
// configuration, copies of what the last apply left (managers, live ztunnel
// netns, tunnel port), and nothing shared that converge writes.
func (d *Dataplane) diffView() *Dataplane {
	d.mu.Lock()
	defer d.mu.Unlock()
	return &Dataplane{
		cfg: d.cfg, log: d.log, node: d.node, openNS: d.openNS,
		backend: d.backend, backendReason: d.backendReason, filter: d.filter, filterReason: d.filterReason,
		tunnel: d.tunnel, tunnelReason: d.tunnelReason,
		fams: d.fams, order: d.order,
		mgr: *d.mgr.clone(), pods: maps.Clone(d.pods), wanted: d.wanted,
	}
}

// ztRuntime is the ztunnel as found in the kernel.
type ztRuntime struct {
	spec *Ztunnel
	slot int
	// ip is its address of the tunnels' underlay: IPv4 when it has one.
	ip netip.Addr
	// ips are its addresses per family the node carries.
	ips  map[Family]netip.Addr
	veth netlink.Link
	// hostIP is the node's source towards ip; hostIPs towards each of ips.
	hostIP  netip.Addr
	hostIPs map[Family]netip.Addr
	k       *kernel.Kernel
	eth     netlink.Link
}

// owner identifies this ztunnel's netns beyond its path (see
// managers.ztFilterManager).
func (z *ztRuntime) owner() string {
	return fmt.Sprintf("%s %s#%d", z.spec.Pod, z.veth.Attrs().Name, z.veth.Attrs().Index)
}

func (d *Dataplane) resolveZtunnel(z *Ztunnel) (*ztRuntime, error) {
	if z == nil {
		return nil, nil
	}
	veth, err := d.node.NL.LinkByName(z.HostVeth)
	if err != nil {
		return nil, fmt.Errorf("ztunnel %s: host veth %s: %w", z.Pod, z.HostVeth, err)
	}
	r := &ztRuntime{spec: z, veth: veth, ips: map[Family]netip.Addr{}, hostIPs: map[Family]netip.Addr{}}
	for _, f := range d.fams {
		ip, ok := z.IP(f)
		if !ok {
			continue
		}
		routes, err := d.node.NL.RouteGet(ipOf(ip))
		if err != nil || len(routes) == 0 || routes[0].Src == nil {
			return nil, fmt.Errorf("ztunnel %s: no route with a source address towards %s: %v", z.Pod, ip, err)
		}
		src, _ := netip.AddrFromSlice(routes[0].Src)
		r.ips[f], r.hostIPs[f] = ip, src.Unmap()
		if !r.ip.IsValid() {
			r.ip, r.hostIP = ip, src.Unmap()
		}
	}
	if !r.ip.IsValid() {
		return nil, fmt.Errorf("ztunnel %s has no address of a family this node carries (%v)", z.Pod, d.fams)
	}
	k, err := d.openNS(z.NetNS)
	if err != nil {
		return nil, fmt.Errorf("ztunnel %s: %w", z.Pod, err)
	}
	// The pod side of the veth is IFLA_LINK (ParentIndex) in the peer netns.
	eth, err := k.NL.LinkByIndex(veth.Attrs().ParentIndex)
	if err != nil {
		eth, err = k.NL.LinkByName("eth0")
	}
	if err != nil {
		k.Close()
		return nil, fmt.Errorf("ztunnel %s: no peer of %s in %s: %w", z.Pod, z.HostVeth, z.NetNS, err)
	}
	r.k, r.eth = k, eth
	return r, nil
}

// assignSlots gives every ztunnel that holds connections its slot: the
// slots the kernel's proxy-return tables already give them (pins survive
// an agent restart), and the active one a free slot, or, with three
// ztunnels at once, the oldest draining one's (whose connections then
// fail). A draining ztunnel without a slot holds none of our connections.
// The active one comes first.
func (d *Dataplane) assignSlots(zt *ztRuntime, draining []*ztRuntime, routes map[string]*route) []*ztRuntime {
	// A slot's owner is the gateway of its table's default route(s).
	var owner [Slots]map[Family]netip.Addr
	for s := range Slots {
		owner[s] = map[Family]netip.Addr{}
		for _, f := range d.fams {
			if r, ok := routes[routeKey(netlink.Route{Table: d.slotTable(s), Dst: ipNet(defaultPrefix(f))})]; ok && r.Gw != nil {
				a, _ := netip.AddrFromSlice(r.Gw)
				owner[s][f] = a.Unmap()
			}
		}
	}
	owns := func(s int, z *ztRuntime) bool {
		for f, a := range owner[s] {
			if z.ips[f] == a {
				return true
			}
		}
		return false
	}
	var live []*ztRuntime
	var taken [Slots]bool
	for _, z := range append([]*ztRuntime{zt}, draining...) {
		if z == nil {
			continue
		}
		for s := range Slots {
			if !taken[s] && owns(s, z) {
				z.slot, taken[s] = s, true
				live = append(live, z)
				break
			}
		}
	}
	if zt == nil {
		return live
	}
	if len(live) == 0 || live[0] != zt {
		free := slices.Index(taken[:], false)
		if free < 0 {
			// Three at once: the oldest draining one gives up its slot.
			oldest := live[len(live)-1]
			d.log.Info("a third ztunnel: the oldest draining one loses its connections", zap.String("pod", oldest.spec.Pod))
			live, free = live[:len(live)-1], oldest.slot
		}
		zt.slot = free
		live = append([]*ztRuntime{zt}, live...)
	}
	return live
}

// slotTable is the proxy-return table of a slot.
func (d *Dataplane) slotTable(slot int) int {
	if slot == 1 {
		return d.cfg.Tables.ProxyReturn2
	}
	return d.cfg.Tables.ProxyReturn
}

// eachFamily runs f for every family at once, each with a writer of its
// own; what they did is added to w in family order. Only for steps whose
// families touch separate kernel objects (iptables tables).
func eachFamily(fams []Family, w *writer, f func(Family, *writer) error) error {
	if len(fams) == 1 || w.dry {
		for _, fam := range fams {
			if err := f(fam, w); err != nil {
				return err
			}
		}
		return nil
	}
	ws := make([]*writer, len(fams))
	errs := make([]error, len(fams))
	var wg sync.WaitGroup
	for i, fam := range fams {
		ws[i] = newWriter(false)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(fam, ws[i])
		}()
	}
	wg.Wait()
	for _, fw := range ws {
		w.merge(fw)
	}
	return errors.Join(errs...)
}

// checkForwarding requires forwarding on for every family the state has
// addresses of (it is the node's to set, not ours).
func (d *Dataplane) checkForwarding(st State) error {
	for _, f := range d.fams {
		used := st.Ztunnel != nil && st.Ztunnel.hasFamily(f)
		for _, p := range st.Pods {
			used = used || slices.ContainsFunc(p.IPs, func(a netip.Addr) bool { return FamilyOf(a) == f })
		}
		if !used {
			continue
		}
		key := "net.ipv4.ip_forward"
		if f == IPv6 {
			key = "net.ipv6.conf.all.forwarding"
		}
		if v, err := d.node.Sysctl.Get(key); err != nil || v != "1" {
			return fmt.Errorf("%s must be 1 on the node (is %q, %v): pods' %v traffic cannot be forwarded", key, v, err, f)
		}
	}
	return nil
}

// applyPods writes the difference between st's pods and the desired ones.
// Comparing them is the only work proportional to the node's pods; the
// writes and the rendering cost only the pods that changed.
func (d *Dataplane) applyPods(st State, f *fastPath, w *writer) error {
	var upsert []Pod
	var remove []string
	seen := make(map[string]bool, len(st.Pods))
	for _, p := range st.Pods {
		seen[p.UID] = true
		if old, ok := d.pods[p.UID]; !ok || !slices.Equal(old.IPs, p.IPs) {
			upsert = append(upsert, p)
		}
	}
	for uid := range d.pods {
		if !seen[uid] {
			remove = append(remove, uid)
		}
	}
	return d.updatePods(upsert, remove, f, w)
}

// updatePods makes the pods of upsert desired (replacing the same UID's)
// and those of remove (UIDs) undesired, then writes what that changed in
// the make-before-break order: members in, routes in, routes out, members
// out. A failed write fails the apply, which makes the next one a full
// read-back.
func (d *Dataplane) updatePods(upsert []Pod, remove []string, f *fastPath, w *writer) error {
	// Refuse a batch Apply would refuse (an invalid address, or one claimed
	// twice) before changing anything.
	var problems []string
	for _, p := range upsert {
		problems = append(problems, p.problems()...)
	}
	if len(problems) > 0 {
		slices.Sort(problems)
		return fmt.Errorf("%w: %s", ErrInvalidState, strings.Join(problems, "; "))
	}
	leaving := map[string]bool{}
	for _, uid := range remove {
		leaving[uid] = true
	}
	for _, p := range upsert {
		leaving[p.UID] = true
	}
	claimed := map[netip.Addr]string{}
	for _, p := range upsert {
		for _, a := range p.IPs {
			a = a.Unmap()
			holder, ok := d.mgr.sets[FamilyOf(a)].holder(a)
			if !ok || leaving[holder] {
				holder = claimed[a]
			}
			if err := Claim(a, p.UID, holder); err != nil {
				return err
			}
			claimed[a] = p.UID
		}
	}
	drop := func(p Pod) {
		for _, a := range p.IPs {
			a = a.Unmap()
			if uid, _ := d.mgr.sets[FamilyOf(a)].t.Desired(a); uid == p.UID {
				d.mgr.sets[FamilyOf(a)].t.DeleteDesired(a)
				d.mgr.routes.t.DeleteDesired(d.podRouteKey(a))
			}
		}
	}
	for _, uid := range remove {
		drop(d.pods[uid])
		delete(d.pods, uid)
	}
	for _, p := range upsert {
		drop(d.pods[p.UID])
	}
	for _, p := range upsert {
		for _, a := range p.IPs {
			a = a.Unmap()
			d.mgr.sets[FamilyOf(a)].t.SetDesired(a, p.UID)
			if r, ok := d.podRoute(a, f.zt); ok {
				d.mgr.routes.want(r)
			}
		}
		d.pods[p.UID] = p
	}
	// Make before break: members in, routes in, routes out, members out.
	sets, routes := d.mgr.setList(), []manager{d.mgr.routes}
	for _, step := range []struct {
		ms    []manager
		apply func(manager, context.Context, *writer) error
	}{{sets, manager.applyUpdates}, {routes, manager.applyUpdates}, {routes, manager.applyDeletes}, {sets, manager.applyDeletes}} {
		for _, m := range step.ms {
			if err := step.apply(m, context.Background(), w); err != nil {
				return err
			}
		}
	}
	return nil
}

// UpdatePods programs pod changes alone, on top of the last Apply: the
// pods of upsert (replacing any of the same UID) and the removal of the
// UIDs of remove. Its cost does not grow with the node's pods. When the
// last apply failed, or a resync is queued, it applies the whole desired
// state instead.
func (d *Dataplane) UpdatePods(ctx context.Context, upsert []Pod, remove []string) (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.fast
	if f == nil || anyResyncQueued(d.mgr.all()) {
		pods := maps.Clone(d.pods)
		for _, uid := range remove {
			delete(pods, uid)
		}
		for _, p := range upsert {
			pods[p.UID] = p
		}
		st := d.wanted
		st.Pods = slices.SortedFunc(maps.Values(pods), func(a, b Pod) int { return strings.Compare(a.UID, b.UID) })
		return d.applyLocked(ctx, st)
	}
	start := time.Now()
	w := newWriter(false)
	err := d.updatePods(upsert, remove, f, w)
	if err != nil && !errors.Is(err, ErrInvalidState) {
		// Written in part: what the kernel holds is unknown until a full
		// apply reads the sets and routes back.
		d.fast = nil
		queueResync([]manager{d.mgr.sets[IPv4], d.mgr.sets[IPv6], d.mgr.routes})
	}
	w.res.Elapsed = time.Since(start)
	return *w.res, err
}

func podsByUID(pods []Pod) map[string]Pod {
	m := make(map[string]Pod, len(pods))
	for _, p := range pods {
		m[p.UID] = p
	}
	return m
}

// podRouteKey is the key of a pod address's inbound route.
func (d *Dataplane) podRouteKey(a netip.Addr) string {
	return routeKey(netlink.Route{Table: d.cfg.Tables.Inbound, Dst: ipNet(netip.PrefixFrom(a, a.BitLen()))})
}

func cloneZtunnel(z *Ztunnel) *Ztunnel {
	if z == nil {
		return nil
	}
	c := *z
	c.IPs = slices.Clone(z.IPs)
	return &c
}

func sameZtunnel(a, b *Ztunnel) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Pod == b.Pod && a.HostVeth == b.HostVeth && a.NetNS == b.NetNS && slices.Equal(a.IPs, b.IPs)
}

func (d *Dataplane) startPort() int {
	if d.cfg.TunnelPort != 0 {
		return d.cfg.TunnelPort
	}
	return defaultPort(d.tunnel)
}

// isGone reports an error resolving a ztunnel that says it no longer
// exists: its host veth or its netns is gone.
func isGone(err error) bool {
	return err != nil && (isLinkNotFound(err) || errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT))
}
