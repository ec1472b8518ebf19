package controller

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// DataplaneInfo is what the debug server reads from the dataplane.
type DataplaneInfo interface {
	IPTablesBackend() (backend, reason string)
	// Backend is how our rules are written (iptables or nftables) and why.
	Backend() (dataplane.Backend, string)
	// KubeProxyWarning says what the backend cannot do for this node's
	// kube-proxy ("" when nothing).
	KubeProxyWarning() string
	Tunnel() (typ dataplane.TunnelType, reason string, port int)
	Diff(ctx context.Context, st dataplane.State) ([]string, error)
	Snapshot(ctx context.Context) dataplane.Snapshot
	Sidecars() []dataplane.SidecarState
}

// DebugState is the body of /debug/state.
type DebugState struct {
	Config map[string]any `json:"config"`
	// Backend is how our rules are written, why, and (warning) what it
	// cannot do on this node.
	Backend  map[string]any `json:"backend"`
	IPTables map[string]any `json:"iptables"`
	Tunnel   map[string]any `json:"tunnel"`
	Ztunnel  *ZtunnelStatus `json:"ztunnel"`
	// Draining are older ztunnels that still run and keep their connections.
	Draining []string    `json:"draining,omitempty"`
	Pods     []PodStatus `json:"pods"`
	// Sidecars are the sidecar pods whose capture rules are ours: their
	// effective interception settings and whether the rules are in place.
	Sidecars     []dataplane.SidecarState `json:"sidecars"`
	Enrolled     int                      `json:"enrolled"`
	LastSync     *SyncStatus              `json:"lastSync"`
	LastSuccess  time.Time                `json:"lastSuccess"`
	DriftRepairs map[string]int           `json:"driftRepairs"`
	Ready        bool                     `json:"ready"`
	// ServiceCIDRs are the cluster's Service CIDRs in the desired state;
	// ServiceCIDRSource says where they come from ("ServiceCIDR objects +
	// flag", "flag (ServiceCIDR API not served: ...)", ...).
	ServiceCIDRs      []netip.Prefix `json:"serviceCIDRs"`
	ServiceCIDRSource string         `json:"serviceCIDRSource"`
	// FailedChecks names what keeps the agent not ready besides the first
	// sync (the CNI plugin's installation), with why.
	FailedChecks map[string]string `json:"failedChecks,omitempty"`
	Converged    bool              `json:"converged"`
	// Diff lists what differs between the desired and the actual kernel state.
	Diff      []string `json:"diff"`
	DiffError string   `json:"diffError,omitempty"`
	// Kernel is our kernel state as read back (node and ztunnel netns).
	Kernel *dataplane.Snapshot `json:"kernel,omitempty"`
}

// DebugServer serves /debug/state, /healthz, /readyz, /metrics and pprof.
type DebugServer struct {
	addr   string
	ctl    *Controller
	dp     func() DataplaneInfo
	m      *Metrics
	config map[string]any
	log    *zap.Logger
	// LiveTimeout is how long a queued change may wait before /healthz fails.
	LiveTimeout time.Duration
	srv         *http.Server

	checksMu    sync.Mutex
	readyChecks []readyCheck
}

type readyCheck struct {
	name string
	f    func() error
}

// AddReadyCheck makes /readyz fail while f returns an error (named in the
// answer and in /debug/state), beside the first sync.
func (s *DebugServer) AddReadyCheck(name string, f func() error) {
	s.checksMu.Lock()
	defer s.checksMu.Unlock()
	s.readyChecks = append(s.readyChecks, readyCheck{name, f})
}

// failedChecks maps each failing ready check to its error.
func (s *DebugServer) failedChecks() map[string]string {
	s.checksMu.Lock()
	checks := slices.Clone(s.readyChecks)
	s.checksMu.Unlock()
	out := map[string]string{}
	for _, c := range checks {
		if err := c.f(); err != nil {
			out[c.name] = err.Error()
		}
	}
	return out
}

