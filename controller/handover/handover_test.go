package handover

import (
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func pod(uid types.UID, ips ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "p", UID: uid}}
	for _, a := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: a})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, a := range s {
		out = append(out, netip.MustParseAddr(a))
	}
	return out
}

var notFound = apierrors.NewNotFound(corev1.Resource("pods"), "apps/p")

// TestDel: DEL marks a known sandbox deleted (the container ID must match
// when given), records an unknown one only when it names a UID, and says
// whether the pod must be decided again.
func TestDel(t *testing.T) {
	added := Sandbox{UID: "u1", ContainerID: "c1", IPs: addrs("10.0.0.1"), Pod: pod("u1")}
	for _, tc := range []struct {
		name             string
		before           map[string]Sandbox
		containerID, uid string
		wantRequeue      bool
		want             map[string]Sandbox
	}{
		{"known, same container", map[string]Sandbox{"apps/p": added}, "c1", "u1", true,
			map[string]Sandbox{"apps/p": {UID: "u1", ContainerID: "c1", Deleted: true}}},
		{"known, any container", map[string]Sandbox{"apps/p": added}, "", "", true,
			map[string]Sandbox{"apps/p": {UID: "u1", ContainerID: "c1", Deleted: true}}},
		{"known, an older container: kept, decided again", map[string]Sandbox{"apps/p": added}, "c0", "u1", true,
			map[string]Sandbox{"apps/p": added}},
		{"unknown, with a UID: predates the plugin", map[string]Sandbox{}, "c1", "u1", true,
			map[string]Sandbox{"apps/p": {UID: "u1", ContainerID: "c1", Deleted: true}}},
		{"unknown, no UID", map[string]Sandbox{}, "c1", "", false, map[string]Sandbox{}},
	} {
		s := &Store{m: tc.before}
		if got := s.Del("apps/p", tc.containerID, types.UID(tc.uid)); got != tc.wantRequeue {
			t.Errorf("%s: Del = %v, want %v", tc.name, got, tc.wantRequeue)
		}
		if !reflect.DeepEqual(s.m, tc.want) {
			t.Errorf("%s: store %+v, want %+v", tc.name, s.m, tc.want)
		}
	}
}

// TestResolve: which object is decided for a handed-over pod, given the
// cache's answer, and when the store forgets it.
func TestResolve(t *testing.T) {
	looked := pod("u-new") // what ADD's GET returned
	cachedOld, cachedNew := pod("u-old", "10.0.0.1"), pod("u-new", "10.0.0.2")
	otherErr := errors.New("cache broken")
	for _, tc := range []struct {
		name      string
		stored    *Sandbox // nil: nothing handed over
		p         *corev1.Pod
		err       error
		lookup    func(ns, name string) (*corev1.Pod, error)
		wantPod   *corev1.Pod
		wantErr   error
		wantKept  bool
		wantNoGet bool // the stored GET object is dropped: the cache has the pod
	}{
		{name: "not handed over", p: cachedOld, wantPod: cachedOld},
		{name: "not handed over, not found", err: notFound, wantErr: notFound},
		{name: "cache has that UID", stored: &Sandbox{UID: "u-new", Pod: looked}, p: cachedNew, wantPod: cachedNew, wantKept: true, wantNoGet: true},
		{name: "cache has an older pod of that name", stored: &Sandbox{UID: "u-new", Pod: looked}, p: cachedOld, wantPod: looked, wantKept: true},
		{name: "cache has none yet", stored: &Sandbox{UID: "u-new", Pod: looked}, err: notFound, wantPod: looked, wantKept: true},
		{name: "cache error keeps the error", stored: &Sandbox{UID: "u-new", Pod: looked}, err: otherErr, wantErr: otherErr, wantKept: true},
		{name: "gone", stored: &Sandbox{UID: "u-new"}, err: notFound, wantErr: notFound},
		{name: "gone, no cache", stored: &Sandbox{UID: "u-new"}, err: notFound, lookup: nil, wantErr: notFound},
		{name: "arrived since the list", stored: &Sandbox{UID: "u-new"}, err: notFound,
			lookup: func(string, string) (*corev1.Pod, error) { return cachedNew, nil }, wantPod: cachedNew, wantKept: true},
		{name: "another UID arrived since the list", stored: &Sandbox{UID: "u-new"}, err: notFound,
			lookup: func(string, string) (*corev1.Pod, error) { return cachedOld, nil }, wantErr: notFound},
		{name: "stale UID in the cache, no GET object", stored: &Sandbox{UID: "u-new"}, p: cachedOld, wantPod: cachedOld, wantKept: true},
	} {
		s := New()
		if tc.stored != nil {
			s.Add("apps/p", *tc.stored)
		}
		got, err := s.Resolve("apps/p", tc.p, tc.err, tc.lookup)
		if got != tc.wantPod || !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
			t.Errorf("%s: Resolve = %v, %v; want %v, %v", tc.name, got, err, tc.wantPod, tc.wantErr)
		}
		if tc.stored == nil {
			continue
		}
		sb, kept := s.Get("apps/p")
		if kept != tc.wantKept {
			t.Errorf("%s: kept %v, want %v", tc.name, kept, tc.wantKept)
		}
		if kept && tc.wantNoGet != (sb.Pod == nil && tc.stored.Pod != nil) {
			t.Errorf("%s: stored GET object %v", tc.name, sb.Pod)
		}
	}
}

