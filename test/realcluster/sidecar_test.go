//go:build linux

package realcluster_test

import (
	"fmt"
	"net"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/test/realcluster"
)

// TestSidecarPod: a pod with Istio's CNI-mode injection (the status
// annotation, no istio-init; the proxy, the sidecar test proxy as uid/gid
// 1337, a native sidecar that starts before the app), created by the
// kubelet, is captured from its app's first connection: the app dials at
// the moment it starts, and the server sees the proxy's own connection
// (another source port), not the app's.
func TestSidecarPod(t *testing.T) {
	ensureInstalled(t)
	const ns = "sidecar"
	node := c.Nodes[0].Name
	c.Apply(t, realcluster.Namespace(ns, false)+realcluster.AppPod(ns, "sc-server", node))
	server := c.WaitReady(t, ns, "sc-server", 1)[0]
	target := net.JoinHostPort(server.Status.PodIP, fmt.Sprint(realcluster.AppEchoPort))
	c.Apply(t, realcluster.SidecarAppPod(ns, "sc-app", node, "--dial-at-start", target))
	app := c.WaitReady(t, ns, "sc-app", 1)[0]
	res := appResults(t, &app) // read through the pod's inbound capture
	if len(res.Start) != 1 || res.Start[0].Err != "" {
		t.Fatalf("the app's first connection: %+v", res.Start)
	}
	d := res.Start[0]
	if d.Peer == d.Local || hostOf(d.Peer) != app.Status.PodIP {
		t.Fatalf("the app's first connection reached the server directly (local %s, the server saw %s): not captured", d.Local, d.Peer)
	}
	t.Logf("first connection captured: the app's socket %s, the server saw the proxy's %s", d.Local, d.Peer)
}
