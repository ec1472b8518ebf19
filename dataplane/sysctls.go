package dataplane

// The sysctls the tunnels and the ztunnel veth need.

import "github.com/ambient-redirect/ambient-redirect/dataplane/kernel"

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
