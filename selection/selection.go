// Package selection decides which pods of a node are ambient and which
// pod is its ztunnel: the one implementation of these rules, for the agent
// and the CNI plugin. It imports nothing of Kubernetes (the plugin links it
// and must start fast): the rules read a Pod and a Namespace of plain
// fields, which package selection/kube fills from the API types.
package selection

import (
	"net/netip"
	"slices"
	"sort"
	"time"
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
	// InterceptionModeAnno is a sidecar pod's capture mode: REDIRECT
	// (default), TPROXY or NONE.
	InterceptionModeAnno = "sidecar.istio.io/interceptionMode"
	InterceptionNone     = "NONE"
	// IstioInitContainer writes a sidecar pod's rules itself.
	IstioInitContainer = "istio-init"
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
	ReasonSidecarCapture    = "sidecar pod: its capture rules are this agent's, in its netns"
	ReasonSidecarIstioInit  = ReasonSidecar + "; its " + IstioInitContainer + " init container writes its rules"
	ReasonSidecarModeNone   = ReasonSidecar + "; " + InterceptionModeAnno + "=" + InterceptionNone
)

// Phases of a pod (status.phase) the rules read.
const (
	PhaseRunning   = "Running"
	PhaseSucceeded = "Succeeded"
	PhaseFailed    = "Failed"
)

// Pod is what the rules read of a pod. The agent fills it from a
// *corev1.Pod (package selection/kube), the CNI plugin from the API
// server's JSON; only Namespace, Labels and Annotations matter to Ambient.
type Pod struct {
	Namespace, Name string
	Labels          map[string]string
	Annotations     map[string]string
	NodeName        string // spec.nodeName
	HostNetwork     bool
	Terminating     bool   // metadata.deletionTimestamp is set
	Phase           string // status.phase
	IPs             []netip.Addr
	Ready           bool      // the Ready condition is True
	Started         time.Time // the later of creation and status.startTime
	// InitContainers are the names of spec.initContainers.
	InitContainers []string
}

// Namespace is what the rules read of a namespace.
type Namespace struct {
	Labels map[string]string
}

// Options configure Enrolled.
type Options struct {
	NodeName          string
	ExcludeNamespaces []string
	ZtunnelNamespace  string
	// ZtunnelSelector selects the ztunnel pods in ZtunnelNamespace; nil
	// selects none.
	ZtunnelSelector *Selector
	// SidecarCapture makes the agent write sidecar pods' capture rules
	// (SidecarCaptured); off, it leaves them to Istio.
	SidecarCapture bool
}

// IsZtunnel reports whether a pod of namespace with labels is a ztunnel pod
// (selector in the ztunnel namespace). A pod with the label elsewhere is an
// ordinary pod.
func (o Options) IsZtunnel(namespace string, labels map[string]string) bool {
	return namespace == o.ZtunnelNamespace && o.ZtunnelSelector != nil && o.ZtunnelSelector.Matches(labels)
}

// Enrolled decides whether pod is an ambient pod on this node, and why.
// ns may be nil when the namespace is not (yet) in the cache.
func Enrolled(pod *Pod, ns *Namespace, o Options) (bool, string) {
	if ok, why := capturable(pod, o); !ok {
		return false, why
	}
	return Ambient(pod, ns, o)
}

// capturable decides what every captured pod must be, whoever captures
// it: on this node, with a network and an address of its own, running.
func capturable(pod *Pod, o Options) (bool, string) {
	switch {
	case pod.NodeName != o.NodeName:
		return false, ReasonOtherNode
	case pod.HostNetwork:
		return false, ReasonHostNetwork
	case pod.Terminating:
		return false, ReasonTerminating
	case pod.Phase == PhaseSucceeded || pod.Phase == PhaseFailed:
		return false, ReasonFinished
	case len(pod.IPs) == 0:
		return false, ReasonNoIP
	}
	return true, ""
}

// Ambient decides from labels, annotations and namespace alone whether pod
// is meant to be captured: what the CNI plugin can know of a pod whose
// sandbox is being created (no status yet).
func Ambient(pod *Pod, ns *Namespace, o Options) (bool, string) {
	switch {
	case slices.Contains(o.ExcludeNamespaces, pod.Namespace):
		return false, ReasonExcludedNamespace
	case o.IsZtunnel(pod.Namespace, pod.Labels):
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

// SidecarEnrolled decides whether pod is a sidecar pod of this node whose
// capture rules the agent writes now, and why.
func SidecarEnrolled(pod *Pod, o Options) (bool, string) {
	if ok, why := capturable(pod, o); !ok {
		return false, why
	}
	return SidecarCaptured(pod, o)
}

// SidecarCaptured decides from annotations and init containers alone
// whether pod is a sidecar pod whose capture rules the agent writes:
// injected (Istio's status annotation), without Istio's own istio-init
// (the CNI-mode injection), its interception mode not NONE. What the CNI
// plugin can know of a pod whose sandbox is being created.
func SidecarCaptured(pod *Pod, o Options) (bool, string) {
	switch {
	case !o.SidecarCapture || pod.Annotations[SidecarStatusAnno] == "":
		return false, ReasonSidecar
	case slices.Contains(o.ExcludeNamespaces, pod.Namespace):
		return false, ReasonExcludedNamespace
	case slices.Contains(pod.InitContainers, IstioInitContainer):
		return false, ReasonSidecarIstioInit
	case pod.Annotations[InterceptionModeAnno] == InterceptionNone:
		return false, ReasonSidecarModeNone
	}
	return true, ReasonSidecarCapture
}

// ParseIPs returns every valid address of podIPs (status.podIPs), falling
// back to podIP (status.podIP), unmapped and without duplicates.
func ParseIPs(podIPs []string, podIP string) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !slices.Contains(out, a.Unmap()) {
			out = append(out, a.Unmap())
		}
	}
	for _, ip := range podIPs {
		add(ip)
	}
	if len(out) == 0 && podIP != "" {
		add(podIP)
	}
	return out
}

// PickZtunnel returns the index in pods of the newest Ready, running,
// non-terminating ztunnel pod on this node with an address, or -1.
func PickZtunnel(pods []Pod, o Options) int {
	best := -1
	for i := range pods {
		p := &pods[i]
		if !o.IsZtunnel(p.Namespace, p.Labels) || p.NodeName != o.NodeName || p.Terminating ||
			p.Phase != PhaseRunning || !p.Ready || p.HostNetwork || len(p.IPs) == 0 {
			continue
		}
		// Newest wins; ties broken by name so the choice is stable.
		if best < 0 || p.Started.After(pods[best].Started) || p.Started.Equal(pods[best].Started) && p.Name > pods[best].Name {
			best = i
		}
	}
	return best
}

// DrainingZtunnels returns the indexes in pods of the other ztunnel pods of
// this node that still run (Ready or not, terminating or not), newest first;
// active is PickZtunnel's answer. A surge rollout's old ztunnel keeps its
// connections while it runs, and so does a newer one whose readiness flaps.
// Those that hold no connections (no slot in the kernel) are ignored by the
// dataplane.
func DrainingZtunnels(pods []Pod, o Options, active int) []int {
	var out []int
	for i := range pods {
		p := &pods[i]
		if i == active || !o.IsZtunnel(p.Namespace, p.Labels) || p.NodeName != o.NodeName || p.Phase != PhaseRunning || p.HostNetwork {
			continue
		}
		if len(p.IPs) > 0 {
			out = append(out, i)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return pods[out[i]].Started.After(pods[out[j]].Started) })
	return out
}
