package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestCNIPluginCapturesFromFirstPacket: pods created the kubelet's way on a
// ptp node (the pod object, then CNI ADD through the real ptp and
// host-local plugins with ours chained, then the status) are captured from
// the first SYN they send once ADD returns, before any status exists; a
// non-ambient pod never waits for the agent; with the agent stopped, fail
// closed refuses an ambient pod's sandbox until the agent is back, and fail
// open lets it start and enrols it when the agent returns.
func TestCNIPluginCapturesFromFirstPacket(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	sock := filepath.Join(t.TempDir(), "cni.sock")
	e.StartAgent(t, n, "--cni-socket", sock)
	server := e.RunPod(t, n, harness.PlainNS, "server")
	dst := harness.Hostport(server.IP, harness.EchoPort)
	conf := func(failMode string) map[string]any {
		return map[string]any{"socket": sock, "failMode": failMode, "timeout": "10s", "kubeconfig": e.KC}
	}
	// firstCaptured sends p's first connection and reports whether the
	// ztunnel saw it.
	firstCaptured := func(t *testing.T, p *harness.Pod) bool {
		t.Helper()
		before := n.ZT.Count(t, 15001, p.IP, dst)
		if err := harness.RoundTrip(p, dst); err != nil {
			t.Fatalf("%s -> %s: %v", p.IP, dst, err)
		}
		for range 100 { // the record trails the round trip by a little
			if n.ZT.Count(t, 15001, p.IP, dst) > before {
				return true
			}
			time.Sleep(10 * time.Millisecond)
		}
		return false
	}

	t.Run("first SYN after ADD is captured", func(t *testing.T) {
		var took []time.Duration
		for i := range 50 {
			p, err := e.CNIPod(t, n, harness.AmbientNS, fmt.Sprintf("cni%d", i), conf("closed"))
			if err != nil {
				t.Fatal(err)
			}
			took = append(took, p.Net.ChainTook)
			if !firstCaptured(t, p) {
				t.Fatalf("pod %d: the first connection right after ADD was not captured", i)
			}
			e.WriteStatus(t, p)
		}
		slices.Sort(took)
		t.Logf("ADD of the chained plugin (exec through ip netns exec included), 50 pods: p50 %v, p99 %v, max %v",
			took[len(took)/2].Round(time.Microsecond), took[len(took)*99/100].Round(time.Microsecond), took[len(took)-1].Round(time.Microsecond))
		harness.Eventually(t, 5*time.Second, func() error {
			st := e.State(t, n)
			via := 0
			for _, p := range st.Pods {
				if p.ViaCNI && p.Enrolled {
					via++
				}
			}
			if via != 50 || !st.Converged {
				return fmt.Errorf("%d pods enrolled through CNI, converged %v, diff %v", via, st.Converged, st.Diff)
			}
			return nil
		})
	})

	t.Run("a non-ambient pod is not captured and does not wait", func(t *testing.T) {
		p, err := e.CNIPod(t, n, harness.PlainNS, "plain-cni", conf("closed"))
		if err != nil {
			t.Fatal(err)
		}
		if firstCaptured(t, p) {
			t.Fatal("a plain pod's connection was captured")
		}
	})

	e.StopAgent(n)
	t.Run("agent stopped: non-ambient pods start at once", func(t *testing.T) {
		p, err := e.CNIPod(t, n, harness.PlainNS, "plain-down", conf("closed"))
		if err != nil {
			t.Fatal(err)
		}
		limit := time.Second
		if os.Getenv("AR_RACE") == "1" {
			limit = 10 * time.Second // the race detector slows the plugin's TLS handshake tenfold and more
		}
		if p.Net.ChainTook > limit {
			t.Fatalf("ADD of a plain pod took %v with the agent down", p.Net.ChainTook)
		}
		t.Logf("plain pod ADD with the agent down: %v", p.Net.ChainTook.Round(time.Microsecond))
	})
	t.Run("agent stopped: fail closed refuses an ambient pod until the agent is back", func(t *testing.T) {
		_, err := e.CNIPod(t, n, harness.AmbientNS, "closed-down", conf("closed"))
		if err == nil || !strings.Contains(err.Error(), "not reachable") || !strings.Contains(err.Error(), "closed") {
			t.Fatalf("ADD with the agent down in fail-closed mode: %v", err)
		}
		t.Logf("ADD refused: %v", err)
		e.StartAgent(t, n, "--cni-socket", sock)
		p, err := e.CNIPod(t, n, harness.AmbientNS, "closed-down", conf("closed")) // the kubelet retries
		if err != nil {
			t.Fatal(err)
		}
		if !firstCaptured(t, p) {
			t.Fatal("retried pod's first connection not captured")
		}
		e.WriteStatus(t, p)
	})
	e.StopAgent(n)
	t.Run("agent stopped: fail open starts an ambient pod, enrolled when the agent returns", func(t *testing.T) {
		p, err := e.CNIPod(t, n, harness.AmbientNS, "open-down", conf("open"))
		if err != nil {
			t.Fatalf("ADD in fail-open mode with the agent down: %v", err)
		}
		e.WriteStatus(t, p)
		e.StartAgent(t, n, "--cni-socket", sock)
		harness.Eventually(t, 5*time.Second, func() error {
			if !harness.Members(t, n)[p.IP] {
				return fmt.Errorf("%s not enrolled", p.IP)
			}
			return nil
		})
		if !firstCaptured(t, p) {
			t.Fatal("fail-open pod not captured once the agent is back")
		}
	})
}

