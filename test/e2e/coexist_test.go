package e2e

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// ciliumPriorities move our rules below a CNI that moved the kernel's
// local rule to 100 (see the README's coexistence table).
var ciliumPriorities = []string{"--rule-priority-proxy-return-slot1", "11", "--rule-priority-skip", "12",
	"--rule-priority-outbound", "13", "--rule-priority-proxy-return", "14", "--rule-priority-inbound", "15"}

// TestAnotherAgentInTheWay drives the binary as a user would on a node
// where another network agent holds rule priority 100 (Cilium's moved
// local rule): with the defaults it refuses to program, naming that rule
// and the flag that moves ours; with the documented flags it captures; a
// foreign rule appearing later at one of our priorities makes it not ready
// (/readyz, status) while capture goes on.
func TestAnotherAgentInTheWay(t *testing.T) {
	e := harness.New(t, 1, bins)
	n := e.Nodes[0]
	client := e.RunPod(t, n, harness.AmbientNS, "client")
	server := e.RunPod(t, n, harness.AmbientNS, "server")
	netnstest.Exec(t, n.NS, "ip", "rule", "add", "priority", "100", "lookup", "local")

	e.LaunchAgent(t, n)
	select {
	case <-n.Agent.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("the agent did not refuse a node whose priority 100 is taken:\n%s", n.Agent.Log())
	}
	if log := n.Agent.Log(); n.Agent.Err() == nil || !strings.Contains(log, "100: from all lookup local") || !strings.Contains(log, "--rule-priority-skip") {
		t.Fatalf("refusal: exit %v, want an error naming the rule and the flag:\n%s", n.Agent.Err(), log)
	}
	if out := netnstest.Exec(t, n.NS, "ip", "rule"); strings.Contains(out, "fwmark 0x100") {
		t.Fatalf("the refused agent wrote rules:\n%s", out)
	}
	e.StopAgent(n)

	e.StartAgent(t, n, ciliumPriorities...)
	harness.Eventually(t, 5*time.Second, func() error { return harness.Captured(t, n.ZT, 15001, client, server) })

	netnstest.Exec(t, n.NS, "ip", "rule", "add", "priority", "13", "lookup", "main")
	harness.Eventually(t, 5*time.Second, func() error {
		code, body, err := e.Get(n, "/readyz")
		if err != nil || code != 503 || !strings.Contains(body, "conflicts") || !strings.Contains(body, "13") {
			return fmt.Errorf("/readyz = %d %s %v; want 503 naming the rule at 13", code, body, err)
		}
		return nil
	})
	out, err := exec.Command("ip", "netns", "exec", n.NS, bins.Agent, "status").CombinedOutput()
	if code := exitCode(err); code != 1 || !strings.Contains(string(out), "NOT READY: conflicts") {
		t.Fatalf("status with another agent's rule at 13: exit %d\n%s", code, out)
	}
	netnstest.Exec(t, n.NS, "ip", "rule", "del", "priority", "13", "lookup", "main")
	if err := harness.Captured(t, n.ZT, 15001, client, server); err != nil {
		t.Fatalf("capture after the other agent's rule went: %v", err)
	}
}
