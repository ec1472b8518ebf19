//go:build linux

package realcluster

import (
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
)

// Demo installs the test ztunnel and the agent (kubectl apply -k of the
// test overlay), runs a server and a client Deployment (one replica per
// node) in an ambient namespace, the clients dialing every server the
// moment they start, and returns a summary: which ztunnel captured which
// connection, and how to use the cluster.
func Demo(t testing.TB, c *Cluster) string {
	t.Helper()
	c.InstallZtunnel(t)
	c.InstallAgent(t)
	c.WaitDaemonSet(t, AgentNamespace, AgentDaemonSet, 120*time.Second)
	n := len(c.Nodes)
	c.Apply(t, Namespace("demo", true)+AppDeployment("demo", "server", n))
	servers := c.WaitReady(t, "demo", "server", n)
	var targets []string
	for _, s := range servers {
		targets = append(targets, net.JoinHostPort(s.Status.PodIP, fmt.Sprint(AppEchoPort)))
	}
	c.Apply(t, AppDeployment("demo", "client", n, "--dial-at-start", strings.Join(targets, ",")))
	clients := c.WaitReady(t, "demo", "client", n)
	names := map[string]string{}
	for _, p := range append(servers, clients...) {
		names[p.Status.PodIP] = p.Name
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\nConnections the test ztunnels captured (demo/client dials every demo/server when it starts):\n\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tZTUNNEL\tLISTENER\tCLIENT\tORIGINAL DESTINATION")
	var rows []string
	for _, node := range c.Nodes {
		for _, r := range c.ZtunnelRecords(t, node) {
			name := func(a string) string {
				h, _, _ := net.SplitHostPort(a)
				if p, ok := names[h]; ok {
					return a + " (" + p + ")"
				}
				return a
			}
			rows = append(rows, fmt.Sprintf("%s\t%s\t%d\t%s\t%s", node.Name, r.Pod, r.Listener, name(r.Client), name(r.OrigDst)))
		}
	}
	sort.Strings(rows)
	for _, r := range rows {
		fmt.Fprintln(tw, r)
	}
	tw.Flush()
	kubectl := fmt.Sprintf("ip netns exec %s %s --kubeconfig %s", c.CPNetns, filepath.Join(c.BinDir, cluster.KubectlBinary), filepath.Join(c.Opts.Dir, "kubeconfig"))
	fmt.Fprintf(&b, "\nThe cluster runs in the background (%d nodes; work dir %s). Try:\n", n, c.Opts.Dir)
	fmt.Fprintf(&b, "  %s get pods -A -o wide\n", kubectl)
	fmt.Fprintf(&b, "  %s -n istio-system logs ds/ztunnel    # every captured connection\n", kubectl)
	fmt.Fprintf(&b, "  nsenter --net=%s curl -s 127.0.0.1:%d/debug/state   # node-1's agent\n", c.Nodes[0].NodeNetnsPath(), AgentDebugPort)
	fmt.Fprintf(&b, "Remove it with: bash hack/cluster/down.sh\n")
	return b.String()
}