// TestApply: the sandbox's addresses replace the status's while the UID
// matches; a deleted sandbox is reported; other pods pass unchanged.
func TestApply(t *testing.T) {
	facts := map[string]Sandbox{
		"apps/p":    {UID: "u1", IPs: addrs("10.0.0.9", "fd00::9")},
		"apps/gone": {UID: "u2", Deleted: true},
	}
	for _, tc := range []struct {
		name                string
		p                   *corev1.Pod
		wantIPs             []string
		viaCNI, wantDeleted bool
	}{
		{"handed over: the sandbox's addresses", pod("u1", "10.0.0.1"), []string{"10.0.0.9", "fd00::9"}, true, false},
		{"same name, other UID", pod("u-other", "10.0.0.1"), []string{"10.0.0.1"}, false, false},
		{"deleted sandbox", func() *corev1.Pod { p := pod("u2", "10.0.0.2"); p.Name = "gone"; return p }(), []string{"10.0.0.2"}, true, true},
		{"never handed over", func() *corev1.Pod { p := pod("u3", "10.0.0.3"); p.Name = "q"; return p }(), []string{"10.0.0.3"}, false, false},
	} {
		before := tc.p.DeepCopy()
		got, via, deleted := Apply(tc.p, facts)
		var ips []string
		for _, a := range got.Status.PodIPs {
			ips = append(ips, a.IP)
		}
		if !slices.Equal(ips, tc.wantIPs) || got.Status.PodIP != tc.wantIPs[0] || via != tc.viaCNI || deleted != tc.wantDeleted {
			t.Errorf("%s: Apply = %v (podIP %s), %v, %v", tc.name, ips, got.Status.PodIP, via, deleted)
		}
		if !reflect.DeepEqual(tc.p, before) {
			t.Errorf("%s: the caller's pod was modified", tc.name)
		}
		s := &Store{m: facts}
		if g2, v2, d2 := s.Apply(tc.p); !reflect.DeepEqual(g2, got) || v2 != via || d2 != deleted {
			t.Errorf("%s: Store.Apply differs from Apply", tc.name)
		}
	}
}

// TestSnapshotIsACopy: a decision made from a snapshot does not see later
// changes, nor make any.
func TestSnapshotIsACopy(t *testing.T) {
	s := New()
	s.Add("apps/p", Sandbox{UID: "u1"})
	snap := s.Snapshot()
	s.Add("apps/q", Sandbox{UID: "u2"})
	delete(snap, "apps/p")
	if _, ok := snap["apps/q"]; ok || s.Len() != 2 {
		t.Fatalf("snapshot %v, store has %d", snap, s.Len())
	}
	var keys []string
	for k := range s.Keys() {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, []string{"apps/p", "apps/q"}) {
		t.Fatalf("keys %v", keys)
	}
}
