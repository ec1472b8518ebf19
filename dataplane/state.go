package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Family is an IP family. Every object is kept per family; IPv6 is modelled
// but not programmed yet.
type Family int

// IP families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string { return fmt.Sprintf("ipv%d", int(f)) }

// FamilyOf returns the family of an address.
func FamilyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// State is the desired state of one node: plain, comparable data computed by
// the controller.
type State struct {
	// Ztunnel is the active node proxy; nil means none (the fail mode applies).
	Ztunnel *Ztunnel
	// Draining are other ztunnels of this node that still run (a surge
	// rollout's old one, Ready or terminating), newest first. One that
	// holds connections (a slot, read back from the kernel) keeps them
	// while it is listed; new connections go to Ztunnel only.
	Draining []*Ztunnel
	// Pods are the enrolled (ambient) pods on this node.
	Pods []Pod
	// Sidecars are the pods with an Istio sidecar whose capture rules we
	// write in their own netns; never among Pods.
	Sidecars []Sidecar
	// ServiceCIDRs are the cluster's Service IP ranges (ServiceCIDR objects
	// or --service-cidr). The nftables backend keeps ambient pods'
	// captured connections to them out of conntrack, so that no kube-proxy
	// mode rewrites or rejects a VIP before ztunnel sees it.
	ServiceCIDRs []netip.Prefix
}

// Ztunnel identifies the node proxy's pod.
type Ztunnel struct {
	// Pod is namespace/name, for logs and the debug endpoint.
	Pod string
	// IPs are the ztunnel pod's addresses (one per family).
	IPs []netip.Addr
	// HostVeth is the node-side veth of the ztunnel pod.
	HostVeth string
	// NetNS is the path of the ztunnel pod's network namespace.
	NetNS string
}

// IP returns the ztunnel address of family f.
func (z *Ztunnel) IP(f Family) (netip.Addr, bool) {
	for _, a := range z.IPs {
		if FamilyOf(a) == f {
			return a.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// hasFamily reports whether z has an address of family f.
func (z *Ztunnel) hasFamily(f Family) bool {
	_, ok := z.IP(f)
	return ok
}

// Pod is one enrolled pod.
type Pod struct {
	UID string
	// Name is namespace/name, for logs.
	Name string
	IPs  []netip.Addr
}

// members returns the desired ipset members of family f: IP -> pod UID.
func (s State) members(f Family) (map[netip.Addr]string, error) {
	out := map[netip.Addr]string{}
	for _, p := range s.Pods {
		for _, a := range p.IPs {
			a = a.Unmap()
			if FamilyOf(a) != f {
				continue
			}
			if err := Claim(a, p.UID, out[a]); err != nil {
				return nil, err
			}
			out[a] = p.UID
		}
	}
	return out, nil
}

// ErrInvalidState is a desired state the dataplane refuses before writing
// anything: an invalid pod or ztunnel, or an address two pods claim.
var ErrInvalidState = errors.New("invalid desired state")

// Claim is the one double-claim rule of every path that programs pods
// (the controller's dedupe, Apply's validation, UpdatePods): an address
// belongs to one pod (UID); holder is who holds it already ("" for
// nobody).
func Claim(a netip.Addr, uid, holder string) error {
	if holder != "" && holder != uid {
		return fmt.Errorf("%w: pod IP %s claimed by two pods (%s and %s)", ErrInvalidState, a, holder, uid)
	}
	return nil
}

// problems lists what makes p unprogrammable, on every path that
// programs pods (Apply's Validate and UpdatePods alike).
func (p Pod) problems() []string {
	var out []string
	if p.UID == "" {
		out = append(out, fmt.Sprintf("pod %s: empty UID", p.Name))
	}
	for _, a := range p.IPs {
		a = a.Unmap() // ::ffff:0.0.0.0 must be judged as 0.0.0.0
		if !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
			out = append(out, fmt.Sprintf("pod %s: invalid IP %v", p.Name, a))
		}
	}
	return out
}

// Validate checks the state before anything is written.
func (s State) Validate() error {
	var problems []string
	for _, z := range append([]*Ztunnel{s.Ztunnel}, s.Draining...) {
		if z == nil {
			continue
		}
		if z.HostVeth == "" || z.NetNS == "" {
			problems = append(problems, fmt.Sprintf("ztunnel %s: host veth and netns are required", z.Pod))
		}
		if len(z.IPs) == 0 {
			problems = append(problems, fmt.Sprintf("ztunnel %s: an address is required", z.Pod))
		}
	}
	for _, p := range s.Pods {
		problems = append(problems, p.problems()...)
	}
	ambient := map[string]bool{}
	for _, p := range s.Pods {
		ambient[p.UID] = true
	}
	for _, sc := range s.Sidecars {
		if ambient[sc.UID] {
			problems = append(problems, fmt.Sprintf("pod %s: both ambient and a sidecar pod", sc.Name))
		}
	}
	if _, err := s.members(IPv4); err != nil {
		problems = append(problems, err.Error())
	}
	if _, err := s.members(IPv6); err != nil {
		problems = append(problems, err.Error())
	}
	if len(problems) > 0 {
		slices.Sort(problems)
		return fmt.Errorf("%w: %s", ErrInvalidState, strings.Join(problems, "; "))
	}
	return nil
}

// serviceCIDRs are the Service ranges of family f.
func (s State) serviceCIDRs(f Family) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s.ServiceCIDRs {
		if FamilyOf(p.Addr()) == f {
			out = append(out, p.Masked())
		}
	}
	return out
}
