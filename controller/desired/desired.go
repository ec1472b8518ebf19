// Package desired computes the node's desired dataplane state from plain
// inputs: the node's pods (with the objects the CNI plugin handed over
// already resolved), their namespaces, the CNI hand-over facts and the
// selection options. It reads no informer and touches no kernel: locating
// the ztunnels it picks is the caller's job.
//
// Hazards it handles:
//   - an address claimed by two enrolled pods (a stale object whose address
//     was reused): the first keeps it, and a pod handed over by CNI comes
//     first, whatever the names' order;
//   - a status and a sandbox listing the same addresses in other orders:
//     a pod's addresses are sorted.
package desired

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/ambient-redirect/ambient-redirect/controller/handover"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube"
)

// ReasonSandboxDeleted is the reason of a pod whose network CNI DEL tore down.
const ReasonSandboxDeleted = "sandbox deleted (CNI DEL)"

// PodStatus is one pod's selection outcome.
type PodStatus struct {
	Namespace  string   `json:"namespace"`
	Name       string   `json:"name"`
	UID        string   `json:"uid"`
	IPs        []string `json:"ips"`
	Enrolled   bool     `json:"enrolled"`
	Reason     string   `json:"reason"`
	Annotation string   `json:"annotation,omitempty"`
	// ViaCNI: the CNI plugin handed this pod's sandbox over.
	ViaCNI bool `json:"viaCNI,omitempty"`
}

// Entry is one pod's decision.
type Entry struct {
	Status PodStatus
	// Pod is what to program for it; nil when it is not enrolled (or
	// lost all its addresses to other pods).
	Pod *dataplane.Pod
	// Sidecar is what to program for a sidecar pod whose rules are ours;
	// SidecarErr why its annotations cannot be honoured.
	Sidecar    *dataplane.Sidecar
	SidecarErr error
}

// HandedOver applies what CNI said about a pod's sandbox: the pod to
// decide, whether CNI handed it over, whether its sandbox was deleted
// (handover.Apply).
type HandedOver func(p *corev1.Pod) (pod *corev1.Pod, viaCNI, deleted bool, netns string)

// PodEntry is a pod's selection outcome and, when enrolled, what to
// program.
func PodEntry(p *corev1.Pod, ns *corev1.Namespace, sel selection.Options, withCNI HandedOver) Entry {
	p, viaCNI, deleted, netns := withCNI(p)
	sp := kube.Pod(p) // what both rules read, converted once
	ok, why := selection.Enrolled(&sp, kube.Namespace(ns), sel)
	if deleted {
		ok, why = false, ReasonSandboxDeleted
	}
	ps := PodStatus{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID), Enrolled: ok, Reason: why, Annotation: p.Annotations[selection.RedirectionAnno]}
	for _, a := range p.Status.PodIPs {
		ps.IPs = append(ps.IPs, a.IP)
	}
	if len(ps.IPs) == 0 && p.Status.PodIP != "" {
		ps.IPs = []string{p.Status.PodIP}
	}
	ps.ViaCNI = viaCNI
	e := Entry{Status: ps}
	ips := slices.SortedFunc(slices.Values(sp.IPs), netip.Addr.Compare) // the status's and CNI's orders may differ
	if ok {
		e.Pod = &dataplane.Pod{UID: string(p.UID), Name: p.Namespace + "/" + p.Name, IPs: ips}
	} else if sc, why := selection.SidecarEnrolled(&sp, sel); sc && !deleted {
		e.Status.Reason = why
		capture, err := SidecarCaptureOf(p)
		if err != nil {
			e.SidecarErr, e.Status.Reason = err, "sidecar pod, not programmed: "+err.Error()
		} else {
			e.Sidecar = &dataplane.Sidecar{UID: string(p.UID), Name: p.Namespace + "/" + p.Name, IPs: ips, NetNS: netns, Capture: capture}
		}
	}
	return e
}

// Input is what the desired state is computed from.
type Input struct {
	// Pods are the node's pods, the objects CNI ADD looked up standing in
	// for those the cache has not seen (handover.Store.Resolve). Build
	// sorts the slice in place.
	Pods []*corev1.Pod
	// Namespace is a pod namespace's object, nil when unknown.
	Namespace func(name string) *corev1.Namespace
	// Sandboxes are the CNI hand-over facts, by namespace/name.
	Sandboxes map[string]handover.Sandbox
	Selection selection.Options
	// ServiceCIDRObjects are the cluster's ServiceCIDR objects (none when
	// the API does not serve them to us); FlagServiceCIDRs are
	// --service-cidr's prefixes, added to theirs.
	ServiceCIDRObjects []*networkingv1.ServiceCIDR
	FlagServiceCIDRs   []netip.Prefix
	// Log receives the address conflicts; nil: none.
	Log *zap.Logger
}

