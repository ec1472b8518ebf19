package desired

// A sidecar pod's effective interception settings, read as Istio reads
// them: the pod's annotations, its proxy container's uid/gid and
// environment (or the proxyMetadata of proxy.istio.io/config), Istio's
// defaults where they are absent. An annotation we cannot honour is an
// error naming it and the pod: the pod must not start with open rules.

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
)

// Istio's annotations of a sidecar pod.
const (
	AnnoIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	AnnoExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	AnnoIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	AnnoExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	AnnoIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
	AnnoExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	AnnoExcludeInterfaces       = "traffic.sidecar.istio.io/excludeInterfaces"
	AnnoRerouteInterfaces       = "istio.io/reroute-virtual-interfaces"
	AnnoKubevirtInterfaces      = "traffic.sidecar.istio.io/kubevirtInterfaces" // the old name of the above
	AnnoProxyConfig             = "proxy.istio.io/config"
)

// ProxyContainer is the sidecar's container name.
const ProxyContainer = "istio-proxy"

// Proxy environment variables that change the rules.
const (
	EnvDNSCapture  = "ISTIO_META_DNS_CAPTURE"
	EnvDualStack   = "ISTIO_DUAL_STACK"
	EnvInvalidDrop = "INVALID_DROP"
)

// SidecarAnnotation reports an annotation whose value the rules read (the
// cache keeps only these of a sidecar pod's).
func SidecarAnnotation(key string) bool {
	return strings.HasPrefix(key, "traffic.sidecar.istio.io/") || key == selection.InterceptionModeAnno ||
		key == AnnoRerouteInterfaces || key == AnnoProxyConfig
}

// SidecarEnv reports an environment variable of the proxy the rules read.
func SidecarEnv(name string) bool {
	return name == EnvDNSCapture || name == EnvDualStack || name == EnvInvalidDrop
}

// SidecarCaptureOf reads a sidecar pod's interception settings.
func SidecarCaptureOf(p *corev1.Pod) (dataplane.SidecarCapture, error) {
	a := p.Annotations
	c := dataplane.SidecarCapture{Mode: dataplane.SidecarRedirect, ProxyUID: 1337, ProxyGID: 1337}
	bad := func(key string, err error) (dataplane.SidecarCapture, error) {
		return dataplane.SidecarCapture{}, fmt.Errorf("pod %s/%s: annotation %s=%q: %w", p.Namespace, p.Name, key, a[key], err)
	}
	switch m := a[selection.InterceptionModeAnno]; m {
	case "", dataplane.SidecarRedirect:
	case dataplane.SidecarTProxy:
		c.Mode = m
	default:
		return bad(selection.InterceptionModeAnno, fmt.Errorf("not one of %s, %s, %s", dataplane.SidecarRedirect, dataplane.SidecarTProxy, selection.InterceptionNone))
	}
	var err error
	if c.InboundPorts, err = portList(a, AnnoIncludeInboundPorts, true); err != nil {
		return bad(AnnoIncludeInboundPorts, err)
	}
	for key, into := range map[string]*[]uint16{AnnoExcludeInboundPorts: &c.ExcludeInboundPorts,
		AnnoIncludeOutboundPorts: &c.IncludeOutboundPorts, AnnoExcludeOutboundPorts: &c.ExcludeOutboundPorts} {
		if *into, err = portList(a, key, false); err != nil {
			return bad(key, err)
		}
	}
	if c.OutboundCIDRs, err = cidrList(a, AnnoIncludeOutboundIPRanges, true); err != nil {
		return bad(AnnoIncludeOutboundIPRanges, err)
	}
	if c.ExcludeOutboundCIDRs, err = cidrList(a, AnnoExcludeOutboundIPRanges, false); err != nil {
		return bad(AnnoExcludeOutboundIPRanges, err)
	}
	if c.ExcludeInterfaces, err = ifaceList(a[AnnoExcludeInterfaces]); err != nil {
		return bad(AnnoExcludeInterfaces, err)
	}
	reroute := AnnoRerouteInterfaces
	if _, ok := a[reroute]; !ok {
		reroute = AnnoKubevirtInterfaces
	}
	if c.RerouteInterfaces, err = ifaceList(a[reroute]); err != nil {
		return bad(reroute, err)
	}
	env, err := proxyEnv(p)
	if err != nil {
		return bad(AnnoProxyConfig, err)
	}
	c.DNS, c.DualStack, c.InvalidDrop = env[EnvDNSCapture] == "true", env[EnvDualStack] == "true", env[EnvInvalidDrop] == "true"
	for _, ct := range p.Spec.Containers {
		if ct.Name != ProxyContainer || ct.SecurityContext == nil {
			continue
		}
		for _, id := range []struct {
			v    *int64
			into *uint32
		}{{ct.SecurityContext.RunAsUser, &c.ProxyUID}, {ct.SecurityContext.RunAsGroup, &c.ProxyGID}} {
			if id.v != nil && *id.v >= 0 && *id.v <= 1<<32-1 {
				*id.into = uint32(*id.v)
			}
		}
	}
	return c, nil
}

// proxyEnv is the proxy's environment the rules read: its container's
// variables, else the proxyMetadata of proxy.istio.io/config.
func proxyEnv(p *corev1.Pod) (map[string]string, error) {
	env := map[string]string{}
	if raw := p.Annotations[AnnoProxyConfig]; raw != "" {
		var pc struct {
			ProxyMetadata map[string]string `json:"proxyMetadata"`
		}
		if err := yaml.Unmarshal([]byte(raw), &pc); err != nil {
			return nil, fmt.Errorf("not a ProxyConfig: %w", err)
		}
		for k, v := range pc.ProxyMetadata {
			if SidecarEnv(k) {
				env[k] = v
			}
		}
	}
	for _, ct := range p.Spec.Containers {
		if ct.Name != ProxyContainer {
			continue
		}
		for _, e := range ct.Env {
			if SidecarEnv(e.Name) {
				env[e.Name] = e.Value
			}
		}
	}
	return env, nil
}

func split(v string) []string {
	var out []string
	for f := range strings.SplitSeq(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// portList parses a comma-separated port list. With star, an absent
// annotation or "*" is nil (every port) and "" is none.
func portList(a map[string]string, key string, star bool) ([]uint16, error) {
	v, ok := a[key]
	if star && (!ok || strings.TrimSpace(v) == "*") {
		return nil, nil
	}
	out := []uint16{}
	for _, f := range split(v) {
		n, err := strconv.ParseUint(f, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port (1-65535)", f)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

// cidrList parses comma-separated CIDRs. With star, an absent annotation
// or one listing "*" is nil (every address) and "" is none.
func cidrList(a map[string]string, key string, star bool) ([]netip.Prefix, error) {
	v, ok := a[key]
	fields := split(v)
	if star && (!ok || len(fields) == 1 && fields[0] == "*") {
		return nil, nil
	}
	out := []netip.Prefix{}
	for _, f := range fields {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR", f)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

func ifaceList(v string) ([]string, error) {
	out := split(v)
	for _, i := range out {
		if len(i) > 15 || strings.ContainsAny(i, " /:") {
			return nil, fmt.Errorf("%q is not an interface name", i)
		}
	}
	return out, nil
}
