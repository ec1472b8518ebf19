package kube_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube"
	"github.com/ambient-redirect/ambient-redirect/selection/kube/kubetest"
)

// The cases are built on kubetest's fixtures.
var (
	selOpts = kubetest.Options
	pod     = kubetest.Pod
	ns      = kubetest.Namespace
)

func TestEnrolled(t *testing.T) {
	ambientNS := ns("apps", map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient})
	plainNS := ns("apps", nil)
	now := metav1.Now()
	cases := []struct {
		name   string
		pod    *corev1.Pod
		ns     *corev1.Namespace
		want   bool
		reason string
	}{
		{"namespace label", pod(), ambientNS, true, selection.ReasonEnrolledNamespace},
		{"pod label in plain namespace", pod(func(p *corev1.Pod) { p.Labels = map[string]string{selection.DataplaneModeLabel: "ambient"} }), plainNS, true, selection.ReasonEnrolledPodLabel},
		{"pod label with namespace not cached", pod(func(p *corev1.Pod) { p.Labels = map[string]string{selection.DataplaneModeLabel: "ambient"} }), nil, true, selection.ReasonEnrolledPodLabel},
		{"plain namespace", pod(), plainNS, false, selection.ReasonNotAmbient},
		{"namespace unknown", pod(), nil, false, selection.ReasonNamespaceUnknown},
		{"other node", pod(func(p *corev1.Pod) { p.Spec.NodeName = "n2" }), ambientNS, false, selection.ReasonOtherNode},
		{"hostNetwork", pod(func(p *corev1.Pod) { p.Spec.HostNetwork = true }), ambientNS, false, selection.ReasonHostNetwork},
		{"terminating", pod(func(p *corev1.Pod) { p.DeletionTimestamp = &now }), ambientNS, false, selection.ReasonTerminating},
		{"succeeded", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }), ambientNS, false, selection.ReasonFinished},
		{"failed", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }), ambientNS, false, selection.ReasonFinished},
		{"no IP", pod(func(p *corev1.Pod) { p.Status.PodIP, p.Status.PodIPs = "", nil }), ambientNS, false, selection.ReasonNoIP},
		{"pending with IP", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending }), ambientNS, true, selection.ReasonEnrolledNamespace},
		{"excluded namespace", pod(func(p *corev1.Pod) { p.Namespace = "kube-system" }), ns("kube-system", map[string]string{selection.DataplaneModeLabel: "ambient"}), false, selection.ReasonExcludedNamespace},
		{"ztunnel", pod(func(p *corev1.Pod) { p.Namespace, p.Labels = "istio-system", map[string]string{"app": "ztunnel"} }), ns("istio-system", map[string]string{selection.DataplaneModeLabel: "ambient"}), false, selection.ReasonZtunnel},
		{"app=ztunnel elsewhere is an ordinary pod", pod(func(p *corev1.Pod) { p.Labels = map[string]string{"app": "ztunnel"} }), ambientNS, true, selection.ReasonEnrolledNamespace},
		{"opt-out label", pod(func(p *corev1.Pod) { p.Labels = map[string]string{selection.DataplaneModeLabel: "none"} }), ambientNS, false, selection.ReasonOptOutLabel},
		{"opt-out annotation", pod(func(p *corev1.Pod) { p.Annotations = map[string]string{selection.RedirectionAnno: "disabled"} }), ambientNS, false, selection.ReasonOptOutAnnotation},
		{"our own annotation does not opt out", pod(func(p *corev1.Pod) { p.Annotations = map[string]string{selection.RedirectionAnno: "enabled"} }), ambientNS, true, selection.ReasonEnrolledNamespace},
		{"sidecar", pod(func(p *corev1.Pod) {
			p.Annotations = map[string]string{selection.SidecarStatusAnno: `{"containers":["istio-proxy"]}`}
		}), ambientNS, false, selection.ReasonSidecar},
	}
	for _, c := range cases {
		got, why := kube.Enrolled(c.pod, c.ns, selOpts())
		if got != c.want || why != c.reason {
			t.Errorf("%s: got (%v, %q), want (%v, %q)", c.name, got, why, c.want, c.reason)
		}
	}
}