// Output is the desired state and what the caller still has to do.
type Output struct {
	// State holds the pods to program, in namespace/name order; its
	// ztunnels are the caller's to locate.
	State dataplane.State
	// Entries are every pod's decision, by namespace/name; an entry's Pod
	// points into State.Pods.
	Entries map[string]Entry
	// Ztunnel is the active ztunnel pod (nil: none); Draining are the
	// ztunnel pods still serving connections.
	Ztunnel  *corev1.Pod
	Draining []*corev1.Pod
}

// Build computes the desired state from in.
func Build(in Input) Output {
	log := in.Log
	if log == nil {
		log = zap.NewNop()
	}
	withCNI := func(p *corev1.Pod) (*corev1.Pod, bool, bool, string) {
		hp, via, deleted := handover.Apply(p, in.Sandboxes)
		return hp, via, deleted, handover.NetNS(p, in.Sandboxes)
	}
	pods := in.Pods
	var st dataplane.State
	entries := make(map[string]Entry, len(pods))
	slices.SortFunc(pods, func(a, b *corev1.Pod) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	for _, p := range pods {
		var ns *corev1.Namespace
		if in.Namespace != nil {
			ns = in.Namespace(p.Namespace)
		}
		e := PodEntry(p, ns, in.Selection, withCNI)
		if e.Pod != nil {
			st.Pods = append(st.Pods, *e.Pod)
			e.Pod = nil // set again below unless dedupe drops it
		}
		if e.Sidecar != nil {
			st.Sidecars = append(st.Sidecars, *e.Sidecar)
		}
		entries[p.Namespace+"/"+p.Name] = e
	}
	// A pod the CNI plugin handed over holds its sandbox's addresses now: a
	// stale object still claiming one loses it, whatever their names.
	viaCNI := func(p dataplane.Pod) bool { return entries[p.Name].Status.ViaCNI }
	slices.SortStableFunc(st.Pods, func(a, b dataplane.Pod) int {
		return cmp.Compare(boolRank(!viaCNI(a)), boolRank(!viaCNI(b)))
	})
	st.Pods = DedupeIPs(st.Pods, log)
	slices.SortStableFunc(st.Pods, func(a, b dataplane.Pod) int { // back to namespace/name order
		ea, eb := entries[a.Name].Status, entries[b.Name].Status
		return cmp.Or(strings.Compare(ea.Namespace, eb.Namespace), strings.Compare(ea.Name, eb.Name))
	})
	for i := range st.Pods {
		e := entries[st.Pods[i].Name]
		e.Pod = &st.Pods[i]
		entries[st.Pods[i].Name] = e
	}
	st.ServiceCIDRs = ServiceCIDRs(in.ServiceCIDRObjects, in.FlagServiceCIDRs)
	zt := kube.PickZtunnel(pods, in.Selection)
	return Output{State: st, Entries: entries, Ztunnel: zt, Draining: kube.DrainingZtunnels(pods, in.Selection, zt)}
}

// ServiceCIDRs is the union of the objects' spec.cidrs and extra, masked,
// sorted and without duplicates, so that equal inputs give equal states
// whatever the cache's order. An object being deleted still counts: the
// API server holds it (finalizer) while Services still have addresses in
// it, and those must stay captured with their VIPs until it is gone.
func ServiceCIDRs(objects []*networkingv1.ServiceCIDR, extra []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range extra {
		out = append(out, p.Masked())
	}
	for _, o := range objects {
		for _, c := range o.Spec.CIDRs {
			// The API server validates spec.cidrs; a value it let through
			// that we cannot parse is nothing we could program either.
			if p, err := netip.ParsePrefix(c); err == nil {
				out = append(out, p.Masked())
			}
		}
	}
	slices.SortFunc(out, netip.Prefix.Compare)
	return slices.Compact(out)
}

func boolRank(b bool) int {
	if b {
		return 1
	}
	return 0
}

// DedupeIPs keeps the first pod claiming an IP (a stale pod object whose IP
// was reused must not block the new one; both cannot be programmed), by
// the dataplane's own rule (dataplane.Claim), which refuses the rest.
func DedupeIPs(pods []dataplane.Pod, log *zap.Logger) []dataplane.Pod {
	holders := make(map[netip.Addr]dataplane.Pod, 2*len(pods))
	out := pods[:0]
	for _, p := range pods {
		ips, dropped := p.IPs, false // copied only when one goes
		for i, a := range p.IPs {
			holder, held := holders[a]
			if held {
				if err := dataplane.Claim(a, p.UID, holder.UID); err != nil {
					log.Warn("pod IP claimed by two enrolled pods; keeping the first", zap.String("ip", a.String()), zap.String("pod", p.Name), zap.String("other", holder.Name))
				}
				// Either another pod's, or listed twice: not kept again.
				if !dropped {
					ips, dropped = slices.Clone(p.IPs[:i]), true
				}
				continue
			}
			holders[a] = p
			if dropped {
				ips = append(ips, a)
			}
		}
		if len(ips) > 0 {
			p.IPs = ips
			out = append(out, p)
		}
	}
	return out
}
