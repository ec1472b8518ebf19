package dataplane

// The delta tracker every per-object manager keeps: what is desired, what
// the kernel was last known to hold, and the difference still to write.
// Desired changes cost O(1) per object, so a pod event costs the same on a
// node of 10 pods and of 250; a read-back recomputes the difference in full.

import (
	"maps"
	"slices"
)

type deltaTracker[K comparable, V any] struct {
	equal   func(want, have V) bool
	compare func(a, b K) int // orders writes, so they are deterministic
	desired map[K]V
	// actual is the last read-back plus every write since.
	actual map[K]V
	// updates are desired values the kernel lacks or holds differently;
	// deletes are actual values nothing desires.
	updates map[K]V
	deletes map[K]V
}

func newDeltaTracker[K comparable, V any](equal func(want, have V) bool, compare func(a, b K) int) *deltaTracker[K, V] {
	return &deltaTracker[K, V]{equal: equal, compare: compare, desired: map[K]V{}, actual: map[K]V{}, updates: map[K]V{}, deletes: map[K]V{}}
}

// SetDesired makes k desired as v.
func (t *deltaTracker[K, V]) SetDesired(k K, v V) {
	t.desired[k] = v
	t.recompute(k)
}

// DeleteDesired makes k undesired.
func (t *deltaTracker[K, V]) DeleteDesired(k K) {
	delete(t.desired, k)
	t.recompute(k)
}

// ReplaceDesired makes m the whole desired state.
func (t *deltaTracker[K, V]) ReplaceDesired(m map[K]V) {
	t.desired = m
	t.recomputeAll()
}

// ReplaceActual records what a read-back found.
func (t *deltaTracker[K, V]) ReplaceActual(m map[K]V) {
	t.actual = m
	t.recomputeAll()
}

// Written records a successful write of k as v (v is now actual).
func (t *deltaTracker[K, V]) Written(k K, v V) {
	t.actual[k] = v
	t.recompute(k)
}

// Removed records a successful delete of k.
func (t *deltaTracker[K, V]) Removed(k K) {
	delete(t.actual, k)
	t.recompute(k)
}

// Actual returns what the kernel is known to hold for k.
func (t *deltaTracker[K, V]) Actual(k K) (V, bool) {
	v, ok := t.actual[k]
	return v, ok
}

// Desired returns the desired value of k.
func (t *deltaTracker[K, V]) Desired(k K) (V, bool) {
	v, ok := t.desired[k]
	return v, ok
}

// PendingUpdates are the keys to write, sorted (writes are deterministic).
func (t *deltaTracker[K, V]) PendingUpdates() []K {
	return slices.SortedFunc(maps.Keys(t.updates), t.compare)
}

// PendingDeletes are the keys to delete, sorted.
func (t *deltaTracker[K, V]) PendingDeletes() []K {
	return slices.SortedFunc(maps.Keys(t.deletes), t.compare)
}

// An actual value equal to the desired one is replaced by it: with pointer
// values, both states then share one object.
func (t *deltaTracker[K, V]) recompute(k K) {
	want, desired := t.desired[k]
	have, present := t.actual[k]
	delete(t.updates, k)
	delete(t.deletes, k)
	switch {
	case desired && (!present || !t.equal(want, have)):
		t.updates[k] = want
	case desired:
		t.actual[k] = want
	case present:
		t.deletes[k] = have
	}
}

func (t *deltaTracker[K, V]) recomputeAll() {
	clear(t.updates)
	clear(t.deletes)
	for k, want := range t.desired {
		if have, ok := t.actual[k]; !ok || !t.equal(want, have) {
			t.updates[k] = want
		} else {
			t.actual[k] = want
		}
	}
	for k, have := range t.actual {
		if _, ok := t.desired[k]; !ok {
			t.deletes[k] = have
		}
	}
}

// clone copies the tracker (a dry run works on a copy).
func (t *deltaTracker[K, V]) clone() *deltaTracker[K, V] {
	return &deltaTracker[K, V]{equal: t.equal, compare: t.compare, desired: maps.Clone(t.desired), actual: maps.Clone(t.actual),
		updates: maps.Clone(t.updates), deletes: maps.Clone(t.deletes)}
}

// IsPending reports k pending an update or a delete.
func (t *deltaTracker[K, V]) IsPending(k K) bool {
	_, u := t.updates[k]
	_, d := t.deletes[k]
	return u || d
}
