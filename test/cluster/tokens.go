//go:build linux

package cluster

import (
	"context"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// NodeNameExtra is the userInfo extra key under which the apiserver exposes
// the node of a pod-bound ServiceAccount token (Kubernetes >= 1.32).
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// PodBoundToken returns a one-hour token of pod's ServiceAccount bound to
// pod (TokenRequest with boundObjectRef kind Pod), as kubelet projects it.
// It carries pod.Spec.NodeName as a claim and is valid while a pod of that
// name and UID exists. pod must be the stored object (its UID set).
func (cp *ControlPlane) PodBoundToken(t testing.TB, pod *corev1.Pod) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	expiry := int64(3600)
	tr, err := cp.admin.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: &expiry,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("cluster: token for serviceaccount %s/%s bound to pod %s: %v", pod.Namespace, sa, pod.Name, err)
	}
	return tr.Status.Token
}

// WhoAmI returns the user the apiserver authenticates token as (a
// SelfSubjectReview), extras included.
func (cp *ControlPlane) WhoAmI(t testing.TB, token string) authenticationv1.UserInfo {
	t.Helper()
	c, err := kubernetes.NewForConfig(cp.TokenConfig(token))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	r, err := c.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("cluster: SelfSubjectReview: %v", err)
	}
	return r.Status.UserInfo
}