func TestPodIPsUsesAllFamilies(t *testing.T) {
	p := pod(func(p *corev1.Pod) {
		p.Status.PodIPs = []corev1.PodIP{{IP: "10.244.1.5"}, {IP: "fd00::5"}, {IP: "bogus"}}
	})
	got := kube.PodIPs(p)
	if len(got) != 2 || got[0] != netip.MustParseAddr("10.244.1.5") || got[1] != netip.MustParseAddr("fd00::5") {
		t.Fatalf("selection.PodIPs = %v", got)
	}
	p.Status.PodIPs = nil
	if got := kube.PodIPs(p); len(got) != 1 {
		t.Fatalf("fallback to podIP: %v", got)
	}
}

func ztunnelPod(name string, created time.Time, mut ...func(*corev1.Pod)) *corev1.Pod {
	p := pod(func(p *corev1.Pod) {
		p.Name, p.Namespace, p.Labels = name, "istio-system", map[string]string{"app": "ztunnel"}
		p.CreationTimestamp = metav1.NewTime(created)
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	})
	for _, m := range mut {
		m(p)
	}
	return p
}

func TestPickZtunnel(t *testing.T) {
	t0 := time.Now().Add(-time.Hour)
	old := ztunnelPod("zt-old", t0)
	newer := ztunnelPod("zt-new", t0.Add(time.Minute))
	notReady := ztunnelPod("zt-newest-unready", t0.Add(2*time.Minute), func(p *corev1.Pod) { p.Status.Conditions[0].Status = corev1.ConditionFalse })
	elsewhere := ztunnelPod("zt-elsewhere", t0.Add(3*time.Minute), func(p *corev1.Pod) { p.Namespace = "default" })
	otherNode := ztunnelPod("zt-other-node", t0.Add(4*time.Minute), func(p *corev1.Pod) { p.Spec.NodeName = "n2" })
	now := metav1.Now()
	terminating := ztunnelPod("zt-terminating", t0.Add(5*time.Minute), func(p *corev1.Pod) { p.DeletionTimestamp = &now })
	if got := kube.PickZtunnel([]*corev1.Pod{old, newer, notReady, elsewhere, otherNode, terminating}, selOpts()); got != newer {
		t.Fatalf("picked %v, want zt-new", got)
	}
	if got := kube.PickZtunnel([]*corev1.Pod{notReady, elsewhere}, selOpts()); got != nil {
		t.Fatalf("picked %s, want none", got.Name)
	}
}

func TestDrainingZtunnels(t *testing.T) {
	t0 := time.Now().Add(-time.Hour)
	old := ztunnelPod("zt-old", t0)
	active := ztunnelPod("zt-active", t0.Add(time.Minute))
	now := metav1.Now()
	terminating := ztunnelPod("zt-terminating", t0.Add(-time.Minute), func(p *corev1.Pod) { p.DeletionTimestamp = &now })
	flapping := ztunnelPod("zt-newer-unready", t0.Add(2*time.Minute), func(p *corev1.Pod) { p.Status.Conditions[0].Status = corev1.ConditionFalse })
	finished := ztunnelPod("zt-finished", t0.Add(3*time.Minute), func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded })
	otherNode := ztunnelPod("zt-other-node", t0, func(p *corev1.Pod) { p.Spec.NodeName = "n2" })
	got := kube.DrainingZtunnels([]*corev1.Pod{old, active, terminating, flapping, finished, otherNode}, selOpts(), active)
	var names []string
	for _, p := range got {
		names = append(names, p.Name)
	}
	if want := []string{"zt-newer-unready", "zt-old", "zt-terminating"}; !slices.Equal(names, want) {
		t.Fatalf("draining %v, want %v (running, not active, this node, newest first)", names, want)
	}
}
