package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestOperations covers what an operator sees: readiness, /debug/state,
// /metrics, the status command, and the manifests against a real API server.
func TestOperations(t *testing.T) {
	T := t // the agent outlives the subtest that starts it
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	a1 := e.RunPod(t, n, harness.AmbientNS, "a1")
	a2 := e.RunPod(t, n, harness.AmbientNS, "a2")
	skipped := e.RunPod(t, n, harness.AmbientNS, "skipped", harness.WithLabels(selection.DataplaneModeLabel, selection.DataplaneModeNone))

	t.Run("manifests pass server-side dry run", func(t *testing.T) {
		dir := t.TempDir()
		// The install and the uninstall manifests.
		for _, src := range []string{"../../manifests", "../../manifests/uninstall"} {
			entries, err := os.ReadDir(src)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range entries {
				if f.Name() == "kustomization.yaml" || !strings.HasSuffix(f.Name(), ".yaml") {
					continue // kustomize's own file is not an API object
				}
				b, err := os.ReadFile(filepath.Join(src, f.Name()))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, filepath.Base(src)+"-"+f.Name()), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := e.CP.ApplyManifestsDryRun(t, dir); err != nil {
			t.Fatalf("server-side dry run: %v", err)
		}
	})

	t.Run("readyz is 503 until the first sync, then 200", func(t *testing.T) {
		e.CP.StopAPIServer(t)
		e.LaunchAgent(T, n, "--resync-period", "1h")
		harness.Eventually(t, 10*time.Second, func() error {
			code, body, err := e.Get(n, "/readyz")
			if err != nil {
				return err
			}
			if code != 503 {
				return fmt.Errorf("readyz %d before any sync: %s", code, body)
			}
			return nil
		})
		if code, _, _ := e.Get(n, "/healthz"); code != 200 {
			t.Fatalf("healthz %d while waiting for the API", code)
		}
		if harness.Members(t, n)[a1.IP] {
			t.Fatal("kernel written before caches synced")
		}
		e.CP.StartAPIServer(t)
		harness.Eventually(t, 10*time.Second, func() error {
			if code, body, err := e.Get(n, "/readyz"); err != nil || code != 200 {
				return fmt.Errorf("readyz %d %v %s", code, err, body)
			}
			return nil
		})
	})

	t.Run("debug state: converged, with reasons", func(t *testing.T) {
		harness.Eventually(t, 5*time.Second, func() error {
			if st := e.State(t, n); !st.Converged || st.Enrolled != 2 {
				return fmt.Errorf("converged=%v enrolled=%d diff=%v", st.Converged, st.Enrolled, st.Diff)
			}
			return nil
		})
		st := e.State(t, n)
		reasons := map[string]string{}
		for _, p := range st.Pods {
			reasons[p.Name] = p.Reason
		}
		if reasons[skipped.Obj.Name] != selection.ReasonOptOutLabel || reasons[a1.Obj.Name] != selection.ReasonEnrolledNamespace {
			t.Fatalf("reasons: %v", reasons)
		}
		if st.Tunnel["type"] != "vxlan" || st.IPTables["backend"] == "" || st.Ztunnel == nil || st.Ztunnel.NetNS == "" || st.Config["failMode"] != "closed" {
			t.Fatalf("state: tunnel %v iptables %v ztunnel %+v config %v", st.Tunnel, st.IPTables, st.Ztunnel, st.Config)
		}
		if k := st.Kernel; k == nil || k.IPSets["ztunnel-pods-ips"][a1.IP] != string(a1.Obj.UID) || len(k.NS.Rules) == 0 || k.Ztunnel == nil {
			t.Fatalf("kernel read-back missing or wrong: %+v", st.Kernel)
		}
		out, err := netnstest.ExecErr(n.NS, bins.Agent, "status", "--debug-addr", harness.DebugAddr, "-v")
		if err != nil || !strings.Contains(out, "converged") || !strings.Contains(out, selection.ReasonOptOutLabel) {
			t.Fatalf("status: %v\n%s", err, out)
		}
	})

	t.Run("metrics parse; the enrolled gauge equals the enrolled pods", func(t *testing.T) {
		_, body, err := e.Get(n, "/metrics")
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
		if code, _, _ := e.Get(n, "/debug/pprof/"); code != 200 {
			t.Errorf("pprof %d", code)
		}
	})

	t.Run("a deleted route is repaired at once, not at the resync", func(t *testing.T) {
		before := e.Metric(t, n, "ambient_redirect_drift_repairs_total")
		start := time.Now()
		netnstest.Exec(t, n.NS, "ip", "route", "del", a2.IP+"/32", "table", "100")
		harness.Eventually(t, time.Second, func() error {
			if !harness.HasRoute(t, n, a2.IP) {
				return fmt.Errorf("route not repaired")
			}
			return nil
		})
		t.Logf("route repaired %v after it was deleted (resync period 1h)", time.Since(start).Round(time.Millisecond))
		harness.Eventually(t, time.Second, func() error {
			if after := e.Metric(t, n, "ambient_redirect_drift_repairs_total"); after <= before {
				return fmt.Errorf("drift repairs %v -> %v", before, after)
			}
			return nil
		})
	})

	t.Run("a set member deleted by hand shows as a difference until repaired; status exits non-zero", func(t *testing.T) {
		if fmt.Sprint(e.State(t, n).Backend["name"]) == "nftables" {
			// Our table's set elements are watched: put back at once.
			harness.DelMember(t, n, a2.IP)
			harness.Eventually(t, 2*time.Second, func() error {
				if !harness.Members(t, n)[a2.IP] {
					return fmt.Errorf("deleted member not put back")
				}
				return nil
			})
			return
		}
		// ipset members are read back at the resync only (1h here).
		harness.DelMember(t, n, a2.IP)
		st := e.State(t, n)
		if st.Converged || !strings.Contains(strings.Join(st.Diff, "\n"), a2.IP) {
			t.Fatalf("deleted member not reported: converged=%v diff=%v", st.Converged, st.Diff)
		}
		out, err := netnstest.ExecErr(n.NS, bins.Agent, "status", "--debug-addr", harness.DebugAddr)
		if err == nil || !strings.Contains(out, "NOT converged") || !strings.Contains(out, a2.IP) {
			t.Fatalf("status must fail and name the member: %v\n%s", err, out)
		}
		// A pod event that changes nothing does no kernel work: it stays
		// reported until the next full sync, which a restart makes at once.
		e.RunPod(t, n, harness.PlainNS, "nudge")
		time.Sleep(300 * time.Millisecond)
		if st := e.State(t, n); st.Converged {
			t.Fatal("drift no longer reported after an unrelated event")
		}
		e.StopAgent(n)
		e.StartAgent(T, n, "--resync-period", "1h")
		harness.Eventually(t, 5*time.Second, func() error {
			if !harness.Members(t, n)[a2.IP] || !e.State(t, n).Converged {
				return fmt.Errorf("not repaired")
			}
			return nil
		})
		if _, err := netnstest.ExecErr(n.NS, bins.Agent, "status", "--debug-addr", harness.DebugAddr); err != nil {
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

// TestVersionNamesTheRevision: the binary the suite built says which commit
// it came from.
func TestVersionNamesTheRevision(t *testing.T) {
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	out, err := exec.Command(bins.Agent, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("version: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), strings.TrimSpace(string(head))) {
		t.Fatalf("version %q does not name HEAD %s", out, head)
	}
}
