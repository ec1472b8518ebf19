package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"

	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
)

// admissionPolicy is the ValidatingAdmissionPolicy (and binding) in
// manifests/admission.yaml; the apiserver names it in every denial.
const admissionPolicy = "ambient-redirect-node-scoped"

const agentSA = "ambient-redirect"

// TestAdmission runs both agents on pod-bound tokens under the policy of
// manifests/admission.yaml and shows what the policy lets such a token do:
// patch the redirection annotation of its own node's pods, nothing else.
func TestAdmission(t *testing.T) {
	T := t // agents outlive the subtest that starts them
	e := harness.New(t, 2, bins)
	n1, n2 := e.Nodes[0], e.Nodes[1]
	// The harness's agent token: the right ServiceAccount, no node claim.
	unbound := e.CP.ServiceAccountToken(t, "kube-system", agentSA)

	t.Run("kustomization lists every manifest; nothing turns off the pod-bound token", func(t *testing.T) {
		var k struct{ Resources []string }
		readYAML(t, "kustomization.yaml", &k)
		var files []string
		entries, err := os.ReadDir("../../manifests")
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range entries {
			if strings.HasSuffix(f.Name(), ".yaml") && f.Name() != "kustomization.yaml" {
				files = append(files, f.Name())
			}
		}
		sort.Strings(k.Resources)
		if !slices.Equal(k.Resources, files) {
			t.Errorf("kustomization resources %v, manifest files %v", k.Resources, files)
		}
		var ds appsv1.DaemonSet
		readYAML(t, "daemonset.yaml", &ds)
		var sa corev1.ServiceAccount
		readYAML(t, "serviceaccount.yaml", &sa)
		spec := ds.Spec.Template.Spec
		if spec.ServiceAccountName != sa.Name || sa.Namespace != ds.Namespace {
			t.Errorf("DaemonSet runs as %s/%s, the ServiceAccount is %s/%s", ds.Namespace, spec.ServiceAccountName, sa.Namespace, sa.Name)
		}
		// The node claim comes only with the projected token kubelet mounts.
		if a := spec.AutomountServiceAccountToken; a != nil && !*a {
			t.Error("DaemonSet disables the service account token")
		}
		if a := sa.AutomountServiceAccountToken; a != nil && !*a && spec.AutomountServiceAccountToken == nil {
			t.Error("ServiceAccount disables the service account token")
		}
		for _, c := range spec.Containers {
			for _, m := range c.VolumeMounts {
				if strings.HasPrefix(m.MountPath, "/var/run/secrets/kubernetes.io") {
					t.Errorf("container %s mounts over the token: %s", c.Name, m.MountPath)
				}
			}
		}
	})

	t.Run("RBAC grants the agent exactly the calls it makes", func(t *testing.T) {
		c := tokenClient(t, e, unbound)
		for _, ns := range []string{harness.AmbientNS, "kube-system"} {
			r, err := c.AuthorizationV1().SelfSubjectRulesReviews().Create(context.Background(),
				&authorizationv1.SelfSubjectRulesReview{Spec: authorizationv1.SelfSubjectRulesReviewSpec{Namespace: ns}}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, rule := range r.Status.ResourceRules {
				if selfReviewOnly(rule.APIGroups) {
					continue // every authenticated user may review itself
				}
				for _, g := range rule.APIGroups {
					for _, res := range rule.Resources {
						for _, v := range rule.Verbs {
							got = append(got, g+"/"+res+":"+v)
						}
					}
				}
			}
			sort.Strings(got)
			want := []string{"/namespaces:get", "/namespaces:list", "/namespaces:watch", "/pods:get", "/pods:list", "/pods:patch", "/pods:watch",
				"networking.k8s.io/servicecidrs:list", "networking.k8s.io/servicecidrs:watch"}
			if !slices.Equal(got, want) {
				t.Errorf("namespace %s: agent may %v, want %v", ns, got, want)
			}
		}
	})

	dir := t.TempDir()
	copyManifest(t, "admission.yaml", dir)
	t.Run("the policy passes a server-side dry run", func(t *testing.T) {
		if err := e.CP.ApplyManifestsDryRun(t, dir); err != nil {
			t.Fatal(err)
		}
		_, err := e.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(context.Background(), admissionPolicy, metav1.GetOptions{})
		if !apierrors.IsNotFound(err) {
			t.Fatalf("dry run persisted the policy (or get failed): %v", err)
		}
	})
	if err := e.CP.ApplyManifests(t, dir); err != nil {
		t.Fatal(err)
	}

	a1 := e.RunPod(t, n1, harness.AmbientNS, "a1")
	a2 := e.RunPod(t, n1, harness.AmbientNS, "a2")
	optout := e.RunPod(t, n1, harness.AmbientNS, "optout", harness.WithAnnotations(selection.RedirectionAnno, selection.RedirectionDisabled))
	b1 := e.RunPod(t, n2, harness.AmbientNS, "b1")

	// One "agent pod" per node, as the DaemonSet would run; its bound token
	// is what kubelet would project into it.
	tokens := map[*harness.Node]string{}
	for _, n := range e.Nodes {
		p, err := e.Client.CoreV1().Pods("kube-system").Create(context.Background(), &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "ambient-redirect-" + n.Name},
			Spec: corev1.PodSpec{NodeName: n.Name, ServiceAccountName: agentSA, HostNetwork: true,
				Containers: []corev1.Container{{Name: "agent", Image: "ambient-redirect"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		tokens[n] = e.CP.PodBoundToken(t, p)
		ui := e.CP.WhoAmI(t, tokens[n])
		if ui.Username != "system:serviceaccount:kube-system:"+agentSA || !slices.Equal(ui.Extra[cluster.NodeNameExtra], []string{n.Name}) {
			t.Fatalf("bound token authenticates as %s with %s=%v, want node %s", ui.Username, cluster.NodeNameExtra, ui.Extra[cluster.NodeNameExtra], n.Name)
		}
	}
	if ui := e.CP.WhoAmI(t, unbound); len(ui.Extra[cluster.NodeNameExtra]) != 0 {
		t.Fatalf("unbound token carries a node: %v", ui.Extra)
	}
	c1 := tokenClient(t, e, tokens[n1])
	// The apiserver enforces the policy once its admission informers have it.
	harness.Eventually(t, 15*time.Second, func() error {
		err := patchPod(c1, b1, annotation(selection.RedirectionEnabled), true)
		if err == nil || !strings.Contains(err.Error(), admissionPolicy) || !strings.Contains(err.Error(), "is on node") {
			return fmt.Errorf("policy not enforced yet: %v", err)
		}
		return nil
	})

	t.Run("agents on pod-bound tokens converge, annotate and un-annotate", func(t *testing.T) {
		for _, n := range e.Nodes {
			e.KC = e.CP.Kubeconfig(T, tokens[n])
			e.StartAgent(T, n)
		}
		harness.Eventually(t, 10*time.Second, func() error {
			for _, p := range []*harness.Pod{a1, a2, b1} {
				if a := e.Annotation(t, p); a != selection.RedirectionEnabled {
					return fmt.Errorf("%s annotation %q", p.Obj.Name, a)
				}
			}
			if st := e.State(t, n1); !st.Converged || st.Enrolled != 2 {
				return fmt.Errorf("node1 converged=%v enrolled=%d", st.Converged, st.Enrolled)
			}
			if st := e.State(t, n2); !st.Converged || st.Enrolled != 1 {
				return fmt.Errorf("node2 converged=%v enrolled=%d", st.Converged, st.Enrolled)
			}
			return nil
		})
		if err := harness.Captured(t, n1.ZT, 15001, a1, a2); err != nil {
			t.Fatal(err)
		}
		// Removing "enabled" is allowed too: opt a2 out.
		if err := patchPod(e.Client, a2, map[string]any{"metadata": map[string]any{"labels": map[string]any{
			selection.DataplaneModeLabel: selection.DataplaneModeNone}}}, false); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 10*time.Second, func() error {
			if a := e.Annotation(t, a2); a != "" {
				return fmt.Errorf("a2 annotation %q after opt-out", a)
			}
			return nil
		})
		if a := e.Annotation(t, optout); a != selection.RedirectionDisabled {
			t.Fatalf("opt-out annotation %q", a)
		}
		for _, n := range e.Nodes {
			if log := n.Agent.Log(); strings.Contains(log, admissionPolicy) {
				t.Fatalf("agent on %s was denied:\n%s", n.Name, log)
			}
		}
	})

	t.Run("the bound token may change nothing else", func(t *testing.T) {
		// Positive control: its own pod's annotation (dry run, so the agent
		// sees no change).
		if err := patchPod(c1, a1, annotation(nil), true); err != nil {
			t.Fatalf("removing the annotation on its own node's pod: %v", err)
		}
		meta := func(m map[string]any) map[string]any { return map[string]any{"metadata": m} }
		for _, tc := range []struct {
			name  string
			pod   *harness.Pod
			patch map[string]any
			want  string
		}{
			{"remove the annotation of the other node's pod", b1, annotation(nil), `pod apps/b1 is on node "` + n2.Name + `", but the token is bound to node "` + n1.Name + `"`},
			{"set the annotation of the other node's pod", b1, annotation(selection.RedirectionEnabled), "is on node"},
			{"add a label", a1, meta(map[string]any{"labels": map[string]any{"app": "x"}}), "may not change a pod's labels"},
			{"remove the opt-out label", a2, meta(map[string]any{"labels": map[string]any{selection.DataplaneModeLabel: nil}}), "may not change a pod's labels"},
			{"the annotation together with a label", a1, meta(map[string]any{"labels": map[string]any{"app": "x"},
				"annotations": map[string]any{selection.RedirectionAnno: nil}}), "may not change a pod's labels"},
			{"add another annotation", a1, meta(map[string]any{"annotations": map[string]any{"example.com/x": "y"}}), "may change no annotation but"},
			{"write another value", a1, annotation(selection.RedirectionDisabled), `may only set ambient.istio.io/redirection to "enabled"`},
			{"remove a user's opt-out", optout, annotation(nil), `may only set ambient.istio.io/redirection to "enabled"`},
			{"change the spec", a1, map[string]any{"spec": map[string]any{"activeDeadlineSeconds": 60}}, "may not change a pod's spec"},
			{"add a finalizer", a1, meta(map[string]any{"finalizers": []string{"example.com/keep"}}), "ownerReferences or finalizers"},
		} {
			before := getPod(t, e, tc.pod)
			err := patchPod(c1, tc.pod, tc.patch, false)
			if err == nil {
				t.Errorf("%s: allowed", tc.name)
			} else if !strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+admissionPolicy+"'") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: %v; want a denial by %s containing %q", tc.name, err, admissionPolicy, tc.want)
			} else {
				t.Logf("%s: %v", tc.name, err)
			}
			if after := getPod(t, e, tc.pod); after.ResourceVersion != before.ResourceVersion {
				t.Errorf("%s: pod changed", tc.name)
			}
		}
	})

	t.Run("without a node claim the ServiceAccount may change nothing", func(t *testing.T) {
		err := patchPod(tokenClient(t, e, unbound), a1, annotation(nil), false)
		if err == nil || !strings.Contains(err.Error(), admissionPolicy) || !strings.Contains(err.Error(), "no node claim") {
			t.Fatalf("unbound token: %v; want a denial for the missing node claim", err)
		}
		if a := e.Annotation(t, a1); a != selection.RedirectionEnabled {
			t.Fatalf("a1 annotation %q", a)
		}
	})

	t.Run("the policy, not only RBAC, denies create, delete, update and subresources", func(t *testing.T) {
		// Grant far more than the agent has, so a denial must be the policy's.
		ctx := context.Background()
		role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "e2e-agent-extra"}, Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"pods", "pods/status", "pods/eviction"},
				Verbs: []string{"get", "create", "update", "patch", "delete"}},
		}}
		binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "e2e-agent-extra"},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: agentSA, Namespace: "kube-system"}}}
		if _, err := e.Client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = e.Client.RbacV1().ClusterRoleBindings().Delete(ctx, binding.Name, metav1.DeleteOptions{})
			_ = e.Client.RbacV1().ClusterRoles().Delete(ctx, role.Name, metav1.DeleteOptions{})
		})
		victim := e.RunPod(t, n1, harness.PlainNS, "victim")
		pods := c1.CoreV1().Pods(harness.PlainNS)
		for _, tc := range []struct {
			name string
			do   func() error
			want string
		}{
			{"delete its own node's pod", func() error { return pods.Delete(ctx, victim.Obj.Name, metav1.DeleteOptions{}) }, "DELETE of pods is not allowed"},
			{"delete the other node's pod", func() error {
				return c1.CoreV1().Pods(harness.AmbientNS).Delete(ctx, b1.Obj.Name, metav1.DeleteOptions{})
			}, "DELETE of pods is not allowed"},
			{"write status", func() error {
				return patchPod(c1, victim, map[string]any{"status": map[string]any{"message": "x"}}, false, "status")
			}, "UPDATE of pods/status is not allowed"},
			{"evict", func() error {
				return pods.EvictV1(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: victim.Obj.Name, Namespace: harness.PlainNS}})
			}, "CREATE of pods/eviction is not allowed"},
			{"create a pod on its node", func() error {
				_, err := pods.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "planted"},
					Spec: corev1.PodSpec{NodeName: n1.Name, Containers: []corev1.Container{{Name: "c", Image: "x"}}}}, metav1.CreateOptions{})
				return err
			}, "CREATE of pods is not allowed"},
			{"update (PUT) its own node's pod with a new label", func() error {
				p, err := pods.Get(ctx, victim.Obj.Name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				p.Labels = map[string]string{"app": "x"}
				_, err = pods.Update(ctx, p, metav1.UpdateOptions{})
				return err
			}, "may not change a pod's labels"},
		} {
			// RBAC's caches take the new binding shortly; until then a
			// denial is RBAC's.
			harness.Eventually(t, 10*time.Second, func() error {
				err := tc.do()
				if err == nil {
					t.Fatalf("%s: allowed", tc.name)
				}
				if !strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+admissionPolicy+"'") {
					return fmt.Errorf("%s: %v", tc.name, err)
				}
				if !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("%s: %v; want %q", tc.name, err, tc.want)
				}
				t.Logf("%s: %v", tc.name, err)
				return nil
			})
		}
		if _, err := e.Client.CoreV1().Pods(harness.PlainNS).Get(ctx, victim.Obj.Name, metav1.GetOptions{}); err != nil {
			t.Fatalf("victim: %v", err)
		}
	})
}

