// Package kube applies the rules of package selection to the API's types,
// for the agent: it only translates a *corev1.Pod or *corev1.Namespace into
// what the rules read, and decides nothing itself.
package kube

import (
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// Pod is what the rules read of pod.
func Pod(pod *corev1.Pod) selection.Pod {
	return selection.Pod{
		Namespace:   pod.Namespace,
		Name:        pod.Name,
		Labels:      pod.Labels,
		Annotations: pod.Annotations,
		NodeName:    pod.Spec.NodeName,
		HostNetwork: pod.Spec.HostNetwork,
		Terminating: pod.DeletionTimestamp != nil,
		Phase:       string(pod.Status.Phase),
		IPs:         PodIPs(pod),
		Ready:       PodReady(pod),
		Started:     startTime(pod),
		InitContainers: func() []string {
			var names []string
			for _, c := range pod.Spec.InitContainers {
				names = append(names, c.Name)
			}
			return names
		}(),
	}
}

// SidecarEnrolled is selection.SidecarEnrolled for pod.
func SidecarEnrolled(pod *corev1.Pod, o selection.Options) (bool, string) {
	p := Pod(pod)
	return selection.SidecarEnrolled(&p, o)
}

// Namespace is what the rules read of ns; nil for nil (not in the cache).
func Namespace(ns *corev1.Namespace) *selection.Namespace {
	if ns == nil {
		return nil
	}
	return &selection.Namespace{Labels: ns.Labels}
}

// Enrolled is selection.Enrolled for pod in ns (nil when not cached).
func Enrolled(pod *corev1.Pod, ns *corev1.Namespace, o selection.Options) (bool, string) {
	p := Pod(pod)
	return selection.Enrolled(&p, Namespace(ns), o)
}

// Ambient is selection.Ambient for pod in ns (nil when not cached).
func Ambient(pod *corev1.Pod, ns *corev1.Namespace, o selection.Options) (bool, string) {
	p := Pod(pod)
	return selection.Ambient(&p, Namespace(ns), o)
}

// IsZtunnel is selection.Options.IsZtunnel for pod.
func IsZtunnel(pod *corev1.Pod, o selection.Options) bool {
	return o.IsZtunnel(pod.Namespace, pod.Labels)
}

// PodIPs returns every valid address of status.podIPs (falling back to status.podIP).
func PodIPs(pod *corev1.Pod) []netip.Addr {
	ips := make([]string, len(pod.Status.PodIPs))
	for i, ip := range pod.Status.PodIPs {
		ips[i] = ip.IP
	}
	return selection.ParseIPs(ips, pod.Status.PodIP)
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

// PickZtunnel is selection.PickZtunnel over pods: the ztunnel to use, or nil.
func PickZtunnel(pods []*corev1.Pod, o selection.Options) *corev1.Pod {
	cands, views := ztunnels(pods, o)
	if i := selection.PickZtunnel(views, o); i >= 0 {
		return cands[i]
	}
	return nil
}

// DrainingZtunnels is selection.DrainingZtunnels over pods, with active
// PickZtunnel's answer.
func DrainingZtunnels(pods []*corev1.Pod, o selection.Options, active *corev1.Pod) []*corev1.Pod {
	cands, views := ztunnels(pods, o)
	act := -1
	for i, p := range cands {
		if p == active {
			act = i
		}
	}
	var out []*corev1.Pod
	for _, i := range selection.DrainingZtunnels(views, o, act) {
		out = append(out, cands[i])
	}
	return out
}

// ztunnels are the ztunnel pods among pods, and what the rules read of
// them: only those are translated, not every pod of the node.
func ztunnels(pods []*corev1.Pod, o selection.Options) ([]*corev1.Pod, []selection.Pod) {
	var cands []*corev1.Pod
	var views []selection.Pod
	for _, p := range pods {
		if IsZtunnel(p, o) {
			cands = append(cands, p)
			views = append(views, Pod(p))
		}
	}
	return cands, views
}

func startTime(p *corev1.Pod) time.Time {
	t := p.CreationTimestamp.Time
	if p.Status.StartTime != nil && p.Status.StartTime.After(t) {
		t = p.Status.StartTime.Time
	}
	return t
}
