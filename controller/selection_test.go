package controller

import (
	"testing"

	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube"
	"github.com/ambient-redirect/ambient-redirect/selection/kube/kubetest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The cases are built on kubetest's fixtures.
var (
	selOpts = kubetest.Options
	pod     = kubetest.Pod
	ns      = kubetest.Namespace
)

func TestMinimalPodKeepsWhatSelectionReads(t *testing.T) {
	now := metav1.Now()
	full := pod(func(p *corev1.Pod) {
		p.Labels = map[string]string{selection.DataplaneModeLabel: "ambient", "app": "x"}
		p.Annotations = map[string]string{selection.SidecarStatusAnno: `{"big":"json"}`, selection.RedirectionAnno: "enabled", "other": "dropped"}
		p.Spec.Containers = []corev1.Container{{Name: "c", Image: "img"}}
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, Message: "m"}, {Type: corev1.PodScheduled, Status: corev1.ConditionTrue}}
		p.Status.StartTime = &now
		p.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}
	})
	obj, err := minimalPod(full)
	if err != nil {
		t.Fatal(err)
	}
	min := obj.(*corev1.Pod)
	if len(min.Spec.Containers) != 0 || min.ManagedFields != nil || min.Annotations["other"] != "" || len(min.Status.Conditions) != 1 {
		t.Fatalf("not minimal: %+v", min)
	}
	ns := ns("apps", nil)
	for _, p := range []*corev1.Pod{full, min} {
		if ok, why := kube.Enrolled(p, ns, selOpts()); ok {
			t.Fatalf("sidecar pod enrolled (%s)", why)
		}
	}
	delete(full.Annotations, selection.SidecarStatusAnno)
	obj, _ = minimalPod(full)
	a, wa := kube.Enrolled(full, ns, selOpts())
	b, wb := kube.Enrolled(obj.(*corev1.Pod), ns, selOpts())
	if a != b || wa != wb || !kube.PodReady(obj.(*corev1.Pod)) || len(kube.PodIPs(obj.(*corev1.Pod))) != 1 {
		t.Fatalf("selection differs after minimising: %v/%s vs %v/%s", a, wa, b, wb)
	}
}
