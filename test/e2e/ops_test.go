package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ambient-redirect/ambient-redirect/controller"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestOperations covers what an operator sees: readiness, /debug/state,
// /metrics, the status command, and the manifests against a real API server.
func TestOperations(t *testing.T) {
	T := t // the agent outlives the subtest that starts it
	e := newEnv(t, 1)
	n := e.nodes[0]
	a1 := e.runPod(t, n, ambientNS, "a1")
	a2 := e.runPod(t, n, ambientNS, "a2")
	skipped := e.runPod(t, n, ambientNS, "skipped", withLabels(controller.DataplaneModeLabel, controller.DataplaneModeNone))

	t.Run("manifests pass server-side dry run", func(t *testing.T) {
		dir := t.TempDir()
		entries, err := os.ReadDir("../../manifests")
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range entries {
			if f.Name() == "kustomization.yaml" || !strings.HasSuffix(f.Name(), ".yaml") {
				continue // kustomize's own file is not an API object
			}
			b, err := os.ReadFile(filepath.Join("../../manifests", f.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, f.Name()), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.cp.ApplyManifestsDryRun(t, dir); err != nil {
			t.Fatalf("server-side dry run: %v", err)
		}
	})

	t.Run("readyz is 503 until the first sync, then 200", func(t *testing.T) {
		e.cp.StopAPIServer(t)
		args := []string{agentBin, "run", "--node-name", n.Name, "--kubeconfig", e.kc, "--netns-dir", e.nsDir,
			"--resync-period", "1h", "--debug-addr", debugAddr}
		n.agent = netnstest.Start(T, n.NS, args...)
		eventually(t, 10*time.Second, func() error {
			code, body, err := e.get(n, "/readyz")
			if err != nil {
				return err
			}
			if code != 503 {
				return fmt.Errorf("readyz %d before any sync: %s", code, body)
			}
			return nil
		})
		if code, _, _ := e.get(n, "/healthz"); code != 200 {
			t.Fatalf("healthz %d while waiting for the API", code)
		}
		if members(t, n)[a1.ip] {
			t.Fatal("kernel written before caches synced")
		}
		e.cp.StartAPIServer(t)
		eventually(t, 10*time.Second, func() error {
			if code, body, err := e.get(n, "/readyz"); err != nil || code != 200 {
				return fmt.Errorf("readyz %d %v %s", code, err, body)
			}
			return nil
		})
	})

	t.Run("debug state: converged, with reasons", func(t *testing.T) {
		eventually(t, 5*time.Second, func() error {
			if st := e.state(t, n); !st.Converged || st.Enrolled != 2 {
				return fmt.Errorf("converged=%v enrolled=%d diff=%v", st.Converged, st.Enrolled, st.Diff)
			}
			return nil
		})
		st := e.state(t, n)
		reasons := map[string]string{}
		for _, p := range st.Pods {
			reasons[p.Name] = p.Reason
		}
		if reasons[skipped.obj.Name] != controller.ReasonOptOutLabel || reasons[a1.obj.Name] != controller.ReasonEnrolledNamespace {
			t.Fatalf("reasons: %v", reasons)
		}
		if st.Tunnel["type"] != "vxlan" || st.IPTables["backend"] == "" || st.Ztunnel == nil || st.Ztunnel.NetNS == "" || st.Config["failMode"] != "closed" {
			t.Fatalf("state: tunnel %v iptables %v ztunnel %+v config %v", st.Tunnel, st.IPTables, st.Ztunnel, st.Config)
		}
		out, err := netnstest.ExecErr(n.NS, agentBin, "status", "--debug-addr", debugAddr, "-v")
		if err != nil || !strings.Contains(out, "converged") || !strings.Contains(out, controller.ReasonOptOutLabel) {
			t.Fatalf("status: %v\n%s", err, out)
		}
	})

	t.Run("metrics parse; the enrolled gauge equals the enrolled pods", func(t *testing.T) {
		_, body, err := e.get(n, "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		families, err := parser.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatalf("/metrics does not parse: %v", err)
		}
		gauge := func(name string) float64 {
			f := families[name]
			if f == nil || len(f.Metric) == 0 {
				t.Fatalf("metric %s missing", name)
			}
			return value(f.Metric[0])
		}
		if got := gauge("ambient_redirect_enrolled_pods"); got != 2 {
			t.Fatalf("enrolled gauge %v, want 2", got)
		}
		for _, name := range []string{"ambient_redirect_sync_duration_seconds", "ambient_redirect_event_to_programmed_seconds",
			"ambient_redirect_kernel_writes_total", "ambient_redirect_drift_repairs_total", "ambient_redirect_sync_errors_total"} {
			if families[name] == nil {
				t.Errorf("metric %s missing", name)
			}
		}
		if code, _, _ := e.get(n, "/debug/pprof/"); code != 200 {
			t.Errorf("pprof %d", code)
		}
	})

	t.Run("a route deleted by hand shows as a difference until repaired; status exits non-zero", func(t *testing.T) {
		netnstest.Exec(t, n.NS, "ip", "route", "del", a2.ip+"/32", "table", "100")
		st := e.state(t, n)
		if st.Converged || !strings.Contains(strings.Join(st.Diff, "\n"), a2.ip+"/32") {
			t.Fatalf("deleted route not reported: converged=%v diff=%v", st.Converged, st.Diff)
		}
		out, err := netnstest.ExecErr(n.NS, agentBin, "status", "--debug-addr", debugAddr)
		if err == nil || !strings.Contains(out, "NOT converged") || !strings.Contains(out, a2.ip+"/32") {
			t.Fatalf("status must fail and name the route: %v\n%s", err, out)
		}
		// Any event repairs it (the resync period is 1h here).
		e.runPod(t, n, plainNS, "nudge")
		eventually(t, 5*time.Second, func() error {
			if !hasRoute(t, n, a2.ip) || !e.state(t, n).Converged {
				return fmt.Errorf("not repaired")
			}
			return nil
		})
		if _, err := netnstest.ExecErr(n.NS, agentBin, "status", "--debug-addr", debugAddr); err != nil {
			t.Fatalf("status after repair: %v", err)
		}
	})
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Counter != nil:
		return m.Counter.GetValue()
	}
	return 0
}
