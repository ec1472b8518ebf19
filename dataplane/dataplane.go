package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"sort"
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
	tunnel        TunnelType
	tunnelReason  string

	mu       sync.Mutex
	nodeIPT  *iptables.Syncer
	ztIPT    map[string]*iptables.Syncer
	lastZtNS string
	// liveNS are the netns of every ztunnel programmed by the last apply
	// (the active one and a draining one).
	liveNS []string
	// last is what the node's iptables rules were last written from (nil:
	// not known to this process); transitions start from it.
	last *NodeParams
	port int
	// resync makes the next Apply verify the iptables chains even when the
	// rendered rules did not change. Reading them back costs a process per
	// table, so per-pod applies skip it (they only touch ipset members and
	// routes); the periodic resync repairs iptables drift.
	resync bool
	// applied maps a syncer to the rendered rules it last converged to.
	applied map[*iptables.Syncer]string
	// fast holds what a pod-only apply needs from the last full one; nil
	// forces a full apply.
	fast *fastPath

	locMu   sync.Mutex
	located *located
}

// fastPath is the ztunnel-dependent input of per-pod routes, as of the last
// successful full apply.
type fastPath struct {
	spec     *Ztunnel
	draining []*Ztunnel
	zt       *ztRuntime   // k is closed: only addresses and links are used
	live     []*ztRuntime // likewise
	in       netlink.Link
	out      netlink.Link
	// members and routes are what the kernel holds as of the last full
	// apply plus every write since: pod churn diffs against them instead of
	// dumping the set and the route tables on each event.
	members map[Family]map[netip.Addr]string
	routes  map[string]netlink.Route
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
	d := &Dataplane{cfg: cfg, log: o.Logger, node: o.Node, openNS: o.OpenNS, ztIPT: map[string]*iptables.Syncer{},
		resync: true, applied: map[*iptables.Syncer]string{}}
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
	switch cfg.IPTablesMode {
	case IPTablesNFT:
		d.backend, d.backendReason = iptables.NFT, "forced by configuration"
	case IPTablesLegacy:
		d.backend, d.backendReason = iptables.Legacy, "forced by configuration"
	default:
		b, why, err := iptables.Detect(ctx, d.node.IPT)
		if err != nil {
			return nil, err
		}
		d.backend, d.backendReason = b, why
	}
	r, err := d.node.IPT(d.backend)
	if err != nil {
		return nil, err
	}
	d.nodeIPT = iptables.NewSyncer(r, ChainPrefix)
	if err := d.resolveTunnel(); err != nil {
		return nil, err
	}
	if !o.SkipConflictCheck {
		if err := d.checkRuleConflicts(d.node.NL, d.nodePriorities()); err != nil {
			return nil, err
		}
	}
	d.log.Info("dataplane ready",
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
	return d.tunnel, d.tunnelReason, d.port
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
	start := time.Now()
	w := newWriter(false)
	err := d.converge(ctx, st, w)
	// A failure may leave anything half-done: verify everything next time.
	d.resync = err != nil
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
	d.resync = true
}

// Diff returns what Apply(st) would change, writing nothing. It always
// reads back everything.
func (d *Dataplane) Diff(ctx context.Context, st State) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	port := d.port
	defer func() { d.port = port }()
	w := newWriter(true)
	err := d.converge(ctx, st, w)
	return w.res.Changes, err
}

func (d *Dataplane) nodePriorities() []int {
	p := d.cfg.Priorities
	return []int{p.ProxyReturn2, p.Skip, p.Outbound, p.ProxyReturn, p.Inbound}
}

func (d *Dataplane) ztunnelPriorities() []int {
	return []int{d.cfg.Priorities.ZtunnelTProxy, d.cfg.Priorities.ZtunnelOrigSrc}
}

// ztRuntime is the ztunnel as found in the kernel.
type ztRuntime struct {
	spec   *Ztunnel
	slot   int
	ip     netip.Addr
	veth   netlink.Link
	hostIP netip.Addr
	k      *kernel.Kernel
	eth    netlink.Link
}

func (d *Dataplane) resolveZtunnel(z *Ztunnel) (*ztRuntime, error) {
	if z == nil {
		return nil, nil
	}
	ip, _ := z.IP(IPv4)
	veth, err := d.node.NL.LinkByName(z.HostVeth)
	if err != nil {
		return nil, fmt.Errorf("ztunnel %s: host veth %s: %w", z.Pod, z.HostVeth, err)
	}
	routes, err := d.node.NL.RouteGet(net.IP(ip.AsSlice()))
	if err != nil || len(routes) == 0 || routes[0].Src == nil {
		return nil, fmt.Errorf("ztunnel %s: no route with a source address towards %s: %v", z.Pod, ip, err)
	}
	hostIP, _ := netip.AddrFromSlice(routes[0].Src)
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
	return &ztRuntime{spec: z, ip: ip, veth: veth, hostIP: hostIP.Unmap(), k: k, eth: eth}, nil
}

