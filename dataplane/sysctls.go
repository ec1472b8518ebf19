package dataplane

// The sysctls the tunnels and the ztunnel veth need.

import (
	"context"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// sysctlManager owns the sysctls we set in one netns. We never unset one
// (their previous values are unknown after a restart), so nothing is ever
// pending deletion; the read-back covers the keys we want.
type sysctlManager struct {
	resyncFlag
	s kernel.Sysctl
	t *deltaTracker[string, string]
}

func newSysctlManager(s kernel.Sysctl) *sysctlManager {
	return &sysctlManager{resyncFlag: resyncFlag{true}, s: s, t: newDeltaTracker(func(a, b string) bool { return a == b }, strings.Compare)}
}

func (m *sysctlManager) kind() string { return KindSysctl }

func (m *sysctlManager) clone() *sysctlManager {
	c := *m
	c.t = m.t.clone()
	return &c
}

// setDesired makes kv the wanted values. Between read-backs it reads the
// current value of every key not known yet (a new device's).
func (m *sysctlManager) setDesired(kv [][2]string) {
	want := make(map[string]string, len(kv))
	for _, p := range kv {
		want[p[0]] = p[1]
		if _, known := m.t.Actual(p[0]); !known && !m.queued {
			if cur, err := m.s.Get(p[0]); err == nil {
				m.t.Written(p[0], cur)
			}
		}
	}
	m.t.ReplaceDesired(want)
}

// readBack reads the current value of every key we want or set.
func (m *sysctlManager) readBack(context.Context) error {
	have := map[string]string{}
	for k := range m.t.desired {
		if cur, err := m.s.Get(k); err == nil {
			have[k] = cur
		}
	}
	m.queued = false
	m.t.ReplaceActual(have)
	return nil
}

func (m *sysctlManager) pending() []string {
	var out []string
	for _, k := range m.t.PendingUpdates() {
		v, _ := m.t.Desired(k)
		out = append(out, k+"="+v)
	}
	return out
}

func (m *sysctlManager) applyUpdates(_ context.Context, w *writer) error {
	for _, k := range m.t.PendingUpdates() {
		v, _ := m.t.Desired(k)
		if err := w.do(KindSysctl, k+"="+v, func() error { return m.s.Set(k, v) }); err != nil {
			return err
		}
		m.t.Written(k, v)
	}
	return nil
}

// applyDeletes does nothing: a sysctl is never unset.
func (m *sysctlManager) applyDeletes(context.Context, *writer) error { return nil }

// syncSysctls sets want in a netns at once.
func syncSysctls(s kernel.Sysctl, want [][2]string, w *writer) error {
	m := newSysctlManager(s)
	m.setDesired(want)
	return convergeNow(context.Background(), m, w)
}

func ifSysctls(dev string, acceptLocal bool) [][2]string {
	kv := [][2]string{{"net.ipv4.conf." + dev + ".rp_filter", "0"}}
	if acceptLocal {
		kv = append(kv, [2]string{"net.ipv4.conf." + dev + ".accept_local", "1"})
	}
	return kv
}

// nodeSysctls are the node's sysctls for the ztunnels holding slots and
// the tunnels towards the active one.
func (d *Dataplane) nodeSysctls(zt *ztRuntime, live []*ztRuntime) [][2]string {
	want := [][2]string{{"net.ipv4.conf.all.rp_filter", "0"}, {"net.ipv4.conf.default.rp_filter", "0"}}
	for _, z := range live {
		want = append(want, ifSysctls(z.veth.Attrs().Name, true)...)
	}
	if zt != nil {
		want = append(want, ifSysctls(NodeInLink, true)...)
		want = append(want, ifSysctls(NodeOutLink, true)...)
	}
	return want
}

// forgetDevice drops what is known of a device's keys: it was (re)created,
// with the kernel's defaults.
func (m *sysctlManager) forgetDevice(dev string) {
	for k := range m.t.actual {
		if strings.Contains(k, ".conf."+dev+".") {
			m.t.Removed(k)
		}
	}
}
