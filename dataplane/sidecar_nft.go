package dataplane

// Converging sidecar pods' netns: one manager per pod, kept across applies.
// A pod's failure is its own (recorded, shown, retried at the resync): it
// never fails the node's apply.

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

// sidecarManager owns one sidecar pod's table and, in TPROXY mode, the ip
// rule and local route its mark needs, in the pod's netns.
type sidecarManager struct {
	resyncFlag
	d   *Dataplane
	pod Sidecar
	// path is the pod's netns, ino its inode there (a reused path is
	// another netns: start over).
	path string
	ino  uint64
	want nft.Table
	// actual is the table as read back or last written.
	actual nft.Actual
	// err is the last convergence's failure (nil: in place).
	err error
}

func (d *Dataplane) newSidecarManager(s Sidecar) *sidecarManager {
	return &sidecarManager{resyncFlag: resyncFlag{true}, d: d, pod: s, want: SidecarRules(s)}
}

func (m *sidecarManager) kind() string { return "sidecar " + m.pod.Name }

// resolve finds the pod's netns: the CNI ADD's path, else through the host
// veth of its first address.
func (m *sidecarManager) resolve() error {
	path := m.pod.NetNS
	if path == "" && m.path != "" && sameInode(m.path, m.ino) {
		return nil // still the netns it was: no scan of the netns directory
	}
	if path == "" {
		_, p, err := m.d.LocateZtunnel(net.IP(m.pod.IPs[0].AsSlice()))
		if err != nil {
			return fmt.Errorf("netns of sidecar pod %s: %w", m.pod.Name, err)
		}
		path = p
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("netns of sidecar pod %s: %w", m.pod.Name, err)
	}
	ino := st.Sys().(*syscall.Stat_t).Ino
	if path != m.path || ino != m.ino {
		m.path, m.ino, m.queued = path, ino, true
	}
	return nil
}

func (m *sidecarManager) readBack(context.Context) error {
	c, done, err := nft.Open(m.path)
	if err != nil {
		return err
	}
	defer done()
	if m.actual, err = nft.ReadBack(c, SidecarTable); err != nil {
		return err
	}
	m.queued = false
	return nil
}

func (m *sidecarManager) pending() []string { return nft.Diff(m.actual, m.want) }

// applyUpdates replaces the table when it differs (one transaction), then
// converges the TPROXY mark's rule and route.
func (m *sidecarManager) applyUpdates(_ context.Context, w *writer) error {
	if diff := m.pending(); len(diff) > 0 {
		c, done, err := nft.Open(m.path)
		if err != nil {
			return err
		}
		defer done()
		err = w.do(KindNFT, fmt.Sprintf("%s in %s: %s", SidecarTable, m.pod.Name, strings.Join(diff, ", ")), func() error {
			return nft.Replace(c, m.want, m.actual.Exists)
		})
		if err != nil {
			return err
		}
		if !w.dry {
			m.actual = m.want.Written()
		}
	}
	return m.syncRouting(w, true)
}

func sameInode(path string, ino uint64) bool {
	st, err := os.Stat(path)
	return err == nil && st.Sys().(*syscall.Stat_t).Ino == ino
}

// syncRouting makes the pod's rules and routes of ours what TPROXY mode
// needs (none otherwise), and puts the proxy's IPv6 inbound source (::6)
// on lo when the pod's IPv6 is captured, as Istio does; without keep, it
// takes all of that out.
func (m *sidecarManager) syncRouting(w *writer, keep bool) error {
	k, err := m.d.openNS(m.path)
	if err != nil {
		return err
	}
	defer k.Close()
	if err := m.syncPassthrough(k.NL, keep && slices.Contains(m.pod.families(), IPv6), w); err != nil {
		return err
	}
	tproxy := keep && m.pod.Capture.Mode == SidecarTProxy
	proto := m.d.cfg.RouteProtocol
	var routes []route
	for _, f := range []Family{IPv4, IPv6} {
		var rules []netlink.Rule
		if tproxy && slices.Contains(m.pod.families(), f) {
			mark := uint32(SidecarTProxyMark)
			rules = append(rules, newRule(f, m.d.cfg.Priorities.ZtunnelTProxy, SidecarTProxyTable, mark, 0xffffffff, proto))
			routes = append(routes, route{Route: netlink.Route{Table: SidecarTProxyTable, Dst: ipNet(defaultPrefix(f)), Type: unix.RTN_LOCAL,
				Scope: routeScope(f, netlink.SCOPE_HOST), Protocol: netlink.RouteProtocol(proto)}, Dev: "lo"})
		}
		if err := m.d.syncRules(k.NL, f, rules, w); err != nil {
			return err
		}
	}
	return syncRoutes(k.NL, proto, routes, w)
}

// syncPassthrough puts ::6/128 on the pod's lo (want) or takes it off.
func (m *sidecarManager) syncPassthrough(nl kernel.Netlink, want bool, w *writer) error {
	lo, err := nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("lo of sidecar pod %s: %w", m.pod.Name, err)
	}
	addrs, err := nl.AddrList(lo, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("addresses of lo of sidecar pod %s: %w", m.pod.Name, err)
	}
	p := nft.Host(passthrough(IPv6))
	has := slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IPNet.String() == p.String() })
	addr := &netlink.Addr{IPNet: ipNet(p), Flags: unix.IFA_F_NODAD}
	switch {
	case want && !has:
		return w.do(KindAddr, fmt.Sprintf("add %s dev lo in %s", p, m.pod.Name), func() error { return nl.AddrReplace(lo, addr) })
	case !want && has:
		return w.do(KindAddr, fmt.Sprintf("del %s dev lo in %s", p, m.pod.Name), func() error { return ignoreNotExist(nl.AddrDel(lo, addr)) })
	}
	return nil
}

