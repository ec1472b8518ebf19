package dataplane

// Sidecar pods: an Istio sidecar (Envoy as uid/gid 1337 on 15001/15006)
// whose capture rules we write in the pod's own netns, as Istio's
// istio-init or its CNI plugin would, from the pod's annotations. The
// desired state of one is data (Sidecar); sidecar_rules.go renders it,
// sidecar_nft.go converges the pod's table through netlink.

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
)

// Interception modes of a sidecar pod (sidecar.istio.io/interceptionMode).
const (
	SidecarRedirect = "REDIRECT"
	SidecarTProxy   = "TPROXY"
)

// Istio's listener ports and marks a sidecar's rules point at.
const (
	SidecarOutboundPort = 15001
	SidecarInboundPort  = 15006
	SidecarDNSPort      = 15053
	// SidecarTProxyMark (1337) marks TPROXY-mode packets for local
	// delivery through SidecarTProxyTable.
	SidecarTProxyMark  = 0x539
	SidecarTProxyTable = 133
)

// SidecarAlwaysExcludedInbound are the inbound ports no sidecar captures:
// the proxy's own HBONE (REDIRECT mode only), status, health and metrics
// ports.
var SidecarAlwaysExcludedInbound = []uint16{15008, 15090, 15021, 15020}

// Sidecar is a sidecar pod whose capture rules we own.
type Sidecar struct {
	UID string
	// Name is namespace/name, for logs and errors.
	Name string
	IPs  []netip.Addr
	// NetNS is the pod's netns path when the CNI ADD gave it; "" locates it
	// through the host veth of the pod's first address.
	NetNS   string
	Capture SidecarCapture
}

// SidecarCapture are a sidecar pod's effective interception settings:
// the pod's annotations and its proxy container's uid/gid and environment,
// with Istio's defaults where they are absent.
type SidecarCapture struct {
	Mode     string `json:"mode"`
	ProxyUID uint32 `json:"proxyUID"`
	ProxyGID uint32 `json:"proxyGID"`
	// InboundPorts nil captures every inbound port but the excluded ones
	// (includeInboundPorts "*"); empty captures none.
	InboundPorts         []uint16       `json:"includeInboundPorts"`
	ExcludeInboundPorts  []uint16       `json:"excludeInboundPorts,omitempty"`
	OutboundCIDRs        []netip.Prefix `json:"includeOutboundIPRanges"` // nil: "*"
	ExcludeOutboundCIDRs []netip.Prefix `json:"excludeOutboundIPRanges,omitempty"`
	IncludeOutboundPorts []uint16       `json:"includeOutboundPorts,omitempty"`
	ExcludeOutboundPorts []uint16       `json:"excludeOutboundPorts,omitempty"`
	ExcludeInterfaces    []string       `json:"excludeInterfaces,omitempty"`
	RerouteInterfaces    []string       `json:"rerouteInterfaces,omitempty"`
	DNS                  bool           `json:"dnsCapture"`
	DualStack            bool           `json:"dualStack"`
	InvalidDrop          bool           `json:"invalidDrop"`
}

var ifaceName = regexp.MustCompile(`^[^\s/:]{1,15}$`)

// problems lists what makes s unprogrammable.
func (s Sidecar) problems() []string {
	var out []string
	bad := func(format string, a ...any) {
		out = append(out, fmt.Sprintf("sidecar pod %s: ", s.Name)+fmt.Sprintf(format, a...))
	}
	if s.UID == "" {
		bad("empty UID")
	}
	if len(s.IPs) == 0 {
		bad("no address")
	}
	c := s.Capture
	if c.Mode != SidecarRedirect && c.Mode != SidecarTProxy {
		bad("interception mode %q is not %s or %s", c.Mode, SidecarRedirect, SidecarTProxy)
	}
	for _, p := range slices.Concat(c.InboundPorts, c.ExcludeInboundPorts, c.IncludeOutboundPorts, c.ExcludeOutboundPorts) {
		if p == 0 {
			bad("port 0")
		}
	}
	for _, p := range slices.Concat(c.OutboundCIDRs, c.ExcludeOutboundCIDRs) {
		if !p.IsValid() || p.Masked() != p {
			bad("address range %v is not a network address", p)
		}
	}
	for _, i := range slices.Concat(c.ExcludeInterfaces, c.RerouteInterfaces) {
		if !ifaceName.MatchString(i) {
			bad("interface name %q", i)
		}
	}
	return out
}

// families are the families the pod's rules capture: IPv4, and IPv6 when
// the pod has an IPv6 address and dual stack is asked for.
func (s Sidecar) families() []Family {
	fams := []Family{IPv4}
	if s.Capture.DualStack && slices.ContainsFunc(s.IPs, func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() }) {
		fams = append(fams, IPv6)
	}
	return fams
}

// sameSidecar reports two sidecar pods whose rules are the same. The
// netns path is a hint (CNI's, until the hand-over is forgotten): the
// manager keeps the netns it found.
func sameSidecar(a, b Sidecar) bool {
	return a.UID == b.UID && slices.Equal(a.IPs, b.IPs) && a.Capture.render() == b.Capture.render()
}

// render is a stable text form of the settings (equality, logs).
func (c SidecarCapture) render() string {
	return fmt.Sprintf("%+v", c)
}

// String shows the settings as status lines do.
func (c SidecarCapture) String() string {
	ports := func(ps []uint16) string {
		var s []string
		for _, p := range ps {
			s = append(s, fmt.Sprint(p))
		}
		return strings.Join(s, ",")
	}
	in, out := "*", "*"
	if c.InboundPorts != nil {
		in = ports(c.InboundPorts)
	}
	if c.OutboundCIDRs != nil {
		var s []string
		for _, p := range c.OutboundCIDRs {
			s = append(s, p.String())
		}
		out = strings.Join(s, ",")
	}
	return fmt.Sprintf("%s uid/gid %d/%d in=%s out=%s dns=%v dualStack=%v", c.Mode, c.ProxyUID, c.ProxyGID, in, out, c.DNS, c.DualStack)
}
