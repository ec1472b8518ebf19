// Package kubetest holds the selection options, pod and namespace the
// selection and controller tests build their cases on.
package kubetest

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// Options are node n1's: kube-system excluded, the ztunnels app=ztunnel in
// istio-system.
func Options() selection.Options {
	sel, _ := selection.ParseSelector("app=ztunnel")
	return selection.Options{NodeName: "n1", ExcludeNamespaces: []string{"kube-system"}, ZtunnelNamespace: "istio-system", ZtunnelSelector: sel}
}

// Pod is apps/p (UID u1) running on n1 with 10.244.1.5, changed by mut.
func Pod(mut ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "p", UID: "u1"},
		Spec:       corev1.PodSpec{NodeName: "n1"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.5", PodIPs: []corev1.PodIP{{IP: "10.244.1.5"}}},
	}
	for _, m := range mut {
		m(p)
	}
	return p
}

// Namespace is a namespace with labels.
func Namespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}
