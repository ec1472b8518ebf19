package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/util/retry"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
)

// TestServiceCIDRs runs the agent against the real kube-apiserver under the
// RBAC of manifests/: the ServiceCIDR the API server makes from
// --service-cluster-ip-range ("kubernetes") and --service-cidr are the
// desired Service CIDRs, and creating, deleting (held by a finalizer: being
// deleted) and removing another ServiceCIDR changes them at once, with no
// resync. Under RBAC without servicecidrs the agent is ready all the same,
// with the flag's alone and the reason shown.
func TestServiceCIDRs(t *testing.T) {
	ctx := context.Background()
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	cidrs := e.Client.NetworkingV1().ServiceCIDRs()
	const flagCIDR = "10.250.0.0/24"
	const extraCIDR = "10.97.0.0/24"

	harness.Eventually(t, 30*time.Second, func() error {
		sc, err := cidrs.Get(ctx, "kubernetes", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !slices.Equal(sc.Spec.CIDRs, []string{cluster.ServiceClusterIPRange}) {
			return fmt.Errorf("the default ServiceCIDR holds %v, want [%s]", sc.Spec.CIDRs, cluster.ServiceClusterIPRange)
		}
		return nil
	})

	// An hour's resync: every change below is seen through the informer.
	// The flag's value is given unmasked: it is shown masked.
	e.StartAgent(t, n, "--resync-period", "1h", "--service-cidr", "10.250.0.1/24")
	// serviceCIDRs waits until /debug/state shows want (sorted as the agent
	// sorts) from source.
	serviceCIDRs := func(t *testing.T, within time.Duration, source string, want ...string) {
		t.Helper()
		harness.Eventually(t, within, func() error {
			st := e.State(t, n)
			got := make([]string, len(st.ServiceCIDRs))
			for i, p := range st.ServiceCIDRs {
				got[i] = p.String()
			}
			if !slices.Equal(got, want) || !strings.HasPrefix(st.ServiceCIDRSource, source) {
				return fmt.Errorf("serviceCIDRs %v from %q, want %v from %q...", got, st.ServiceCIDRSource, want, source)
			}
			if !st.Converged {
				return fmt.Errorf("not converged: %v %s", st.Diff, st.DiffError)
			}
			return nil
		})
	}
	const both = "ServiceCIDR objects + flag"

	t.Run("the default ServiceCIDR and the flag", func(t *testing.T) {
		serviceCIDRs(t, 5*time.Second, both, cluster.ServiceClusterIPRange, flagCIDR)
		if got := e.State(t, n).Config["serviceCIDR"]; fmt.Sprint(got) != "["+flagCIDR+"]" {
			t.Fatalf("config.serviceCIDR %v, want [%s]", got, flagCIDR)
		}
	})

	t.Run("a ServiceCIDR created, being deleted (still counts), removed", func(t *testing.T) {
		const hold = "e2e.ambient-redirect.io/hold"
		extra := &networkingv1.ServiceCIDR{
			ObjectMeta: metav1.ObjectMeta{Name: "e2e-extra", Finalizers: []string{hold}},
			Spec:       networkingv1.ServiceCIDRSpec{CIDRs: []string{extraCIDR}},
		}
		if _, err := cidrs.Create(ctx, extra, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		serviceCIDRs(t, 5*time.Second, both, cluster.ServiceClusterIPRange, extraCIDR, flagCIDR)

		if err := cidrs.Delete(ctx, extra.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		got, err := cidrs.Get(ctx, extra.Name, metav1.GetOptions{})
		if err != nil || got.DeletionTimestamp == nil {
			t.Fatalf("the held ServiceCIDR is not being deleted: %v %+v", err, got)
		}
		// Held, it still counts: Services may have addresses in it.
		time.Sleep(500 * time.Millisecond)
		serviceCIDRs(t, 5*time.Second, both, cluster.ServiceClusterIPRange, extraCIDR, flagCIDR)

		// Our finalizer goes; the object with it, unless the API server's
		// own (kept while Services use the range) still holds it.
		err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := cidrs.Get(ctx, extra.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			cur.Finalizers = slices.DeleteFunc(cur.Finalizers, func(f string) bool { return f == hold })
			_, err = cidrs.Update(ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		_, err = cidrs.Get(ctx, extra.Name, metav1.GetOptions{})
		t.Logf("after our finalizer went: %v", err)
		serviceCIDRs(t, 5*time.Second, both, cluster.ServiceClusterIPRange, flagCIDR)
	})

	t.Run("RBAC forbids ServiceCIDRs: ready, with the flag's alone", func(t *testing.T) {
		e.StopAgent(n)
		// The manifests' ClusterRole without its servicecidrs rule.
		b, err := os.ReadFile(filepath.Join("../../manifests", "rbac.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var role rbacv1.ClusterRole
		if err := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(string(b)), 4096).Decode(&role); err != nil || role.Kind != "ClusterRole" {
			t.Fatalf("manifests/rbac.yaml's first object: %v %s", err, role.Kind)
		}
		role.ObjectMeta = metav1.ObjectMeta{Name: "e2e-agent-without-servicecidrs"}
		dropped := len(role.Rules)
		role.Rules = slices.DeleteFunc(role.Rules, func(r rbacv1.PolicyRule) bool { return slices.Contains(r.Resources, "servicecidrs") })
		if dropped == len(role.Rules) {
			t.Fatal("manifests/rbac.yaml grants no servicecidrs")
		}
		const sa = "ambient-redirect-without-servicecidrs"
		binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role.Name},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: "kube-system"}}}
		if _, err := e.Client.RbacV1().ClusterRoles().Create(ctx, &role, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		kc := e.KC
		e.KC = e.CP.Kubeconfig(t, e.CP.ServiceAccountToken(t, "kube-system", sa))
		t.Cleanup(func() { e.KC = kc })
		start := time.Now()
		e.StartAgent(t, n, "--service-cidr", flagCIDR) // waits for /readyz
		t.Logf("ready %s after start", time.Since(start).Round(time.Millisecond))
		serviceCIDRs(t, 5*time.Second, "flag (ServiceCIDR API forbidden: ", flagCIDR)
		if c := strings.Count(n.Agent.Log(), "not watching ServiceCIDR objects"); c != 1 {
			t.Fatalf("the reason was logged %d times, want once:\n%s", c, n.Agent.Log())
		}
		t.Logf("source: %s", e.State(t, n).ServiceCIDRSource)

		// The objects are not read: a new one changes nothing.
		other := &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: "e2e-unseen"}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: []string{"10.98.0.0/24"}}}
		if _, err := cidrs.Create(ctx, other, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		if got := e.State(t, n).ServiceCIDRs; !slices.Equal(got, []netip.Prefix{netip.MustParsePrefix(flagCIDR)}) {
			t.Fatalf("serviceCIDRs %v, want the flag's alone", got)
		}
	})
}