func (d *Dataplane) converge(ctx context.Context, st State, w *writer) error {
	if err := st.Validate(); err != nil {
		return err
	}
	if f := d.fast; f != nil && !w.dry && !d.resync && sameZtunnel(f.spec, st.Ztunnel) &&
		slices.EqualFunc(f.draining, st.Draining, sameZtunnel) {
		// Pod churn with the same ztunnel: only ipset members and table-100
		// routes can differ. Everything else is verified by the resync.
		return d.applyPods(st, f, w)
	}
	if !w.dry {
		d.fast = nil
	}
	if v, err := d.node.Sysctl.Get("net.ipv4.ip_forward"); err != nil || v != "1" {
		return fmt.Errorf("net.ipv4.ip_forward must be 1 on the node (is %q, %v): pods' traffic cannot be forwarded", v, err)
	}
	if err := d.checkRuleConflicts(d.node.NL, d.nodePriorities()); err != nil {
		return err
	}
	zt, err := d.resolveZtunnel(st.Ztunnel)
	if err != nil {
		return err
	}
	if zt != nil {
		defer zt.k.Close()
	}
	var draining []*ztRuntime
	for _, z := range st.Draining {
		r, err := d.resolveZtunnel(z)
		if err != nil {
			// Gone (its netns or veth): so are its connections.
			d.log.Debug("draining ztunnel not found", zap.String("pod", z.Pod), zap.Error(err))
			continue
		}
		defer r.k.Close()
		draining = append(draining, r)
	}
	want := map[Family]map[netip.Addr]string{}
	for _, f := range []Family{IPv4, IPv6} {
		if want[f], err = st.members(f); err != nil {
			return err
		}
	}
	members, err := d.readSets(w)
	if err != nil {
		return err
	}
	routes, err := ourRoutesByKey(d.node.NL, d.cfg.RouteProtocol)
	if err != nil {
		return err
	}
	links, err := d.node.NL.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	d.port = pickPort(d.startPort(), links, map[string]bool{NodeInLink: true, NodeOutLink: true})
	live := d.assignSlots(zt, draining, routes)
	next := d.nodeParams(zt, live)
	prev := next
	if !w.dry {
		if d.last == nil {
			actual, err := d.nodeIPT.Actual(ctx)
			if err != nil {
				return err
			}
			adopted := adoptedParams(d.cfg, next, actual)
			d.last = &adopted
		}
		prev = *d.last
	}
	vethExists := func(name string) bool {
		_, err := d.node.NL.LinkByName(name)
		return err == nil
	}
	rules := &nodeRules{d: d, ctx: ctx, w: w}

	// Make: the order is explained in transition.go.
	for _, f := range []Family{IPv4, IPv6} {
		if err := d.addMembers(d.setName(f), want[f], members[f], w); err != nil {
			return err
		}
	}
	var inLink, outLink netlink.Link
	for _, z := range live {
		// The new ztunnel's netns first: the node must never point at a
		// ztunnel that cannot answer yet. Each one's IP stays on its veth
		// in our tables: encapsulated packets carry the inner mark and
		// must not loop into the tunnel.
		if err := d.syncZtunnelNS(ctx, z, w); err != nil {
			return err
		}
		if err := addRoutes(d.node.NL, routes, d.ztunnelRoutes(z), w); err != nil {
			return err
		}
	}
	if !w.dry {
		if err := rules.write(unionParams(prev, next, vethExists, false)); err != nil {
			return err
		}
	}
	if zt != nil {
		in, out := d.tunnelEnds(zt, true)
		if inLink, err = syncTunnel(d.node.NL, in, w); err != nil {
			return err
		}
		if outLink, err = syncTunnel(d.node.NL, out, w); err != nil {
			return err
		}
	}
	if err := d.syncNodeSysctls(zt, live, w); err != nil {
		return err
	}
	wantRoutes := d.nodeRoutes(st, zt, live, inLink, outLink)
	reach, inbound := d.splitInbound(wantRoutes)
	if err := addRoutes(d.node.NL, routes, reach, w); err != nil {
		return err
	}
	if err := d.syncRules(d.node.NL, d.nodeRules(), d.cfg.CaptureNodeLocal, w); err != nil {
		return err
	}
	if !w.dry {
		if err := rules.write(unionParams(prev, next, vethExists, true)); err != nil {
			return err
		}
	}
	if err := addRoutes(d.node.NL, routes, inbound, w); err != nil {
		return err
	}

	// Break.
	if err := pruneRoutes(d.node.NL, routes, wantRoutes, d.isInbound, w); err != nil {
		return err
	}
	if err := rules.write(next); err != nil {
		return err
	}
	for _, f := range []Family{IPv4, IPv6} {
		if err := d.delMembers(d.setName(f), want[f], members[f], w); err != nil {
			return err
		}
	}
	if err := pruneRoutes(d.node.NL, routes, wantRoutes, nil, w); err != nil {
		return err
	}
	newNS, liveNS := "", []string{}
	if zt != nil {
		newNS = zt.spec.NetNS
	}
	for _, z := range live {
		liveNS = append(liveNS, z.spec.NetNS)
	}
	if !w.dry {
		for _, old := range append([]string{d.lastZtNS}, d.liveNS...) {
			if old == "" || slices.Contains(liveNS, old) {
				continue
			}
			// A ztunnel that holds no connections any more may still run:
			// take our state out of its netns so it stops intercepting.
			// Best effort: it may be gone.
			if err := d.cleanupZtunnelNS(ctx, old, w); err != nil {
				d.log.Info("old ztunnel netns not cleaned (likely gone)", zap.String("netns", old), zap.Error(err))
			}
		}
		d.lastZtNS, d.liveNS = newNS, liveNS
		drain := make([]*Ztunnel, len(st.Draining))
		for i, z := range st.Draining {
			drain[i] = cloneZtunnel(z)
		}
		d.fast = &fastPath{spec: cloneZtunnel(st.Ztunnel), draining: drain, zt: zt, live: live, in: inLink, out: outLink, members: members, routes: routes}
	}
	return nil
}

