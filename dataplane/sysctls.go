package dataplane

// The sysctls the tunnels and the ztunnel veth need.

import (
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// sysctlManager owns the sysctls we set in one netns. We never unset one
// (their previous values are unknown after a restart), so nothing is ever
// pending deletion; the read-back covers the desired keys only.
type sysctlManager struct {
	s kernel.Sysctl
	t *deltaTracker[string, string]
}

func newSysctlManager(s kernel.Sysctl) *sysctlManager {
	return &sysctlManager{s: s, t: newDeltaTracker(func(a, b string) bool { return a == b }, strings.Compare)}
}

// want makes kv desired and reads their current values back.
func (m *sysctlManager) want(kv [][2]string) {
	have := map[string]string{}
	want := map[string]string{}
	for _, p := range kv {
		want[p[0]] = p[1]
		if cur, err := m.s.Get(p[0]); err == nil {
			have[p[0]] = cur
		}
	}
	m.t.ReplaceActual(have)
	m.t.ReplaceDesired(want)
}

func (m *sysctlManager) apply(w *writer) error {
	for _, k := range m.t.PendingUpdates() {
		v, _ := m.t.Desired(k)
		if err := w.do(KindSysctl, k+"="+v, func() error { return m.s.Set(k, v) }); err != nil {
			return err
		}
		m.t.Written(k, v)
	}
	return nil
}

func syncSysctls(s kernel.Sysctl, want [][2]string, w *writer) error {
	m := newSysctlManager(s)
	m.want(want)
	return m.apply(w)
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
