// Package handover keeps what the chained CNI plugin told the agent about
// pod sandboxes: the pods it handed over at ADD (with the sandbox's
// addresses, which the pod's status may not show yet) and the sandboxes DEL
// tore down. The controller decides pods with these facts on top of the
// caches' objects.
//
// Hazards it handles:
//   - a pod recreated under the same name (new UID) while the cache still
//     holds the old object: the object ADD looked up stands in for it until
//     the cache catches up;
//   - a status that still shows an earlier sandbox's addresses: the
//     sandbox's addresses win while the UID matches;
//   - a pod that is gone: what CNI said about it is forgotten, unless the
//     pod (that UID) arrived in the cache since the caller listed.
package handover

import (
	"iter"
	"maps"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
)

// Sandbox is what CNI told us about a pod's sandbox.
type Sandbox struct {
	UID         types.UID
	ContainerID string
	IPs         []netip.Addr
	// Pod is the object a GET returned when the cache had not seen it.
	Pod *corev1.Pod
	// Deleted: DEL came for the sandbox; nothing is captured until ADD.
	Deleted bool
	// NetNS is the sandbox's netns path, as the runtime gave it.
	NetNS string
}

// Store holds the handed-over pods by namespace/name. It does no locking:
// the controller serialises every call under its own lock.
type Store struct {
	m map[string]Sandbox
}

// New is an empty store.
func New() *Store { return &Store{m: map[string]Sandbox{}} }

// Len is the number of pods the store knows.
func (s *Store) Len() int { return len(s.m) }

// Keys are the pods (namespace/name) the store knows. Resolve may forget
// keys while they are iterated.
func (s *Store) Keys() iter.Seq[string] { return maps.Keys(s.m) }

// Get is what CNI said about the pod key.
func (s *Store) Get(key string) (Sandbox, bool) {
	sb, ok := s.m[key]
	return sb, ok
}

// Snapshot is a copy of the store's facts, for a decision made without
// the controller's lock.
func (s *Store) Snapshot() map[string]Sandbox { return maps.Clone(s.m) }

// Add records an ADD: the pod key's sandbox is sb.
func (s *Store) Add(key string, sb Sandbox) { s.m[key] = sb }

// Del records a DEL of the pod key's sandbox containerID ("": whichever)
// and reports whether the pod must be decided again: whenever the store
// knows it, or now records it. A pod the store does
// not know is recorded as deleted when DEL names its UID: a sandbox set up
// before the plugin (or before this agent started) takes its addresses
// with it.
func (s *Store) Del(key, containerID string, uid types.UID) bool {
	e, ok := s.m[key]
	switch {
	case ok && (containerID == "" || e.ContainerID == containerID):
		e.Deleted, e.IPs, e.Pod = true, nil, nil
		s.m[key] = e
	case !ok && uid != "":
		s.m[key] = Sandbox{UID: uid, ContainerID: containerID, Deleted: true}
		ok = true
	}
	return ok
}

// Resolve is the pod to decide for key, given the cache's answer (p,
// err): the object CNI ADD looked up when the cache has not seen that pod
// (UID) yet. It forgets what CNI said about a pod that is gone; lookup is
// the cache's current answer for the pod (it may have arrived since the
// caller listed), nil when there is no cache.
func (s *Store) Resolve(key string, p *corev1.Pod, err error, lookup func(ns, name string) (*corev1.Pod, error)) (*corev1.Pod, error) {
	cp, ok := s.m[key]
	if !ok {
		return p, err
	}
	switch {
	case err == nil && p.UID == cp.UID:
		if cp.Pod != nil {
			cp.Pod = nil // the cache has it now
			s.m[key] = cp
		}
		return p, nil
	case cp.Pod != nil && (err == nil || apierrors.IsNotFound(err)):
		return cp.Pod, nil // the cache has an older pod of that name, or none yet
	case apierrors.IsNotFound(err):
		ns, name, _ := strings.Cut(key, "/")
		if lookup != nil {
			if cur, gerr := lookup(ns, name); gerr == nil && cur.UID == cp.UID {
				return cur, nil // it arrived since the caller listed
			}
		}
		delete(s.m, key) // the pod is gone
	}
	return p, err
}

// Apply applies what CNI said about p's sandbox: see Apply.
func (s *Store) Apply(p *corev1.Pod) (*corev1.Pod, bool, bool) { return Apply(p, s.m) }

// Apply applies what sandboxes (by namespace/name) say about p's sandbox:
// its addresses until the status has them, or that it is gone. It returns
// the pod to decide, whether CNI handed it over, and whether its sandbox
// was deleted.
func Apply(p *corev1.Pod, sandboxes map[string]Sandbox) (*corev1.Pod, bool, bool) {
	e, ok := sandboxes[p.Namespace+"/"+p.Name]
	if !ok || e.UID != p.UID {
		return p, false, false
	}
	if e.Deleted {
		return p, true, true
	}
	// The sandbox's addresses: a status may still show an earlier one's.
	return WithPodIPs(p, e.IPs), true, false
}

// NetNS is the netns path CNI gave for p's sandbox ("" unknown).
func NetNS(p *corev1.Pod, sandboxes map[string]Sandbox) string {
	e, ok := sandboxes[p.Namespace+"/"+p.Name]
	if !ok || e.UID != p.UID || e.Deleted {
		return ""
	}
	return e.NetNS
}

// NetNS is NetNS over the store's sandboxes.
func (s *Store) NetNS(p *corev1.Pod) string { return NetNS(p, s.m) }

// WithPodIPs is a copy of p with ips as its status addresses.
func WithPodIPs(p *corev1.Pod, ips []netip.Addr) *corev1.Pod {
	cp := *p
	cp.Status.PodIPs = nil
	for _, a := range ips {
		cp.Status.PodIPs = append(cp.Status.PodIPs, corev1.PodIP{IP: a.String()})
	}
	if len(ips) > 0 {
		cp.Status.PodIP = ips[0].String()
	}
	return &cp
}
