package dataplane

// The sysctls the tunnels and the ztunnel veth need.

import (
	"slices"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

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

func (d *Dataplane) syncNodeSysctls(want [][2]string, w *writer) error {
	if w.dry {
		// The tunnels' sysctls cannot be read before the devices exist.
		want = slices.DeleteFunc(slices.Clone(want), func(kv [2]string) bool {
			return strings.Contains(kv[0], "."+NodeInLink+".") || strings.Contains(kv[0], "."+NodeOutLink+".")
		})
	}
	return syncSysctls(d.node.Sysctl, want, w)
}
