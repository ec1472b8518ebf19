package controller

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/ambient-redirect/ambient-redirect/controller/desired"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// The status model: what /debug/state and the CNI handler read of the
// controller, and the drift accounting.

// PodStatus is one pod's selection outcome.
type PodStatus = desired.PodStatus

// ZtunnelStatus is the active ztunnel.
type ZtunnelStatus struct {
	Pod      string `json:"pod"`
	IP       string `json:"ip"`
	HostVeth string `json:"hostVeth"`
	NetNS    string `json:"netns"`
	Error    string `json:"error,omitempty"`
}

// SyncStatus describes the last sync.
type SyncStatus struct {
	Time     time.Time      `json:"time"`
	Duration string         `json:"duration"`
	Writes   map[string]int `json:"writes"`
	Changes  []string       `json:"changes,omitempty"`
	Error    string         `json:"error,omitempty"`
}

// Status is the controller's view, for the debug endpoint.
type Status struct {
	Synced        bool           `json:"cachesSynced"`
	FirstSyncDone bool           `json:"firstSyncDone"`
	Ztunnel       *ZtunnelStatus `json:"ztunnel"`
	Draining      []string       `json:"draining,omitempty"`
	Pods          []PodStatus    `json:"pods"`
	LastSync      *SyncStatus    `json:"lastSync,omitempty"`
	LastSuccess   time.Time      `json:"lastSuccess"`
	PendingSince  *time.Time     `json:"pendingSince,omitempty"`
	DriftRepairs  map[string]int `json:"driftRepairs"`
	Syncs         int            `json:"syncs"`
	Failures      int            `json:"failures"`
	// ServiceCIDRs are the last full sync's; ServiceCIDRSource says where
	// they come from (serviceCIDRSource).
	ServiceCIDRs      []netip.Prefix `json:"serviceCIDRs"`
	ServiceCIDRSource string         `json:"serviceCIDRSource"`
}

// Status returns a copy of the controller's status.
func (c *Controller) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.summary()
	s.Pods = make([]PodStatus, 0, len(c.pods))
	for _, e := range c.pods {
		s.Pods = append(s.Pods, e.Status)
	}
	slices.SortFunc(s.Pods, func(a, b PodStatus) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return s
}

// Summary is Status without the pods: what the health and readiness
// probes read, at a cost (and a hold on the sync loop's lock) that does
// not grow with the node's pods.
func (c *Controller) Summary() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.summary()
}

// summary is Status without the pods. Called with c.mu held.
func (c *Controller) summary() Status {
	s := c.status
	s.DriftRepairs = map[string]int{}
	for k, v := range c.status.DriftRepairs {
		s.DriftRepairs[k] = v
	}
	if !c.pendingSince.IsZero() {
		t := c.pendingSince
		s.PendingSince = &t
	}
	s.ServiceCIDRs = slices.Clone(c.wantBase.ServiceCIDRs)
	return s
}

// LastDesired returns the desired state of the last sync (nil before it).
func (c *Controller) LastDesired() *dataplane.State {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pods == nil {
		return nil
	}
	st := c.stateOf(c.wantBase)
	return &st
}

// stateOf is st (wantBase) with the pods of the last sync, in the order
// desired() gives them. Called with c.mu held.
func (c *Controller) stateOf(st dataplane.State) dataplane.State {
	var es []podEntry
	for _, e := range c.pods {
		if e.Pod != nil {
			es = append(es, e)
		}
	}
	slices.SortFunc(es, func(a, b podEntry) int { // desired()'s order
		return cmp.Or(strings.Compare(a.Status.Namespace, b.Status.Namespace), strings.Compare(a.Status.Name, b.Status.Name))
	})
	for _, e := range es {
		st.Pods = append(st.Pods, *e.Pod)
	}
	for _, e := range c.pods {
		if e.Sidecar != nil {
			st.Sidecars = append(st.Sidecars, *e.Sidecar)
		}
	}
	return st
}

// recordSync records a sync's outcome for the debug endpoint. Called
// with c.mu held.
func (c *Controller) recordSync(start time.Time, res dataplane.Result, err error) {
	ss := &SyncStatus{Time: start, Duration: time.Since(start).String(), Writes: res.Writes, Changes: res.Changes}
	if err != nil {
		ss.Error = err.Error()
		c.status.Failures++
	} else {
		c.status.LastSuccess = time.Now()
		c.status.FirstSyncDone = true
	}
	c.status.Syncs++
	c.status.LastSync = ss
}

// repaired records a repair the dataplane made between syncs.
func (c *Controller) repaired(res dataplane.Result) {
	c.mu.Lock()
	for k, v := range res.Writes {
		c.status.DriftRepairs[k] += v
	}
	c.mu.Unlock()
	if c.hooks.OnRepair != nil {
		c.hooks.OnRepair(res)
	}
}
