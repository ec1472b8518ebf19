// Package selection decides which pods of a node are ambient and which
// pod is its ztunnel. It imports no client-go: the CNI plugin uses it too.
package selection

import (
	"net/netip"
	"slices"
	"sort"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Labels and annotations of the ambient contract.
const (
	DataplaneModeLabel   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"
	RedirectionAnno      = "ambient.istio.io/redirection"
	RedirectionEnabled   = "enabled"
	RedirectionDisabled  = "disabled"
	SidecarStatusAnno    = "sidecar.istio.io/status"
)

// Reasons a pod is or is not enrolled, as shown by the debug endpoint.
const (
	ReasonEnrolledNamespace = "enrolled: namespace label " + DataplaneModeLabel + "=" + DataplaneModeAmbient
	ReasonEnrolledPodLabel  = "enrolled: pod label " + DataplaneModeLabel + "=" + DataplaneModeAmbient
	ReasonOtherNode         = "not on this node"
	ReasonHostNetwork       = "hostNetwork pod"
	ReasonTerminating       = "terminating"
	ReasonFinished          = "finished (phase Succeeded/Failed)"
	ReasonNoIP              = "no pod IP yet"
	ReasonExcludedNamespace = "namespace excluded by --exclude-namespaces"
	ReasonZtunnel           = "ztunnel pod"
	ReasonOptOutLabel       = "opted out: pod label " + DataplaneModeLabel + "=" + DataplaneModeNone
	ReasonOptOutAnnotation  = "opted out: annotation " + RedirectionAnno + "=" + RedirectionDisabled
	ReasonSidecar           = "has an Istio sidecar (" + SidecarStatusAnno + ")"
	ReasonNotAmbient        = "neither namespace nor pod labelled " + DataplaneModeLabel + "=" + DataplaneModeAmbient
	ReasonNamespaceUnknown  = "namespace not found in cache"
)

// Options configure Enrolled.
type Options struct {
	NodeName          string
	ExcludeNamespaces []string
	ZtunnelNamespace  string
	ZtunnelSelector   labels.Selector
}

// IsZtunnel reports whether pod is a ztunnel pod (selector in the ztunnel
// namespace). A pod with the label elsewhere is an ordinary pod.
func (o Options) IsZtunnel(pod *corev1.Pod) bool {
	return pod.Namespace == o.ZtunnelNamespace && o.ZtunnelSelector != nil && o.ZtunnelSelector.Matches(labels.Set(pod.Labels))
}

// Enrolled decides whether pod is an ambient pod on this node, and why.
// ns may be nil when the namespace is not (yet) in the cache.
func Enrolled(pod *corev1.Pod, ns *corev1.Namespace, o Options) (bool, string) {
	switch {
	case pod.Spec.NodeName != o.NodeName:
		return false, ReasonOtherNode
	case pod.Spec.HostNetwork:
		return false, ReasonHostNetwork
	case pod.DeletionTimestamp != nil:
		return false, ReasonTerminating
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return false, ReasonFinished
	case len(PodIPs(pod)) == 0:
		return false, ReasonNoIP
	}
	return Ambient(pod, ns, o)
}

// Ambient decides from labels, annotations and namespace alone whether pod
// is meant to be captured: what the CNI plugin can know of a pod whose
// sandbox is being created (no status yet).
func Ambient(pod *corev1.Pod, ns *corev1.Namespace, o Options) (bool, string) {
	switch {
	case slices.Contains(o.ExcludeNamespaces, pod.Namespace):
		return false, ReasonExcludedNamespace
	case o.IsZtunnel(pod):
		return false, ReasonZtunnel
	case pod.Labels[DataplaneModeLabel] == DataplaneModeNone:
		return false, ReasonOptOutLabel
	case pod.Annotations[RedirectionAnno] == RedirectionDisabled:
		return false, ReasonOptOutAnnotation
	case pod.Annotations[SidecarStatusAnno] != "":
		return false, ReasonSidecar
	case pod.Labels[DataplaneModeLabel] == DataplaneModeAmbient:
		return true, ReasonEnrolledPodLabel
	case ns == nil:
		return false, ReasonNamespaceUnknown
	case ns.Labels[DataplaneModeLabel] == DataplaneModeAmbient:
		return true, ReasonEnrolledNamespace
	}
	return false, ReasonNotAmbient
}

// PodIPs returns every valid address of status.podIPs (falling back to status.podIP).
func PodIPs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !slices.Contains(out, a.Unmap()) {
			out = append(out, a.Unmap())
		}
	}
	for _, ip := range pod.Status.PodIPs {
		add(ip.IP)
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		add(pod.Status.PodIP)
	}
	return out
}

// PodReady reports the pod's Ready condition.
func PodReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// PickZtunnel returns the newest Ready, running, non-terminating ztunnel pod
// on this node with an address, or nil.
func PickZtunnel(pods []*corev1.Pod, o Options) *corev1.Pod {
	var best *corev1.Pod
	var bestTime time.Time
	for _, p := range pods {
		if !o.IsZtunnel(p) || p.Spec.NodeName != o.NodeName || p.DeletionTimestamp != nil ||
			p.Status.Phase != corev1.PodRunning || !PodReady(p) || p.Spec.HostNetwork {
			continue
		}
		if len(PodIPs(p)) == 0 {
			continue
		}
		t := startTime(p)
		// Newest wins; ties broken by name so the choice is stable.
		if best == nil || t.After(bestTime) || t.Equal(bestTime) && p.Name > best.Name {
			best, bestTime = p, t
		}
	}
	return best
}

// DrainingZtunnels returns the other ztunnel pods of this node that still
// run (Ready or not, terminating or not), newest first: a surge rollout's
// old ztunnel keeps its connections while it runs, and so does a newer one
// whose readiness flaps. Those that hold no connections (no slot in the
// kernel) are ignored by the dataplane.
func DrainingZtunnels(pods []*corev1.Pod, o Options, active *corev1.Pod) []*corev1.Pod {
	var out []*corev1.Pod
	for _, p := range pods {
		if p == active || !o.IsZtunnel(p) || p.Spec.NodeName != o.NodeName || p.Status.Phase != corev1.PodRunning || p.Spec.HostNetwork {
			continue
		}
		if len(PodIPs(p)) > 0 {
			out = append(out, p)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return startTime(out[i]).After(startTime(out[j])) })
	return out
}

func startTime(p *corev1.Pod) time.Time {
	t := p.CreationTimestamp.Time
	if p.Status.StartTime != nil && p.Status.StartTime.After(t) {
		t = p.Status.StartTime.Time
	}
	return t
}
