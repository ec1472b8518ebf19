package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambient-redirect/ambient-redirect/controller/handover"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube/kubetest"
)

var selOpts = kubetest.Options

// mk is a running pod ns/name with uid and addresses.
func mk(nsName, uid string, ips ...string) *corev1.Pod {
	ns, name, _ := strings.Cut(nsName, "/")
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid)},
		Spec:       corev1.PodSpec{NodeName: "n1"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, a := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: a})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}

func ztunnel(name, ip string) *corev1.Pod {
	p := mk("istio-system/"+name, "zt-"+name, ip)
	p.Labels = map[string]string{"app": "ztunnel"}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	return p
}

var namespaces = map[string]*corev1.Namespace{
	"apps":         {ObjectMeta: metav1.ObjectMeta{Name: "apps", Labels: map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient}}},
	"plain":        {ObjectMeta: metav1.ObjectMeta{Name: "plain"}},
	"istio-system": {ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}},
}

// TestBuild: the pure desired state over plain inputs: which pods are
// programmed with which addresses, every pod's status, and the ztunnel
// picked.
func TestBuild(t *testing.T) {
	type st struct {
		enrolled, viaCNI bool
		reason           string // "" : not checked
	}
	for _, tc := range []struct {
		name      string
		pods      []*corev1.Pod
		sandboxes map[string]handover.Sandbox
		// want are the programmed pods (namespace/name -> addresses), in order.
		want    []string
		wantIPs map[string][]string
		status  map[string]st
		ztunnel string
	}{
		{
			name:    "ambient namespace enrolled, plain not, in namespace/name order",
			pods:    []*corev1.Pod{mk("plain/r", "u3", "10.0.0.3"), mk("apps/b", "u2", "10.0.0.2"), mk("apps/a", "u1", "10.0.0.1")},
			want:    []string{"apps/a", "apps/b"},
			wantIPs: map[string][]string{"apps/a": {"10.0.0.1"}, "apps/b": {"10.0.0.2"}},
			status:  map[string]st{"apps/a": {enrolled: true}, "apps/b": {enrolled: true}, "plain/r": {enrolled: false}},
		},
		{
			name:    "no address yet: not enrolled",
			pods:    []*corev1.Pod{mk("apps/a", "u1")},
			status:  map[string]st{"apps/a": {enrolled: false, reason: selection.ReasonNoIP}},
			wantIPs: map[string][]string{},
		},
		{
			name:    "dual-stack addresses sorted",
			pods:    []*corev1.Pod{mk("apps/a", "u1", "fd00::1", "10.0.0.1")},
			want:    []string{"apps/a"},
			wantIPs: map[string][]string{"apps/a": {"10.0.0.1", "fd00::1"}},
			status:  map[string]st{"apps/a": {enrolled: true}},
		},
		{
			name:    "address claimed twice: the first by name keeps it, the other keeps the rest",
			pods:    []*corev1.Pod{mk("apps/b", "u2", "10.0.0.1", "fd00::2"), mk("apps/a", "u1", "10.0.0.1"), mk("apps/c", "u3", "10.0.0.1")},
			want:    []string{"apps/a", "apps/b"},
			wantIPs: map[string][]string{"apps/a": {"10.0.0.1"}, "apps/b": {"fd00::2"}},
			status:  map[string]st{"apps/a": {enrolled: true}, "apps/b": {enrolled: true}, "apps/c": {enrolled: true}},
		},
		{
			name: "handed over by CNI: the sandbox's address, won from a stale object that sorts first",
			pods: []*corev1.Pod{mk("apps/a-stale", "u-stale", "10.0.0.5"), mk("apps/b-fresh", "u-fresh")},
			sandboxes: map[string]handover.Sandbox{
				"apps/b-fresh": {UID: "u-fresh", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5")}},
			},
			want:    []string{"apps/b-fresh"},
			wantIPs: map[string][]string{"apps/b-fresh": {"10.0.0.5"}},
			status:  map[string]st{"apps/a-stale": {enrolled: true}, "apps/b-fresh": {enrolled: true, viaCNI: true}},
		},
		{
			name: "sandbox facts of another UID are ignored",
			pods: []*corev1.Pod{mk("apps/a", "u-new", "10.0.0.1")},
			sandboxes: map[string]handover.Sandbox{
				"apps/a": {UID: "u-old", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.9")}},
			},
			want:    []string{"apps/a"},
			wantIPs: map[string][]string{"apps/a": {"10.0.0.1"}},
			status:  map[string]st{"apps/a": {enrolled: true}},
		},
		{
			name:      "sandbox deleted: not enrolled",
			pods:      []*corev1.Pod{mk("apps/a", "u1", "10.0.0.1")},
			sandboxes: map[string]handover.Sandbox{"apps/a": {UID: "u1", Deleted: true}},
			wantIPs:   map[string][]string{},
			status:    map[string]st{"apps/a": {enrolled: false, viaCNI: true, reason: ReasonSandboxDeleted}},
		},
		{
			name:    "the ztunnel is picked, not programmed",
			pods:    []*corev1.Pod{ztunnel("ztunnel-a", "10.0.0.2"), mk("apps/a", "u1", "10.0.0.1")},
			want:    []string{"apps/a"},
			wantIPs: map[string][]string{"apps/a": {"10.0.0.1"}},
			status:  map[string]st{"apps/a": {enrolled: true}, "istio-system/ztunnel-a": {enrolled: false}},
			ztunnel: "istio-system/ztunnel-a",
		},
		{
			name:    "unknown namespace: not enrolled",
			pods:    []*corev1.Pod{mk("elsewhere/a", "u1", "10.0.0.1")},
			wantIPs: map[string][]string{},
			status:  map[string]st{"elsewhere/a": {enrolled: false}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := Build(Input{
				Pods: tc.pods, Sandboxes: tc.sandboxes, Selection: selOpts(), Log: zap.NewNop(),
				Namespace: func(name string) *corev1.Namespace { return namespaces[name] },
			})
			var names []string
			gotIPs := map[string][]string{}
			for _, p := range out.State.Pods {
				names = append(names, p.Name)
				for _, a := range p.IPs {
					gotIPs[p.Name] = append(gotIPs[p.Name], a.String())
				}
			}
			if !slices.Equal(names, tc.want) {
				t.Errorf("programmed %v, want %v", names, tc.want)
			}
			for k, want := range tc.wantIPs {
				if !slices.Equal(gotIPs[k], want) {
					t.Errorf("%s: addresses %v, want %v", k, gotIPs[k], want)
				}
			}
			if len(out.Entries) != len(tc.status) {
				t.Errorf("%d entries, want %d", len(out.Entries), len(tc.status))
			}
			for k, want := range tc.status {
				e, ok := out.Entries[k]
				switch {
				case !ok:
					t.Errorf("%s: no entry", k)
					continue
				case e.Status.Enrolled != want.enrolled || e.Status.ViaCNI != want.viaCNI || want.reason != "" && e.Status.Reason != want.reason:
					t.Errorf("%s: status %+v, want %+v", k, e.Status, want)
				}
				// An entry's Pod is what State programs for it.
				i := slices.Index(names, k)
				switch {
				case i < 0 && e.Pod != nil:
					t.Errorf("%s: entry holds %v, nothing programmed", k, e.Pod)
				case i >= 0 && e.Pod != &out.State.Pods[i]:
					t.Errorf("%s: entry does not point at the programmed pod", k)
				}
			}
			gotZt := ""
			if out.Ztunnel != nil {
				gotZt = out.Ztunnel.Namespace + "/" + out.Ztunnel.Name
			}
			if gotZt != tc.ztunnel {
				t.Errorf("ztunnel %q, want %q", gotZt, tc.ztunnel)
			}
			if out.State.Ztunnel != nil || len(out.State.Draining) > 0 {
				t.Errorf("Build located ztunnels: %+v", out.State)
			}
		})
	}
}

// TestPodEntry: a pod's status lists its addresses as the status gives
// them (PodIP when PodIPs is empty) and its annotation.
func TestPodEntry(t *testing.T) {
	none := func(p *corev1.Pod) (*corev1.Pod, bool, bool, string) { return p, false, false, "" }
	p := mk("apps/a", "u1")
	p.Status.PodIP = "10.0.0.1"
	p.Annotations = map[string]string{selection.RedirectionAnno: selection.RedirectionEnabled}
	e := PodEntry(p, namespaces["apps"], selOpts(), none)
	if !slices.Equal(e.Status.IPs, []string{"10.0.0.1"}) || e.Status.Annotation != selection.RedirectionEnabled || !e.Status.Enrolled || e.Pod == nil || e.Pod.Name != "apps/a" {
		t.Fatalf("entry %+v %+v", e.Status, e.Pod)
	}
}

// TestDedupeIPs: an address claimed twice stays with the first pod; the
// second keeps its other addresses, or goes when it has none left.
func TestDedupeIPs(t *testing.T) {
	a, b, c := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1"), netip.MustParseAddr("10.0.0.2")
	got := DedupeIPs([]dataplane.Pod{
		{Name: "first", IPs: []netip.Addr{a, b}},
		{Name: "second", IPs: []netip.Addr{c, a, b}},
		{Name: "third", IPs: []netip.Addr{a}},
	}, zap.NewNop())
	if len(got) != 2 || !slices.Equal(got[0].IPs, []netip.Addr{a, b}) || got[1].Name != "second" || !slices.Equal(got[1].IPs, []netip.Addr{c}) {
		t.Fatalf("dedupe: %+v", got)
	}
}

// TestServiceCIDRs: the union of the objects' CIDRs and the flag's, masked,
// sorted and deduplicated whatever the input order; an object being
// deleted still counts (Services may hold addresses in it until it goes).
func TestServiceCIDRs(t *testing.T) {
	now := metav1.Now()
	obj := func(name string, deleting bool, cidrs ...string) *networkingv1.ServiceCIDR {
		o := &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: cidrs}}
		if deleting {
			o.DeletionTimestamp = &now
		}
		return o
	}
	prefixes := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	objects := []*networkingv1.ServiceCIDR{
		obj("kubernetes", false, "10.96.0.0/16", "fd00:10:96::/112"),
		obj("extra", false, "10.100.0.0/24"),
		obj("going", true, "10.200.0.0/24"),
		obj("duplicate", false, "10.96.0.0/16"),
	}
	flag := prefixes("10.96.0.1/16", "192.168.0.0/24", "fd00:10:96::/112")
	want := prefixes("10.96.0.0/16", "10.100.0.0/24", "10.200.0.0/24", "192.168.0.0/24", "fd00:10:96::/112")
	if got := ServiceCIDRs(objects, flag); !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	slices.Reverse(objects)
	slices.Reverse(flag)
	if got := ServiceCIDRs(objects, flag); !slices.Equal(got, want) {
		t.Fatalf("reversed inputs: got %v, want %v", got, want)
	}
	if got := ServiceCIDRs(nil, prefixes("10.0.0.0/8")); !slices.Equal(got, prefixes("10.0.0.0/8")) {
		t.Fatalf("flag alone: got %v", got)
	}
	if got := ServiceCIDRs([]*networkingv1.ServiceCIDR{obj("going", true, "10.200.0.0/24")}, nil); !slices.Equal(got, prefixes("10.200.0.0/24")) {
		t.Fatalf("only an object being deleted: got %v, want it", got)
	}
	out := Build(Input{Selection: selOpts(), ServiceCIDRObjects: objects, FlagServiceCIDRs: flag})
	if !slices.Equal(out.State.ServiceCIDRs, want) {
		t.Fatalf("Build: got %v, want %v", out.State.ServiceCIDRs, want)
	}
}