func readYAML(t *testing.T, name string, into any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../../manifests", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := utilyaml.Unmarshal(b, into); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func copyManifest(t *testing.T, name, dir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../../manifests", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func selfReviewOnly(groups []string) bool {
	for _, g := range groups {
		if g != "authorization.k8s.io" && g != "authentication.k8s.io" {
			return false
		}
	}
	return len(groups) > 0
}

func tokenClient(t *testing.T, e *harness.Env, token string) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(e.CP.TokenConfig(token))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// annotation is the agent's merge patch: value "enabled", or nil to remove.
func annotation(value any) map[string]any {
	return map[string]any{"metadata": map[string]any{"annotations": map[string]any{selection.RedirectionAnno: value}}}
}

func patchPod(c kubernetes.Interface, p *harness.Pod, patch map[string]any, dryRun bool, subresources ...string) error {
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	opts := metav1.PatchOptions{}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	_, err = c.CoreV1().Pods(p.Obj.Namespace).Patch(context.Background(), p.Obj.Name, types.MergePatchType, b, opts, subresources...)
	return err
}

func getPod(t *testing.T, e *harness.Env, p *harness.Pod) *corev1.Pod {
	t.Helper()
	got, err := e.Client.CoreV1().Pods(p.Obj.Namespace).Get(context.Background(), p.Obj.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got
}
