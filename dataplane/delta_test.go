package dataplane

import (
	"slices"
	"strings"
	"testing"
)

func TestDeltaTracker(t *testing.T) {
	tr := newDeltaTracker(func(a, b *string) bool { return *a == *b }, strings.Compare)
	v := func(s string) *string { return &s }
	check := func(step string, updates, deletes []string) {
		t.Helper()
		if got := tr.PendingUpdates(); !slices.Equal(got, updates) {
			t.Fatalf("%s: updates %v, want %v", step, got, updates)
		}
		if got := tr.PendingDeletes(); !slices.Equal(got, deletes) {
			t.Fatalf("%s: deletes %v, want %v", step, got, deletes)
		}
	}
	tr.ReplaceActual(map[string]*string{"a": v("1"), "b": v("2"), "stale": v("x")})
	tr.ReplaceDesired(map[string]*string{"a": v("1"), "b": v("3"), "c": v("4")})
	check("after read-back", []string{"b", "c"}, []string{"stale"})
	if a, _ := tr.Actual("a"); a != tr.desired["a"] {
		t.Fatal("an actual value equal to the desired one is not shared")
	}
	tr.Written("b", tr.desired["b"])
	tr.Removed("stale")
	check("after writes", []string{"c"}, nil)
	tr.DeleteDesired("a")
	tr.SetDesired("d", v("5"))
	check("desired changes", []string{"c", "d"}, []string{"a"})
	tr.SetDesired("a", v("1"))
	check("desired back", []string{"c", "d"}, nil)
	c := tr.clone()
	c.Written("c", v("4"))
	check("a clone's writes do not leak", []string{"c", "d"}, nil)
}