// NewDebugServer builds the server; dp returns nil until the dataplane exists.
func NewDebugServer(addr string, ctl *Controller, dp func() DataplaneInfo, m *Metrics, config map[string]any, log *zap.Logger) *DebugServer {
	s := &DebugServer{addr: addr, ctl: ctl, dp: dp, m: m, config: config, log: log, LiveTimeout: 60 * time.Second}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", s.healthz)
	mux.HandleFunc("/readyz", s.readyz)
	mux.HandleFunc("/debug/state", s.state)
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return s
}

// Start listens (failing at once if the address is taken) and serves until ctx ends.
func (s *DebugServer) Start(ctx context.Context) error {
	l, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	s.log.Info("debug server listening", zap.String("addr", l.Addr().String()))
	go func() {
		if err := s.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("debug server", zap.Error(err))
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.srv.Shutdown(sctx)
	}()
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *DebugServer) healthz(w http.ResponseWriter, _ *http.Request) {
	st := s.ctl.Summary()
	body := map[string]any{"status": "ok", "lastSuccess": st.LastSuccess, "pendingSince": st.PendingSince, "timeout": s.LiveTimeout.String()}
	if st.PendingSince != nil && time.Since(*st.PendingSince) > s.LiveTimeout {
		body["status"] = "a queued change has waited longer than the timeout"
		writeJSON(w, http.StatusServiceUnavailable, body)
		return
	}
	writeJSON(w, http.StatusOK, body)
}

func (s *DebugServer) readyz(w http.ResponseWriter, _ *http.Request) {
	st := s.ctl.Summary()
	failed := s.failedChecks()
	ready := st.FirstSyncDone && len(failed) == 0
	body := map[string]any{"ready": ready, "cachesSynced": st.Synced, "lastSuccess": st.LastSuccess}
	if len(failed) > 0 {
		body["failedChecks"] = failed
	}
	if !ready {
		writeJSON(w, http.StatusServiceUnavailable, body)
		return
	}
	writeJSON(w, http.StatusOK, body)
}

func (s *DebugServer) state(w http.ResponseWriter, r *http.Request) {
	st := s.ctl.Status()
	out := DebugState{
		Config: s.config, Ztunnel: st.Ztunnel, Draining: st.Draining, Pods: st.Pods, LastSync: st.LastSync, LastSuccess: st.LastSuccess,
		DriftRepairs: st.DriftRepairs, Ready: st.FirstSyncDone, Diff: []string{},
		ServiceCIDRs: st.ServiceCIDRs, ServiceCIDRSource: st.ServiceCIDRSource,
	}
	if out.ServiceCIDRs == nil {
		out.ServiceCIDRs = []netip.Prefix{}
	}
	if failed := s.failedChecks(); len(failed) > 0 {
		out.FailedChecks, out.Ready = failed, false
	}
	for _, p := range st.Pods {
		if p.Enrolled {
			out.Enrolled++
		}
	}
	dp := s.dp()
	if dp != nil {
		fb, fwhy := dp.Backend()
		out.Backend = map[string]any{"name": fb, "reason": fwhy}
		b, why := dp.IPTablesBackend()
		out.IPTables = map[string]any{"backend": b, "reason": why}
		if w := dp.KubeProxyWarning(); w != "" {
			out.Backend["warning"], out.IPTables["warning"] = w, w
		}
		t, why, port := dp.Tunnel()
		out.Tunnel = map[string]any{"type": t, "reason": why, "port": port}
		snap := dp.Snapshot(r.Context())
		out.Kernel = &snap
		out.Sidecars = dp.Sidecars()
	}
	desired := s.ctl.LastDesired()
	switch {
	case dp == nil || desired == nil:
		out.DiffError = "no sync yet"
	default:
		diff, err := dp.Diff(r.Context(), *desired)
		if err != nil {
			out.DiffError = err.Error()
		}
		if diff != nil {
			out.Diff = diff
		}
	}
	out.Converged = out.Ready && out.DiffError == "" && len(out.Diff) == 0 && (st.LastSync == nil || st.LastSync.Error == "")
	writeJSON(w, http.StatusOK, out)
}