// kindnetConflist is what kindnet writes on a node (ptp + portmap).
const kindnetConflist = `{
	"cniVersion": "0.4.0",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [ { "dst": "0.0.0.0/0" } ],
			"ranges": [ [ { "subnet": "10.244.1.0/24" } ] ]
		},
		"mtu": 1500
	},
	{
		"type": "portmap",
		"capabilities": { "portMappings": true }
	}
	]
}
`

// kindnetCNIDirs are a node's CNI bin dir (empty) and conf dir holding
// kindnet's conflist (its path is the third result).
func kindnetCNIDirs(t *testing.T) (binDir, confDir, conflist string) {
	binDir, confDir = t.TempDir(), t.TempDir()
	conflist = filepath.Join(confDir, "10-kindnet.conflist")
	if err := os.WriteFile(conflist, []byte(kindnetConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	return binDir, confDir, conflist
}

// TestCNIInstallThroughTheAgent: `run --cni-install` puts the plugin binary
// into the CNI bin dir and its entry at the end of the primary conflist,
// whose entry then enrols a pod from its first packet; `cleanup` with the
// same arguments gives the conflist back byte for byte and removes the
// binary and the plugin's kubeconfig.
func TestCNIInstallThroughTheAgent(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	binDir, confDir, conflist := kindnetCNIDirs(t)
	args := []string{"--cni-install", "--cni-socket", filepath.Join(t.TempDir(), "cni.sock"), "--cni-bin-dir", binDir,
		"--cni-conf-dir", confDir, "--cni-plugin-binary", bins.CNI}
	e.StartAgent(t, n, args...)
	var entry map[string]any
	harness.Eventually(t, 5*time.Second, func() error {
		b, err := os.ReadFile(conflist)
		if err != nil {
			return err
		}
		var c struct {
			Plugins []map[string]any `json:"plugins"`
		}
		if err := json.Unmarshal(b, &c); err != nil {
			return fmt.Errorf("conflist is not valid JSON: %v\n%s", err, b)
		}
		if len(c.Plugins) != 3 || c.Plugins[2]["type"] != "ambient-redirect" {
			return fmt.Errorf("our entry is not last: %s", b)
		}
		entry = c.Plugins[2]
		return nil
	})
	// The runtime finds the plugin by the entry's type in its bin dir.
	if fi, err := os.Stat(filepath.Join(binDir, entry["type"].(string))); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("plugin binary under its type: %v %v", fi, err)
	}
	// Only through the agent's bin dir from here on: a conflist no runtime
	// can run must fail this test.
	e.CNIPath = []string{binDir, netnstest.CNIPath}
	if fi, err := os.Stat(filepath.Join(confDir, "ambient-redirect-kubeconfig")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("plugin kubeconfig: %v %v", fi, err)
	}
	t.Logf("installed entry: %v", entry)

	server := e.RunPod(t, n, harness.PlainNS, "server")
	dst := harness.Hostport(server.IP, harness.EchoPort)
	p, err := e.CNIPod(t, n, harness.AmbientNS, "installed", entry)
	if err != nil {
		t.Fatal(err)
	}
	before := n.ZT.Count(t, 15001, p.IP, dst)
	if err := harness.RoundTrip(p, dst); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, time.Second, func() error {
		if n.ZT.Count(t, 15001, p.IP, dst) == before {
			return fmt.Errorf("first connection of a pod added through the installed entry not captured")
		}
		return nil
	})

	e.StopAgent(n)
	cleanup(t, n, append([]string{"--node-name", n.Name, "--kubeconfig", e.KC, "--netns-dir", e.NSDir}, args...)...)
	if b, err := os.ReadFile(conflist); err != nil || string(b) != kindnetConflist {
		t.Fatalf("conflist after cleanup differs from the original (%v):\n%s", err, b)
	}
	for _, f := range []string{filepath.Join(binDir, "ambient-redirect"), filepath.Join(confDir, "ambient-redirect-kubeconfig")} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s left after cleanup: %v", f, err)
		}
	}
}