// applyDeletes does nothing: the table is replaced whole.
func (m *sidecarManager) applyDeletes(context.Context, *writer) error { return nil }

// remove takes our table, rule and route out of the pod's netns, if it is
// still there.
func (m *sidecarManager) remove(w *writer) error {
	if m.path == "" {
		return nil
	}
	if _, err := os.Stat(m.path); err != nil {
		return nil // the pod's netns is gone, and all of ours with it
	}
	c, done, err := nft.Open(m.path)
	if err != nil {
		return err
	}
	defer done()
	if err := w.do(KindNFT, "delete "+SidecarTable+" in "+m.pod.Name, func() error { return nft.Delete(c, SidecarTable) }); err != nil {
		return err
	}
	return m.syncRouting(w, false)
}

// syncSidecars converges every desired sidecar pod: a new or changed one,
// and with verify (a resync) every one, is read back and repaired; the
// others cost nothing.
func (d *Dataplane) syncSidecars(ctx context.Context, want []Sidecar, verify bool, w *writer) {
	seen := map[string]bool{}
	for _, s := range want {
		seen[s.UID] = true
		m := d.mgr.sidecars[s.UID]
		if m == nil || !sameSidecar(m.pod, s) {
			nm := d.newSidecarManager(s)
			if m != nil {
				nm.path, nm.ino = m.path, m.ino
			}
			m = nm
			d.mgr.sidecars[s.UID] = m
		}
		if verify || w.dry {
			m.queueResync()
		}
		if !m.queued && m.err == nil {
			continue // in place since it was last read back or written: a pod event costs nothing here
		}
		m.err = d.convergeSidecar(ctx, m, w)
		if m.err != nil {
			m.queueResync()
			d.log.Info("sidecar pod not programmed; retried at the resync", zap.String("pod", s.Name), zap.Error(m.err))
		}
	}
	// A pod that leaves is forgotten, its rules left in its netns: a
	// terminating pod's proxy still drains through them, and they go with
	// the netns. Only cleanup --remove-sidecar-rules takes them out.
	for uid := range d.mgr.sidecars {
		if !seen[uid] && !w.dry {
			delete(d.mgr.sidecars, uid)
		}
	}
}

func (d *Dataplane) convergeSidecar(ctx context.Context, m *sidecarManager, w *writer) error {
	if p := m.pod.problems(); len(p) > 0 {
		return fmt.Errorf("%w: %s", ErrInvalidState, strings.Join(p, "; "))
	}
	if err := m.resolve(); err != nil {
		return err
	}
	return convergeNow(ctx, m, w)
}

// SidecarState is one sidecar pod as the dataplane knows it.
type SidecarState struct {
	Name    string         `json:"name"`
	UID     string         `json:"uid"`
	NetNS   string         `json:"netns"`
	Capture SidecarCapture `json:"capture"`
	InPlace bool           `json:"inPlace"`
	Error   string         `json:"error,omitempty"`
}

// Sidecars lists the sidecar pods whose rules we own, sorted by name.
func (d *Dataplane) Sidecars() []SidecarState {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]SidecarState, 0, len(d.mgr.sidecars))
	for _, m := range d.mgr.sidecars {
		s := SidecarState{Name: m.pod.Name, UID: m.pod.UID, NetNS: m.path, Capture: m.pod.Capture, InPlace: m.err == nil && !m.queued}
		if m.err != nil {
			s.Error = m.err.Error()
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b SidecarState) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// SidecarProgrammed reports whether sidecar pod uid's rules are in place,
// and the failure that keeps them from it.
func (d *Dataplane) SidecarProgrammed(uid string) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.mgr.sidecars[uid]
	switch {
	case m == nil:
		return false, nil
	case m.err != nil:
		return false, m.err
	}
	return !m.queued, nil
}

// CleanupSidecars takes our table, rule and route out of every sidecar
// pod's netns of this node (remove), or only counts them: removing them
// takes running pods out of their mesh, so cleanup leaves them by default.
func (d *Dataplane) CleanupSidecars(ctx context.Context, remove bool) (pods int, res Result, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := newWriter(!remove)
	var errs []string
	for _, path := range d.nodePodNetNS() {
		c, done, err := nft.Open(path)
		if err != nil {
			continue // gone meanwhile
		}
		a, err := nft.ReadBack(c, SidecarTable)
		done()
		if err != nil || !a.Exists {
			continue
		}
		pods++
		m := &sidecarManager{d: d, pod: Sidecar{Name: path}, path: path}
		if err := m.remove(w); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if remove {
		clear(d.mgr.sidecars)
	}
	if len(errs) > 0 {
		err = fmt.Errorf("sidecar pods' rules: %s", strings.Join(errs, "; "))
	}
	return pods, *w.res, err
}

// ProgramSidecar converges one sidecar pod's netns at path to s, outside
// any agent: what the agent does for the pod at CNI ADD, for tools and
// tests that compare it with other rules engines.
func ProgramSidecar(ctx context.Context, cfg Config, path string, s Sidecar) (Result, error) {
	d := &Dataplane{cfg: cfg, log: zap.NewNop(), openNS: kernel.Open}
	m := d.newSidecarManager(s)
	m.pod.NetNS = path
	w := newWriter(false)
	err := d.convergeSidecar(ctx, m, w)
	return *w.res, err
}
