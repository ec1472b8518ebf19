package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

func sidecarPod(annos map[string]string, proxy corev1.Container) *corev1.Pod {
	a := map[string]string{"sidecar.istio.io/status": "{}"}
	for k, v := range annos {
		a[k] = v
	}
	proxy.Name = ProxyContainer
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", Annotations: a},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app"}, proxy}}}
}

// TestSidecarCaptureDefaults: an injected pod with no traffic annotations
// gets Istio's defaults: REDIRECT, uid/gid 1337, every inbound port and
// every outbound address.
func TestSidecarCaptureDefaults(t *testing.T) {
	c, err := SidecarCaptureOf(sidecarPod(nil, corev1.Container{}))
	if err != nil {
		t.Fatal(err)
	}
	want := dataplane.SidecarCapture{Mode: dataplane.SidecarRedirect, ProxyUID: 1337, ProxyGID: 1337,
		ExcludeInboundPorts: []uint16{}, IncludeOutboundPorts: []uint16{}, ExcludeOutboundPorts: []uint16{}, ExcludeOutboundCIDRs: []netip.Prefix{}}
	if c.String() != want.String() || c.InboundPorts != nil || c.OutboundCIDRs != nil {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestSidecarCaptureFromAnnotationsAndProxy(t *testing.T) {
	uid, gid := int64(1500), int64(1501)
	p := sidecarPod(map[string]string{
		"sidecar.istio.io/interceptionMode":                "TPROXY",
		AnnoIncludeInboundPorts:                            "8080, 9090",
		AnnoExcludeOutboundIPRanges:                        "10.96.0.10/32,fd00::/8",
		AnnoIncludeOutboundIPRanges:                        "",
		AnnoExcludeOutboundPorts:                           "5432",
		AnnoKubevirtInterfaces:                             "kv0",
		AnnoProxyConfig:                                    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
		"traffic.sidecar.istio.io/excludeInterfaces":       "net1",
		"traffic.sidecar.istio.io/includeOutboundPorts":    "3306",
		"traffic.sidecar.istio.io/excludeInboundPorts":     "15999",
		"unrelated.example.com/includeOutboundIPRanges":    "bogus",
		"traffic.sidecar.istio.io/unknownFutureAnnotation": "x",
	}, corev1.Container{SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &gid},
		Env: []corev1.EnvVar{{Name: EnvDualStack, Value: "true"}}})
	c, err := SidecarCaptureOf(p)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case c.Mode != dataplane.SidecarTProxy, c.ProxyUID != 1500, c.ProxyGID != 1501:
		t.Errorf("mode/uid/gid: %+v", c)
	case !slices.Equal(c.InboundPorts, []uint16{8080, 9090}), !slices.Equal(c.ExcludeInboundPorts, []uint16{15999}):
		t.Errorf("inbound ports: %+v", c)
	case c.OutboundCIDRs == nil || len(c.OutboundCIDRs) != 0:
		t.Errorf("an empty includeOutboundIPRanges captures nothing: %+v", c.OutboundCIDRs)
	case len(c.ExcludeOutboundCIDRs) != 2, !slices.Equal(c.ExcludeOutboundPorts, []uint16{5432}), !slices.Equal(c.IncludeOutboundPorts, []uint16{3306}):
		t.Errorf("outbound: %+v", c)
	case !slices.Equal(c.RerouteInterfaces, []string{"kv0"}), !slices.Equal(c.ExcludeInterfaces, []string{"net1"}):
		t.Errorf("interfaces: %+v", c)
	case !c.DNS || !c.DualStack || c.InvalidDrop:
		t.Errorf("environment: %+v", c)
	}
}

// TestSidecarCaptureRefusesBadAnnotations: each value we cannot honour is
// an error naming the annotation and the pod.
func TestSidecarCaptureRefusesBadAnnotations(t *testing.T) {
	for key, v := range map[string]string{
		"sidecar.istio.io/interceptionMode": "NAT",
		AnnoIncludeInboundPorts:             "80,http",
		AnnoExcludeInboundPorts:             "70000",
		AnnoExcludeOutboundPorts:            "0",
		AnnoIncludeOutboundIPRanges:         "10.0.0.0/33",
		AnnoExcludeOutboundIPRanges:         "10.0.0.1",
		AnnoExcludeInterfaces:               "eth0 eth1",
		AnnoProxyConfig:                     "proxyMetadata: [",
	} {
		_, err := SidecarCaptureOf(sidecarPod(map[string]string{key: v}, corev1.Container{}))
		if err == nil || !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), "apps/web") {
			t.Errorf("%s=%q: %v, want an error naming the annotation and the pod", key, v, err)
		}
	}
}
