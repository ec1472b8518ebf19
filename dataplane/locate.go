package dataplane

import (
	"fmt"
	"net"
	"os"

	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// LocateZtunnel finds the host veth of the pod with address ip (the device
// of the node's route to it, as ptp CNIs install) and the path of the
// network namespace at its other end.
func (d *Dataplane) LocateZtunnel(ip net.IP) (veth, netnsPath string, err error) {
	// Scanning the netns directory costs a syscall per pod of the node:
	// reuse the last answer while that veth still leads to the same netns.
	d.locMu.Lock()
	c := d.located
	d.locMu.Unlock()
	if c != nil && c.ip.Equal(ip) {
		if l, err := d.node.NL.LinkByName(c.veth); err == nil && l.Attrs().Index == c.index && l.Attrs().NetNsID == c.nsid {
			if _, err := os.Stat(c.path); err == nil {
				return c.veth, c.path, nil
			}
		}
	}
	c, err = d.locateZtunnel(ip)
	if c == nil {
		return "", "", err
	}
	if err != nil {
		return c.veth, "", err
	}
	d.locMu.Lock()
	d.located = c
	d.locMu.Unlock()
	return c.veth, c.path, nil
}

// located is the last ztunnel LocateZtunnel found.
type located struct {
	ip          net.IP
	veth, path  string
	index, nsid int
}

// locateZtunnel does the lookup; on a netns miss it still names the veth.
func (d *Dataplane) locateZtunnel(ip net.IP) (*located, error) {
	routes, err := d.node.NL.RouteGet(ip)
	if err != nil || len(routes) == 0 {
		return nil, fmt.Errorf("no route to ztunnel %s: %v", ip, err)
	}
	link, err := d.node.NL.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil, fmt.Errorf("device of the route to ztunnel %s: %w", ip, err)
	}
	a := link.Attrs()
	if link.Type() != "veth" {
		return nil, fmt.Errorf("route to ztunnel %s leaves through %s (%s), not a pod veth: is the CNI ptp-like?", ip, a.Name, link.Type())
	}
	c := &located{ip: ip, veth: a.Name, index: a.Index, nsid: a.NetNsID}
	c.path, err = kernel.PeerNetNS(d.node.NL, link, d.cfg.NetNSDir)
	return c, err
}