// assignSlots gives every ztunnel that holds connections its slot: the
// slots the kernel's proxy-return tables already give them (pins survive
// an agent restart), and the active one a free slot, or, with three
// ztunnels at once, the oldest draining one's (whose connections then
// fail). A draining ztunnel without a slot holds none of our connections.
// The active one comes first.
func (d *Dataplane) assignSlots(zt *ztRuntime, draining []*ztRuntime, routes map[string]netlink.Route) []*ztRuntime {
	var owner [Slots]netip.Addr
	for s := range Slots {
		if r, ok := routes[routeKey(netlink.Route{Table: d.slotTable(s)})]; ok && r.Gw != nil {
			owner[s], _ = netip.AddrFromSlice(r.Gw.To4())
		}
	}
	var live []*ztRuntime
	var taken [Slots]bool
	for _, z := range append([]*ztRuntime{zt}, draining...) {
		if z == nil {
			continue
		}
		for s := range Slots {
			if !taken[s] && owner[s] == z.ip {
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

// nodeRules writes the node's iptables rules for one step of a
// transition, skipping a step whose rules equal the previous one's.
type nodeRules struct {
	d       *Dataplane
	ctx     context.Context
	w       *writer
	written string
}

func (r *nodeRules) write(p NodeParams) error {
	rs := NodeRuleset(r.d.cfg, p)
	rendered := rs.Render()
	if rendered == r.written {
		return nil
	}
	if err := r.d.syncIPTables(r.ctx, r.d.nodeIPT, rs, r.w); err != nil {
		return err
	}
	r.written = rendered
	if !r.w.dry {
		r.d.last = &p // what the kernel holds now
	}
	return nil
}

// applyPods writes the member and route differences between st and what
// the last full apply left (kept current by every write since), in the
// make-before-break order: members, routes in, routes out, members out.
// A failed write fails the apply, which makes the next one a full read-back.
func (d *Dataplane) applyPods(st State, f *fastPath, w *writer) error {
	want := map[Family]map[netip.Addr]string{}
	for _, fam := range []Family{IPv4, IPv6} {
		m, err := st.members(fam)
		if err != nil {
			return err
		}
		want[fam] = m
		if err := d.addMembers(d.setName(fam), m, f.members[fam], w); err != nil {
			return err
		}
	}
	rs := d.nodeRoutes(st, f.zt, f.live, f.in, f.out)
	if err := addRoutes(d.node.NL, f.routes, rs, w); err != nil {
		return err
	}
	if err := pruneRoutes(d.node.NL, f.routes, rs, nil, w); err != nil {
		return err
	}
	for _, fam := range []Family{IPv4, IPv6} {
		if err := d.delMembers(d.setName(fam), want[fam], f.members[fam], w); err != nil {
			return err
		}
	}
	return nil
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

// --- ipsets ---

func (d *Dataplane) setName(f Family) string {
	if f == IPv6 {
		return d.cfg.IPSetNameV6
	}
	return d.cfg.IPSetName
}

func familyNum(f Family) uint8 {
	if f == IPv6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func isNotExist(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ESRCH)
}

// ipsetMembers lists a set we own; ok is false when it does not exist.
func (d *Dataplane) ipsetMembers(nl kernel.Netlink, f Family) (map[netip.Addr]string, bool, error) {
	name := d.setName(f)
	res, err := nl.IpsetList(name)
	if err != nil {
		if isNotExist(err) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("list ipset %s: %w", name, err)
	}
	if res.TypeName != "hash:ip" || res.Family != familyNum(f) {
		return nil, true, fmt.Errorf("ipset %s exists as %s family %d, not hash:ip family %d: refusing to replace a set in use", name, res.TypeName, res.Family, familyNum(f))
	}
	out := map[netip.Addr]string{}
	for _, e := range res.Entries {
		if a, ok := netip.AddrFromSlice(e.IP); ok {
			out[a.Unmap()] = e.Comment
		}
	}
	return out, true, nil
}

// readSets returns the members of our sets, creating a set that is missing.
func (d *Dataplane) readSets(w *writer) (map[Family]map[netip.Addr]string, error) {
	out := map[Family]map[netip.Addr]string{}
	for _, f := range []Family{IPv4, IPv6} {
		name := d.setName(f)
		have, exists, err := d.ipsetMembers(d.node.NL, f)
		if err != nil {
			return nil, err
		}
		if !exists {
			opts := netlink.IpsetCreateOptions{Family: familyNum(f), Comments: true}
			if err := w.do(KindIPSet, "create "+name, func() error { return d.node.NL.IpsetCreate(name, "hash:ip", opts) }); err != nil {
				return nil, err
			}
		}
		if have == nil {
			have = map[netip.Addr]string{}
		}
		out[f] = have
	}
	return out, nil
}

// addMembers adds (or re-labels) the members of want the set lacks, given
// that it holds have (updated in place as writes succeed).
func (d *Dataplane) addMembers(name string, want, have map[netip.Addr]string, w *writer) error {
	for _, a := range sortedAddrs(want) {
		uid := want[a]
		if cur, ok := have[a]; ok && cur == uid {
			continue
		}
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice()), Comment: uid, Replace: true}
		if err := w.do(KindIPSet, fmt.Sprintf("add %s %s (%s)", name, a, uid), func() error { return d.node.NL.IpsetAdd(name, e) }); err != nil {
			return err
		}
		have[a] = uid
	}
	return nil
}

// delMembers deletes the members of have that want lacks.
func (d *Dataplane) delMembers(name string, want, have map[netip.Addr]string, w *writer) error {
	for _, a := range sortedAddrs(have) {
		if _, ok := want[a]; ok {
			continue
		}
		e := &netlink.IPSetEntry{IP: net.IP(a.AsSlice())}
		if err := w.do(KindIPSet, fmt.Sprintf("del %s %s", name, a), func() error { return ignoreNotExist(d.node.NL.IpsetDel(name, e)) }); err != nil {
			return err
		}
		delete(have, a)
	}
	return nil
}

func sortedAddrs[V any](m map[netip.Addr]V) []netip.Addr {
	return slices.SortedFunc(maps.Keys(m), func(a, b netip.Addr) int { return a.Compare(b) })
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

func ignoreNotExist(err error) error {
	if err != nil && (isNotExist(err) || errors.Is(err, unix.EADDRNOTAVAIL)) {
		return nil
	}
	return err
}

// --- routes ---

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipOf(a netip.Addr) net.IP {
	if !a.IsValid() {
		return nil
	}
	return net.IP(a.AsSlice())
}

func linkIndex(l netlink.Link) int {
	if l == nil {
		return 0
	}
	return l.Attrs().Index
}

func (d *Dataplane) nodeRoutes(st State, zt *ztRuntime, live []*ztRuntime, in, out netlink.Link) []netlink.Route {
	t := d.cfg.Tables
	proto := netlink.RouteProtocol(d.cfg.RouteProtocol)
	defaultDst := ipNet(netip.MustParsePrefix("0.0.0.0/0"))
	var rs []netlink.Route
	for _, z := range live {
		// Every ztunnel that holds connections gets their packets back
		// through its slot's table.
		rs = append(rs, d.ztunnelRoutes(z)...)
		rs = append(rs, netlink.Route{Table: d.slotTable(z.slot), Dst: defaultDst, Gw: ipOf(z.ip), LinkIndex: z.veth.Attrs().Index,
			Flags: int(netlink.FLAG_ONLINK), Type: unix.RTN_UNICAST, Protocol: proto})
	}
	if zt == nil {
		// No ztunnel for new connections: lookups fall through to main.
		// Fail open lets traffic flow; fail closed rejects it with TCP
		// resets in filter FORWARD. (Not unreachable routes: their ICMP
		// errors are rate-limited per host, so a busy pod's connects would
		// hang instead of failing.)
		return rs
	}
	members, _ := st.members(IPv4)
	_, inPeer := tunnelAddrs(d.cfg.InNet)
	_, outPeer := tunnelAddrs(d.cfg.OutNet)
	for _, a := range sortedAddrs(members) {
		rs = append(rs, netlink.Route{Table: t.Inbound, Dst: ipNet(netip.PrefixFrom(a, 32)), Gw: ipOf(inPeer), LinkIndex: linkIndex(in), Src: ipOf(zt.hostIP), Type: unix.RTN_UNICAST, Protocol: proto})
	}
	return append(rs, netlink.Route{Table: t.Outbound, Dst: defaultDst, Gw: ipOf(outPeer), LinkIndex: linkIndex(out), Type: unix.RTN_UNICAST, Protocol: proto})
}

// ztunnelRoutes keep ZIP on its veth in each of our tables: the
// encapsulated packets inherit the inner mark and must not loop back into
// the tunnel.
func (d *Dataplane) ztunnelRoutes(zt *ztRuntime) []netlink.Route {
	t := d.cfg.Tables
	var rs []netlink.Route
	for _, table := range []int{t.Inbound, t.Outbound, t.ProxyReturn, t.ProxyReturn2} {
		rs = append(rs, netlink.Route{Table: table, Dst: ipNet(netip.PrefixFrom(zt.ip, 32)), LinkIndex: zt.veth.Attrs().Index,
			Scope: netlink.SCOPE_LINK, Type: unix.RTN_UNICAST, Protocol: netlink.RouteProtocol(d.cfg.RouteProtocol)})
	}
	return rs
}

func routeKey(r netlink.Route) string {
	dst := "0.0.0.0/0"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	return fmt.Sprintf("table %d %s", r.Table, dst)
}

func routeString(r netlink.Route) string {
	s := routeKey(r)
	switch r.Type {
	case unix.RTN_UNREACHABLE:
		return "unreachable " + s
	case unix.RTN_LOCAL:
		s = "local " + s
	}
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	if r.LinkIndex != 0 {
		s += fmt.Sprintf(" dev#%d", r.LinkIndex)
	}
	if r.Src != nil {
		s += " src " + r.Src.String()
	}
	if r.Scope != 0 {
		s += " scope " + r.Scope.String()
	}
	if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		s += " onlink"
	}
	return s
}

func routeEqual(want, have netlink.Route) bool {
	if want.Type != have.Type || want.Scope != have.Scope || !want.Gw.Equal(have.Gw) || !want.Src.Equal(have.Src) {
		return false
	}
	if want.Type != unix.RTN_UNREACHABLE && want.LinkIndex != have.LinkIndex {
		return false
	}
	return want.Flags&int(netlink.FLAG_ONLINK) == have.Flags&int(netlink.FLAG_ONLINK)
}

// ourRoutes lists every IPv4 route with our protocol, in all tables.
func ourRoutes(nl kernel.Netlink, proto int) ([]netlink.Route, error) {
	filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(proto)}
	rs, err := nl.RouteListFiltered(netlink.FAMILY_V4, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	return rs, nil
}

// syncRoutes makes our routes (by protocol, all tables) exactly want.
func syncRoutes(nl kernel.Netlink, proto int, want []netlink.Route, w *writer) error {
	have, err := ourRoutesByKey(nl, proto)
	if err != nil {
		return err
	}
	if err := addRoutes(nl, have, want, w); err != nil {
		return err
	}
	return pruneRoutes(nl, have, want, nil, w)
}

func ourRoutesByKey(nl kernel.Netlink, proto int) (map[string]netlink.Route, error) {
	rs, err := ourRoutes(nl, proto)
	if err != nil {
		return nil, err
	}
	have := make(map[string]netlink.Route, len(rs))
	for _, r := range rs {
		have[routeKey(r)] = r
	}
	return have, nil
}

// addRoutes replaces every route of want that the kernel lacks or holds
// differently, given that it holds have (updated in place as writes succeed).
func addRoutes(nl kernel.Netlink, have map[string]netlink.Route, want []netlink.Route, w *writer) error {
	for _, r := range want {
		k := routeKey(r)
		if cur, ok := have[k]; ok && routeEqual(r, cur) {
			continue
		}
		if err := w.do(KindRoute, "replace "+routeString(r), func() error { return nl.RouteReplace(&r) }); err != nil {
			return err
		}
		have[k] = r
	}
	return nil
}

// pruneRoutes deletes the routes of have that want lacks and sel (nil: all)
// selects.
func pruneRoutes(nl kernel.Netlink, have map[string]netlink.Route, want []netlink.Route, sel func(netlink.Route) bool, w *writer) error {
	keep := make(map[string]bool, len(want))
	for _, r := range want {
		keep[routeKey(r)] = true
	}
	for _, k := range slices.Sorted(maps.Keys(have)) {
		r := have[k]
		if keep[k] || (sel != nil && !sel(r)) {
			continue
		}
		if err := w.do(KindRoute, "del "+routeString(r), func() error { return ignoreNotExist(nl.RouteDel(&r)) }); err != nil {
			return err
		}
		delete(have, k)
	}
	return nil
}

// isInbound reports a per-pod table-100 route: the inbound capture layer
// (the ztunnel's own route in that table has no gateway).
func (d *Dataplane) isInbound(r netlink.Route) bool {
	return r.Table == d.cfg.Tables.Inbound && r.Gw != nil
}

// splitInbound separates the per-pod inbound routes from the rest.
func (d *Dataplane) splitInbound(rs []netlink.Route) (reach, inbound []netlink.Route) {
	for _, r := range rs {
		if d.isInbound(r) {
			inbound = append(inbound, r)
		} else {
			reach = append(reach, r)
		}
	}
	return reach, inbound
}

// --- rules ---

func newRule(prio, table int, mark, mask uint32, proto int) netlink.Rule {
	r := *netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Priority = prio
	r.Table = table
	if mask != 0 {
		r.Mark = mark
		r.Mask = &mask
	}
	r.Protocol = uint8(proto)
	return r
}

func (d *Dataplane) nodeRules() []netlink.Rule {
	p, t, m, proto := d.cfg.Priorities, d.cfg.Tables, d.cfg.Marks, d.cfg.RouteProtocol
	skip := newRule(p.Skip, -1, m.Skip, m.Skip, proto)
	skip.Goto = 32766 // the main table's rule
	rules := []netlink.Rule{
		newRule(p.ProxyReturn2, t.ProxyReturn2, m.ProxyReturn|m.Slot, m.ProxyReturn|m.Slot, proto),
		skip,
		newRule(p.Outbound, t.Outbound, m.Outbound, m.Outbound, proto),
		newRule(p.ProxyReturn, t.ProxyReturn, m.ProxyReturn, m.ProxyReturn, proto),
		newRule(p.Inbound, t.Inbound, 0, 0, proto),
	}
	if d.cfg.CaptureNodeLocal {
		rules = append([]netlink.Rule{newRule(0, unix.RT_TABLE_LOCAL, 0, m.Outbound|m.ProxyReturn, proto)}, rules...)
	}
	return rules
}

func ruleString(r netlink.Rule) string {
	s := fmt.Sprintf("%d:", r.Priority)
	if r.Src != nil {
		s += " from " + r.Src.String()
	}
	if r.Dst != nil {
		s += " to " + r.Dst.String()
	}
	if r.IifName != "" {
		s += " iif " + r.IifName
	}
	if r.OifName != "" {
		s += " oif " + r.OifName
	}
	if r.Mask != nil {
		s += fmt.Sprintf(" fwmark %#x/%#x", r.Mark, *r.Mask)
	} else if r.Mark != 0 {
		s += fmt.Sprintf(" fwmark %#x", r.Mark)
	}
	if r.Goto > 0 {
		s += fmt.Sprintf(" goto %d", r.Goto)
	} else if r.Table > 0 {
		s += fmt.Sprintf(" lookup %d", r.Table)
	}
	if r.Invert {
		s += " not"
	}
	return s
}

// isLocalRule reports the kernel's unconditional `from all lookup local`.
func isLocalRule(r netlink.Rule) bool {
	return r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL && r.Mark == 0 && (r.Mask == nil || *r.Mask == 0) &&
		r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && !r.Invert
}

func (d *Dataplane) checkRuleConflicts(nl kernel.Netlink, prios []int) error {
	rules, err := nl.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		if int(r.Protocol) != d.cfg.RouteProtocol && slices.Contains(prios, r.Priority) {
			return fmt.Errorf("ip rule priority %d is already used by another agent (%q, protocol %d): choose other priorities", r.Priority, ruleString(r), r.Protocol)
		}
	}
	return nil
}

func (d *Dataplane) syncRules(nl kernel.Netlink, want []netlink.Rule, swapLocal bool, w *writer) error {
	all, err := nl.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	var ours []netlink.Rule
	for _, r := range all {
		if int(r.Protocol) == d.cfg.RouteProtocol {
			ours = append(ours, r)
		}
	}
	haveKeys := map[string]bool{}
	for _, r := range ours {
		haveKeys[ruleString(r)] = true
	}
	wantKeys := map[string]bool{}
	for _, r := range want {
		wantKeys[ruleString(r)] = true
		if haveKeys[ruleString(r)] {
			continue
		}
		if err := w.do(KindRule, "add "+ruleString(r), func() error { return nl.RuleAdd(&r) }); err != nil {
			return err
		}
	}
	restored := false
	for _, r := range ours {
		if wantKeys[ruleString(r)] {
			continue
		}
		if r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL && !restored {
			restored = true
			// Ours replaced the kernel's local rule: put that back first,
			// so the node is never without one.
			if err := restoreLocalRule(nl, all, d.cfg.RouteProtocol, w); err != nil {
				return err
			}
		}
		if err := w.do(KindRule, "del "+ruleString(r), func() error { return ignoreNotExist(nl.RuleDel(&r)) }); err != nil {
			return err
		}
	}
	if !swapLocal {
		return nil
	}
	// Ours is in place now; remove the kernel's unconditional local rule.
	// The delete names the rule's protocol so it cannot match ours.
	for _, r := range all {
		if int(r.Protocol) == d.cfg.RouteProtocol || !isLocalRule(r) {
			continue
		}
		del := newRule(0, unix.RT_TABLE_LOCAL, 0, 0, int(r.Protocol))
		if r.Protocol == 0 {
			return fmt.Errorf("the unconditional local rule has no protocol; cannot delete it without risking ours")
		}
		if err := w.do(KindRule, "del "+ruleString(r)+" (replaced by ours)", func() error { return ignoreNotExist(nl.RuleDel(&del)) }); err != nil {
			return err
		}
	}
	return nil
}

// restoreLocalRule adds `0: from all lookup local` unless a rule that is not
// ours already does that.
func restoreLocalRule(nl kernel.Netlink, all []netlink.Rule, proto int, w *writer) error {
	if slices.ContainsFunc(all, func(r netlink.Rule) bool { return isLocalRule(r) && int(r.Protocol) != proto }) {
		return nil
	}
	local := newRule(0, unix.RT_TABLE_LOCAL, 0, 0, unix.RTPROT_KERNEL)
	return w.do(KindRule, "add 0: from all lookup local (restore)", func() error { return nl.RuleAdd(&local) })
}

// --- tunnels ---

func (d *Dataplane) tunnelEnds(zt *ztRuntime, node bool) (in, out tunnelEnd) {
	inNode, inZt := tunnelAddrs(d.cfg.InNet)
	outNode, outZt := tunnelAddrs(d.cfg.OutNet)
	mk := func(name string, vni uint32, self, peer netip.Addr, remote netip.Addr, mtu int) tunnelEnd {
		return tunnelEnd{Name: name, Type: d.tunnel, VNI: vni, Port: d.port, Remote: remote, MTU: mtu - encapOverhead,
			MAC: tunnelMAC(self), Addr: netip.PrefixFrom(self, 30), PeerAddr: peer, PeerMAC: tunnelMAC(peer)}
	}
	if node {
		mtu := zt.veth.Attrs().MTU
		return mk(NodeInLink, d.cfg.InVNI, inNode, inZt, zt.ip, mtu), mk(NodeOutLink, d.cfg.OutVNI, outNode, outZt, zt.ip, mtu)
	}
	mtu := zt.eth.Attrs().MTU
	return mk(ZtunnelInLink, d.cfg.InVNI, inZt, inNode, zt.hostIP, mtu), mk(ZtunnelOutLink, d.cfg.OutVNI, outZt, outNode, zt.hostIP, mtu)
}

// syncTunnel converges one tunnel device, its address, its static neighbour
// and (vxlan) its FDB entry. It returns the link (nil in a dry run when the
// link does not exist yet).
func syncTunnel(nl kernel.Netlink, t tunnelEnd, w *writer) (netlink.Link, error) {
	l, err := nl.LinkByName(t.Name)
	if err != nil && !isLinkNotFound(err) {
		return nil, fmt.Errorf("link %s: %w", t.Name, err)
	}
	if l != nil {
		info, ok := readTunnel(l)
		if !ok {
			return nil, fmt.Errorf("link %s exists and is a %s device, not a tunnel of ours: refusing to replace it", t.Name, l.Type())
		}
		if info.Type != t.Type || info.VNI != t.VNI || info.Port != t.Port || info.Learning {
			// Not something we can change in place: re-create.
			if err := w.do(KindLink, fmt.Sprintf("del %s (have %+v, want %s vni %d port %d)", t.Name, info, t.Type, t.VNI, t.Port), func() error { return nl.LinkDel(l) }); err != nil {
				return nil, err
			}
			l = nil
		} else if t.Type == TunnelGeneve && info.Remote != t.Remote {
			mod := t.modifyLink()
			if err := w.do(KindLink, fmt.Sprintf("set %s remote %s", t.Name, t.Remote), func() error { return nl.LinkModify(mod) }); err != nil {
				return nil, err
			}
		}
	}
	if l == nil {
		link := t.link()
		link.Attrs().Flags = net.FlagUp
		if err := w.do(KindLink, fmt.Sprintf("add %s %s vni %d port %d mtu %d", t.Name, t.Type, t.VNI, t.Port, t.MTU), func() error { return nl.LinkAdd(link) }); err != nil {
			return nil, err
		}
		if w.dry {
			return nil, nil
		}
		if l, err = nl.LinkByName(t.Name); err != nil {
			return nil, fmt.Errorf("link %s after add: %w", t.Name, err)
		}
	}
	a := l.Attrs()
	if a.MTU != t.MTU {
		if err := w.do(KindLink, fmt.Sprintf("set %s mtu %d", t.Name, t.MTU), func() error { return nl.LinkSetMTU(l, t.MTU) }); err != nil {
			return nil, err
		}
	}
	if a.Flags&net.FlagUp == 0 {
		if err := w.do(KindLink, "set "+t.Name+" up", func() error { return nl.LinkSetUp(l) }); err != nil {
			return nil, err
		}
	}
	if a.HardwareAddr.String() != t.MAC.String() {
		// A foreign MAC means the peer's static neighbour entry is wrong:
		// re-create rather than carry two truths.
		return nil, fmt.Errorf("link %s has MAC %s, want %s: delete it to let it be re-created", t.Name, a.HardwareAddr, t.MAC)
	}
	if err := syncAddr(nl, l, t.Addr, w); err != nil {
		return nil, err
	}
	neighs, err := nl.NeighList(a.Index, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list neighbours of %s: %w", t.Name, err)
	}
	if !hasNeigh(neighs, ipOf(t.PeerAddr), t.PeerMAC) {
		n := &netlink.Neigh{LinkIndex: a.Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: ipOf(t.PeerAddr), HardwareAddr: t.PeerMAC}
		if err := w.do(KindNeigh, fmt.Sprintf("set %s lladdr %s dev %s", t.PeerAddr, t.PeerMAC, t.Name), func() error { return nl.NeighSet(n) }); err != nil {
			return nil, err
		}
	}
	if t.Type == TunnelVXLAN {
		fdb, err := nl.NeighList(a.Index, unix.AF_BRIDGE)
		if err != nil {
			return nil, fmt.Errorf("list fdb of %s: %w", t.Name, err)
		}
		if !hasNeigh(fdb, ipOf(t.Remote), t.PeerMAC) {
			n := &netlink.Neigh{LinkIndex: a.Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: ipOf(t.Remote), HardwareAddr: t.PeerMAC}
			if err := w.do(KindNeigh, fmt.Sprintf("fdb %s dst %s dev %s", t.PeerMAC, t.Remote, t.Name), func() error { return nl.NeighSet(n) }); err != nil {
				return nil, err
			}
		}
	}
	return l, nil
}

func hasNeigh(ns []netlink.Neigh, ip net.IP, mac net.HardwareAddr) bool {
	for _, n := range ns {
		if n.IP.Equal(ip) && n.HardwareAddr.String() == mac.String() && n.State&netlink.NUD_PERMANENT != 0 {
			return true
		}
	}
	return false
}

func syncAddr(nl kernel.Netlink, l netlink.Link, want netip.Prefix, w *writer) error {
	addrs, err := nl.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	found := false
	for _, a := range addrs {
		if a.IPNet.String() == want.String() {
			found = true
			continue
		}
		if err := w.do(KindAddr, fmt.Sprintf("del %s dev %s", a.IPNet, l.Attrs().Name), func() error { return ignoreNotExist(nl.AddrDel(l, &a)) }); err != nil {
			return err
		}
	}
	if found {
		return nil
	}
	addr := &netlink.Addr{IPNet: ipNet(want)}
	return w.do(KindAddr, fmt.Sprintf("add %s dev %s", want, l.Attrs().Name), func() error { return nl.AddrReplace(l, addr) })
}

// --- sysctls ---

func syncSysctls(s kernel.Sysctl, want [][2]string, w *writer) error {
	for _, kv := range want {
		cur, err := s.Get(kv[0])
		if err == nil && cur == kv[1] {
			continue
		}
		if err := w.do(KindSysctl, kv[0]+"="+kv[1], func() error { return s.Set(kv[0], kv[1]) }); err != nil {
			return err
		}
	}
	return nil
}

func ifSysctls(dev string, acceptLocal bool) [][2]string {
	kv := [][2]string{{"net.ipv4.conf." + dev + ".rp_filter", "0"}}
	if acceptLocal {
		kv = append(kv, [2]string{"net.ipv4.conf." + dev + ".accept_local", "1"})
	}
	return kv
}

func (d *Dataplane) syncNodeSysctls(zt *ztRuntime, live []*ztRuntime, w *writer) error {
	want := [][2]string{{"net.ipv4.conf.all.rp_filter", "0"}, {"net.ipv4.conf.default.rp_filter", "0"}}
	for _, z := range live {
		want = append(want, ifSysctls(z.veth.Attrs().Name, true)...)
	}
	if zt != nil {
		if !w.dry {
			want = append(want, ifSysctls(NodeInLink, true)...)
			want = append(want, ifSysctls(NodeOutLink, true)...)
		}
	}
	return syncSysctls(d.node.Sysctl, want, w)
}

// --- iptables ---

func (d *Dataplane) syncIPTables(ctx context.Context, s *iptables.Syncer, rs iptables.Ruleset, w *writer) error {
	rendered := rs.Render()
	if !w.dry && !d.resync && d.applied[s] == rendered {
		return nil
	}
	if !w.dry {
		delete(d.applied, s)
	}
	if err := runIPTables(ctx, s, rs, w); err != nil {
		return err
	}
	if !w.dry {
		d.applied[s] = rendered
	}
	return nil
}

// runIPTables syncs s to rs (nil removes all our chains) and records the changes.
func runIPTables(ctx context.Context, s *iptables.Syncer, rs iptables.Ruleset, w *writer) error {
	res, err := s.Sync(ctx, rs, w.dry)
	for _, c := range res.Changes {
		w.res.Changes = append(w.res.Changes, fmt.Sprintf("%s: %s/%s %s", KindIPTables, c.Table, c.Chain, c.Reason))
	}
	w.res.Writes[KindIPTables] += res.Restores
	return err
}

func (d *Dataplane) nodeParams(zt *ztRuntime, live []*ztRuntime) NodeParams {
	closed := zt == nil && d.cfg.FailMode == FailClosed
	p := NodeParams{TunnelPort: d.port, Capture: zt != nil || closed, FailClosed: closed, DNS: d.cfg.DNSCapture, Active: zt != nil,
		ResetUncaptured: zt != nil && d.cfg.OnEnroll == OnEnrollReset}
	for _, z := range live {
		p.Ztunnels = append(p.Ztunnels, ZtunnelRef{IP: z.ip, Veth: z.veth.Attrs().Name, Slot: z.slot})
	}
	if zt != nil {
		p.HostIP = zt.hostIP
	}
	return p
}

// --- ztunnel netns ---

func (d *Dataplane) ztSyncer(path string, k *kernel.Kernel) (*iptables.Syncer, error) {
	if s, ok := d.ztIPT[path]; ok {
		return s, nil
	}
	r, err := k.IPT(d.backend)
	if err != nil {
		return nil, err
	}
	s := iptables.NewSyncer(r, ChainPrefix)
	d.ztIPT[path] = s
	return s, nil
}

func (d *Dataplane) syncZtunnelNS(ctx context.Context, zt *ztRuntime, w *writer) error {
	k := zt.k
	if err := d.checkRuleConflicts(k.NL, d.ztunnelPriorities()); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	in, out := d.tunnelEnds(zt, false)
	for _, t := range []tunnelEnd{in, out} {
		if _, err := syncTunnel(k.NL, t, w); err != nil {
			return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
		}
	}
	want := [][2]string{{"net.ipv4.conf.all.rp_filter", "0"}, {"net.ipv4.conf.default.rp_filter", "0"}}
	want = append(want, ifSysctls(zt.eth.Attrs().Name, false)...)
	if !w.dry {
		want = append(want, ifSysctls(ZtunnelInLink, true)...)
		want = append(want, ifSysctls(ZtunnelOutLink, true)...)
	}
	if err := syncSysctls(k.Sysctl, want, w); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	p, m, proto := d.cfg.Priorities, d.cfg.Marks, d.cfg.RouteProtocol
	rules := []netlink.Rule{
		newRule(p.ZtunnelTProxy, d.cfg.Tables.ZtunnelLocal, m.TProxy, m.ZtunnelMask, proto),
		newRule(p.ZtunnelOrigSrc, d.cfg.Tables.ZtunnelLocal, m.OrigSrc, m.ZtunnelMask, proto),
	}
	if err := d.syncRules(k.NL, rules, false, w); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	lo, err := k.NL.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("ztunnel netns %s: lo: %w", zt.spec.NetNS, err)
	}
	local := netlink.Route{Table: d.cfg.Tables.ZtunnelLocal, Dst: ipNet(netip.MustParsePrefix("0.0.0.0/0")), LinkIndex: lo.Attrs().Index,
		Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST, Protocol: netlink.RouteProtocol(proto)}
	if err := syncRoutes(k.NL, proto, []netlink.Route{local}, w); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	s, err := d.ztSyncer(zt.spec.NetNS, k)
	if err != nil {
		return err
	}
	rs := ZtunnelRuleset(d.cfg, ZtunnelParams{ZtunnelIP: zt.ip, Eth: zt.eth.Attrs().Name})
	if err := d.syncIPTables(ctx, s, rs, w); err != nil {
		return fmt.Errorf("ztunnel netns %s: %w", zt.spec.NetNS, err)
	}
	return nil
}

// cleanupZtunnelNS removes everything we own from a ztunnel netns.
func (d *Dataplane) cleanupZtunnelNS(ctx context.Context, path string, w *writer) error {
	if s, ok := d.ztIPT[path]; ok && !w.dry {
		delete(d.applied, s)
		delete(d.ztIPT, path)
	}
	k, err := d.openNS(path)
	if err != nil {
		return err
	}
	defer k.Close()
	return d.cleanupNS(ctx, k, []string{ZtunnelInLink, ZtunnelOutLink}, w)
}

// cleanupNS removes our chains (both backends), rules, routes and tunnel
// links from one netns.
func (d *Dataplane) cleanupNS(ctx context.Context, k *kernel.Kernel, links []string, w *writer) error {
	var errs []error
	for _, b := range []string{d.backend, otherBackend(d.backend)} {
		r, err := k.IPT(b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		// The other backend's tools may be absent; anything else is an error.
		if err := runIPTables(ctx, iptables.NewSyncer(r, ChainPrefix), nil, w); err != nil && (b == d.backend || !errors.Is(err, exec.ErrNotFound)) {
			errs = append(errs, err)
		}
	}
	// syncRules puts the kernel's local rule back before removing ours.
	if err := d.syncRules(k.NL, nil, false, w); err != nil {
		errs = append(errs, err)
	}
	if err := syncRoutes(k.NL, d.cfg.RouteProtocol, nil, w); err != nil {
		errs = append(errs, err)
	}
	for _, name := range links {
		l, err := k.NL.LinkByName(name)
		if err != nil {
			if !isLinkNotFound(err) {
				errs = append(errs, fmt.Errorf("link %s: %w", name, err))
			}
			continue
		}
		if _, ok := readTunnel(l); !ok {
			continue // same name, not our kind of device: not ours
		}
		errs = append(errs, w.do(KindLink, "del "+name, func() error { return ignoreNotExist(k.NL.LinkDel(l)) }))
	}
	return errors.Join(errs...)
}

func otherBackend(b string) string {
	if b == iptables.NFT {
		return iptables.Legacy
	}
	return iptables.NFT
}

// Cleanup removes everything we own on the node and in every ztunnel netns
// under the netns directory. Not-found is success.
func (d *Dataplane) Cleanup(ctx context.Context) (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	start := time.Now()
	w := newWriter(false)
	// Node first, in the make-before-break order (transition.go): inbound
	// capture goes before the marks that keep a pod's replies out of it,
	// the marks before the routes and tunnels they lead to.
	var errs []error
	if routes, err := ourRoutesByKey(d.node.NL, d.cfg.RouteProtocol); err != nil {
		errs = append(errs, err)
	} else {
		errs = append(errs, pruneRoutes(d.node.NL, routes, nil, d.isInbound, w))
	}
	errs = append(errs, d.cleanupNS(ctx, d.node, []string{NodeInLink, NodeOutLink}, w))
	for _, f := range []Family{IPv4, IPv6} {
		name := d.setName(f)
		_, exists, err := d.ipsetMembers(d.node.NL, f)
		if err != nil {
			errs = append(errs, err) // a foreign set under our name is left alone
			continue
		}
		if exists {
			errs = append(errs, w.do(KindIPSet, "destroy "+name, func() error { return ignoreNotExist(d.node.NL.IpsetDestroy(name)) }))
		}
	}
	for _, path := range d.ztunnelNamespaces() {
		if err := d.cleanupZtunnelNS(ctx, path, w); err != nil {
			errs = append(errs, fmt.Errorf("ztunnel netns %s: %w", path, err))
		}
	}
	d.lastZtNS, d.liveNS = "", nil
	d.last = nil
	d.fast = nil
	d.resync = true
	clear(d.applied)
	w.res.Elapsed = time.Since(start)
	err := errors.Join(errs...)
	d.log.Info("dataplane cleanup", zap.Any("writes", w.res.Writes), zap.Duration("elapsed", w.res.Elapsed), zap.Error(err))
	return *w.res, err
}

// ztunnelNamespaces lists the namespaces under NetNSDir that are pods of
// this node (a veth here has its peer there) and hold one of our
// ztunnel-side links, plus the last one applied. Pods of other nodes sharing
// the directory (several nodes on one host) are never touched.
func (d *Dataplane) ztunnelNamespaces() []string {
	set := map[string]bool{}
	for _, p := range append([]string{d.lastZtNS}, d.liveNS...) {
		if p != "" {
			set[p] = true
		}
	}
	peers := map[int]bool{}
	if links, err := d.node.NL.LinkList(); err == nil {
		for _, l := range links {
			if l.Type() == "veth" && l.Attrs().NetNsID >= 0 {
				peers[l.Attrs().NetNsID] = true
			}
		}
	}
	for _, p := range kernel.ListNetNSDir(d.cfg.NetNSDir) {
		if id := kernel.NsID(d.node.NL, p); id < 0 || !peers[id] {
			continue
		}
		k, err := d.openNS(p)
		if err != nil {
			continue
		}
		for _, n := range []string{ZtunnelInLink, ZtunnelOutLink} {
			if l, err := k.NL.LinkByName(n); err == nil {
				if _, ok := readTunnel(l); ok {
					set[p] = true
				}
			}
		}
		k.Close()
	}
	out := slices.Collect(maps.Keys(set))
	sort.Strings(out)
	return out
}
