package controller

import (
	"context"
	"testing"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// TestAnnotator: the annotation reconciler alone, over a static pod cache
// and programmed set: a programmed pod gets "enabled", a pod no longer
// programmed loses it, an opt-out is never touched; a pod deleted before
// its patch is no error.
func TestAnnotator(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	named := func(name, anno string) *corev1.Pod {
		return pod(func(p *corev1.Pod) {
			p.Name, p.UID = name, types.UID("uid-"+name)
			if anno != "" {
				p.Annotations = map[string]string{selection.RedirectionAnno: anno}
			}
		})
	}
	pods := []*corev1.Pod{
		named("new", ""), // programmed, not annotated
		named("left", selection.RedirectionEnabled),       // annotated, no longer programmed
		named("in-place", selection.RedirectionEnabled),   // programmed and annotated
		named("opted-out", selection.RedirectionDisabled), // never touched
		named("plain", ""),   // neither
		named("deleted", ""), // programmed, gone from the API
	}
	client := fake.NewClientset()
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, p := range pods {
		if err := idx.Add(p); err != nil {
			t.Fatal(err)
		}
		if p.Name == "deleted" {
			continue
		}
		if _, err := client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	programmed := map[types.UID]bool{"uid-new": true, "uid-in-place": true, "uid-opted-out": true, "uid-deleted": true}
	a := newAnnotator(clientsetAPI{client}, zap.NewNop(), func() corelisters.PodLister { return corelisters.NewPodLister(idx) },
		func(uid types.UID) bool { return programmed[uid] })
	if err := a.sync(ctx); err != nil {
		t.Fatalf("sync: %v", err)
	}
	want := map[string]string{"new": selection.RedirectionEnabled, "left": "", "in-place": selection.RedirectionEnabled,
		"opted-out": selection.RedirectionDisabled, "plain": ""}
	check := func(step string) {
		t.Helper()
		for name, v := range want {
			p, err := client.CoreV1().Pods("apps").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Annotations[selection.RedirectionAnno]; got != v {
				t.Errorf("%s: %s annotated %q, want %q", step, name, got, v)
			}
		}
	}
	check("sync")
	patches := func() int {
		n := 0
		for _, act := range client.Actions() {
			if act.GetVerb() == "patch" {
				n++
			}
		}
		return n
	}
	if n := patches(); n != 3 { // new, left, deleted
		t.Errorf("%d patches, want 3", n)
	}

	// The loop: a kick makes a pass over what the cache says now.
	client.ClearActions()
	left, _, _ := idx.GetByKey("apps/left")
	cp := left.(*corev1.Pod).DeepCopy()
	cp.Annotations = nil
	_ = idx.Update(cp)
	programmed["uid-left"] = true
	want["left"] = selection.RedirectionEnabled
	go a.run(ctx)
	a.Kick()
	waitFor(t, "the kicked pass", func() bool {
		p, err := client.CoreV1().Pods("apps").Get(ctx, "left", metav1.GetOptions{})
		return err == nil && p.Annotations[selection.RedirectionAnno] == selection.RedirectionEnabled
	})
	check("kicked pass")
}