// TestCNIPluginNotRunnableKeepsAgentNotReady: a plugin binary no runtime
// could run (here a script that does not answer CNI VERSION) is never
// chained into the conflist, and the agent says so: /readyz is 503 naming
// the plugin, and `status` exits 1. A fixed binary makes it ready.
func TestCNIPluginNotRunnableKeepsAgentNotReady(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	binDir, confDir, conflist := kindnetCNIDirs(t)
	plugin := filepath.Join(t.TempDir(), "ambient-redirect-cni")
	if err := os.WriteFile(plugin, []byte("#!/bin/sh\necho not a CNI plugin\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	e.LaunchAgent(t, n, "--cni-install", "--cni-socket", filepath.Join(t.TempDir(), "cni.sock"), "--cni-bin-dir", binDir,
		"--cni-conf-dir", confDir, "--cni-plugin-binary", plugin)
	harness.Eventually(t, 10*time.Second, func() error {
		code, body, err := e.Get(n, "/readyz")
		switch {
		case err != nil:
			return err
		case code != 503 || !strings.Contains(body, "cniPlugin") || !strings.Contains(body, "VERSION"):
			return fmt.Errorf("/readyz = %d %s; want 503 naming the plugin's failed VERSION call", code, body)
		}
		return nil
	})
	if b, _ := os.ReadFile(conflist); string(b) != kindnetConflist {
		t.Fatalf("the conflist was changed for a plugin that cannot run:\n%s", b)
	}
	out, err := exec.Command("ip", "netns", "exec", n.NS, bins.Agent, "status").CombinedOutput()
	if code := exitCode(err); code != 1 || !strings.Contains(string(out), "NOT READY: cniPlugin") {
		t.Fatalf("status with the plugin unrunnable: exit %d\n%s", code, out)
	}
	// The real plugin at the same path: Watch's next check installs it.
	b, err := os.ReadFile(bins.CNI)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plugin+".tmp", b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(plugin+".tmp", plugin); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, func() error {
		if code, body, err := e.Get(n, "/readyz"); err != nil || code != 200 {
			return fmt.Errorf("/readyz = %d %s %v", code, body, err)
		}
		return nil
	})
	if b, _ := os.ReadFile(conflist); !strings.Contains(string(b), `"type": "ambient-redirect"`) {
		t.Fatalf("entry not inserted once the plugin runs:\n%s", b)
	}
}

// exitCode is a command's exit code from its Run error (0 for nil, -1 when
// it did not run or was killed).
func exitCode(err error) int {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	return -1
}
