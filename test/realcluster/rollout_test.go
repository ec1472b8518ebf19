//go:build linux

package realcluster_test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/selection/kube"
	"github.com/ambient-redirect/ambient-redirect/test/realcluster"
)

// ensureInstalled installs the agent again when an earlier test (the
// uninstall) removed it: the rollouts run on a fresh install.
func ensureInstalled(t *testing.T) {
	t.Helper()
	need(t, false)
	if installed {
		return
	}
	c.InstallAgent(t)
	took := c.WaitDaemonSet(t, realcluster.AgentNamespace, realcluster.AgentDaemonSet, 120*time.Second)
	t.Logf("agent (re)installed, Ready after %s", took.Round(time.Millisecond))
	installed = true
}

// collector keeps every record the ztunnels of all nodes wrote while it
// runs (the kubelet removes a deleted ztunnel pod's log with it), up to
// and including a last pass when finished.
type collector struct {
	mu   sync.Mutex
	seen map[string]realcluster.ZRecord
	stop chan struct{}
	done chan struct{}
}

func collect() *collector {
	col := &collector{seen: map[string]realcluster.ZRecord{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(col.done)
		for last := false; ; {
			for _, n := range c.Nodes {
				recs, err := c.ZtunnelRecordsErr(n)
				if err != nil {
					continue
				}
				col.mu.Lock()
				for _, r := range recs {
					col.seen[r.Pod+"|"+r.Client+"|"+r.OrigDst+"|"+strconv.Itoa(r.Listener)] = r
				}
				col.mu.Unlock()
			}
			if last {
				return
			}
			select {
			case <-col.stop:
				last = true // one more pass: whatever was written until now
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return col
}

func (col *collector) finish() []realcluster.ZRecord {
	close(col.stop)
	<-col.done
	col.mu.Lock()
	defer col.mu.Unlock()
	out := make([]realcluster.ZRecord, 0, len(col.seen))
	for _, r := range col.seen {
		out = append(out, r)
	}
	return out
}

// podOn returns the running pod of a label selector on a node.
func podOn(t *testing.T, ns, selector, node string) corev1.Pod {
	t.Helper()
	for _, p := range c.PodsOf(t, ns, selector) {
		if p.Spec.NodeName == node {
			return p
		}
	}
	t.Fatalf("no running pod %s in %s on %s", selector, ns, node)
	return corev1.Pod{}
}

// streamAndLoop starts, in a new ambient namespace, a server per node and a
// client pod on node-1 that holds an echo stream to the server on node-1
// and makes a new connection to it every 10 ms: both pass through node-1's
// ztunnel only (a cross-node connection passes through both nodes'
// ztunnels).
func streamAndLoop(t *testing.T, ns string) (client corev1.Pod, streamDst, loopDst string) {
	t.Helper()
	c.Apply(t, realcluster.Namespace(ns, true)+realcluster.AppDeployment(ns, "server", len(c.Nodes)))
	c.WaitReady(t, ns, "server", len(c.Nodes))
	n1 := c.Nodes[0].Name
	echo := func(p corev1.Pod) string {
		return net.JoinHostPort(p.Status.PodIP, strconv.Itoa(realcluster.AppEchoPort))
	}
	streamDst = echo(podOn(t, ns, "app=server", n1))
	loopDst = echo(podOn(t, ns, "app=server", n1))
	c.Apply(t, realcluster.AppPod(ns, "client", n1, "--stream", streamDst, "--loop", loopDst, "--loop-every", "10ms"))
	c.WaitReady(t, ns, "client", 1)
	t.Cleanup(func() { _, _ = c.Kubectl("delete", "namespace", ns, "--wait=true", "--timeout=120s") })
	client = podOn(t, ns, "app=client", n1)
	if err := realcluster.Poll(10*time.Second, func() error {
		r := appResults(t, &client)
		if r.Stream == nil || r.Stream.Echoed < 10 {
			return fmt.Errorf("stream not echoing: %+v", r.Stream)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return client, streamDst, loopDst
}

// escaped returns the loop connections that reached the server with the
// client's own socket (not through a ztunnel) and that no ztunnel
// recorded.
func escaped(res appRes, recs []realcluster.ZRecord) []dial {
	byClient := map[string]bool{}
	for _, r := range recs {
		byClient[r.Client] = true
	}
	var out []dial
	for _, d := range res.Loop {
		if d.Err == "" && d.Peer == d.Local && !byClient[d.Local] {
			out = append(out, d)
		}
	}
	return out
}

// TestZtunnelRollout: `kubectl rollout restart` of the ztunnel DaemonSet
// (maxSurge 1, maxUnavailable 0) with the agent's --fail-mode closed: a
// stream through the old ztunnel keeps echoing until that pod terminates;
// new connections go to the new one; of a connection every 10 ms none
// escapes.
func TestZtunnelRollout(t *testing.T) {
	ensureInstalled(t)
	client, _, _ := streamAndLoop(t, "zt-rollout")
	n1 := c.Nodes[0]
	oldZ := podOn(t, realcluster.ZtunnelNamespace, "app=ztunnel", n1.Name)
	col := collect()
	// The stream goes through node-1's current ztunnel.
	res := appResults(t, &client)
	if err := realcluster.Poll(5*time.Second, func() error {
		for _, r := range c.ZtunnelRecords(t, n1) {
			if r.Pod == oldZ.Name && r.Client == appResults(t, &client).Stream.Local {
				return nil
			}
		}
		return fmt.Errorf("stream from %s not recorded by %s", res.Stream.Local, oldZ.Name)
	}); err != nil {
		t.Fatal(err)
	}
	// Watch the old pod: when does it start terminating, when is it gone?
	var deleting time.Time
	var newReady time.Time
	var newName string
	var wmu sync.Mutex
	stopWatch := make(chan struct{})
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			select {
			case <-stopWatch:
				return
			case <-time.After(50 * time.Millisecond):
			}
			l, err := c.Client.CoreV1().Pods(realcluster.ZtunnelNamespace).List(ctx(), metav1.ListOptions{LabelSelector: "app=ztunnel", FieldSelector: "spec.nodeName=" + n1.Name})
			if err != nil {
				continue
			}
			// One time per list: what one list shows together happened in
			// an order it cannot tell.
			seen := time.Now()
			wmu.Lock()
			for _, p := range l.Items {
				if p.Name == oldZ.Name && p.DeletionTimestamp != nil && deleting.IsZero() {
					deleting = seen
				}
				if p.Name != oldZ.Name && kube.PodReady(&p) && newReady.IsZero() {
					newReady, newName = seen, p.Name
				}
			}
			wmu.Unlock()
		}
	}()
	began := time.Now()
	if out, err := c.Kubectl("-n", realcluster.ZtunnelNamespace, "rollout", "restart", "ds/"+realcluster.ZtunnelDaemonSet); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s", strings.TrimSpace(out))
	}
	if out, err := c.Kubectl("-n", realcluster.ZtunnelNamespace, "rollout", "status", "ds/"+realcluster.ZtunnelDaemonSet, "--timeout=180s"); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s (%s)", strings.TrimSpace(out), time.Since(began).Round(time.Millisecond))
	}
	// Let the old pod go and new connections flow through the new one.
	_ = realcluster.Poll(30*time.Second, func() error {
		for _, p := range c.PodsOf(t, realcluster.ZtunnelNamespace, "app=ztunnel") {
			if p.Name == oldZ.Name {
				return fmt.Errorf("old ztunnel %s still there", oldZ.Name)
			}
		}
		return nil
	})
	time.Sleep(2 * time.Second)
	close(stopWatch)
	<-watchDone
	res = appResults(t, &client) // before the collector's last pass
	recs := col.finish()
	wmu.Lock()
	defer wmu.Unlock()
	t.Logf("old ztunnel %s: new %s Ready %s after the restart, old terminating %s after it; stream: %d echoed, last %s, err %q at %s",
		oldZ.Name, newName, newReady.Sub(began).Round(time.Millisecond), deleting.Sub(began).Round(time.Millisecond),
		res.Stream.Echoed, res.Stream.LastEcho.Sub(began).Round(time.Millisecond), res.Stream.Err, res.Stream.EndedAt.Sub(began).Round(time.Millisecond))
	if newReady.IsZero() || deleting.IsZero() {
		t.Fatalf("did not see the new ztunnel Ready (%v) and the old one terminating (%v)", newReady, deleting)
	}
	if deleting.Before(newReady) {
		t.Errorf("the old ztunnel started terminating (%s) before the new one was Ready (%s): not a surge rollout", deleting, newReady)
	}
	// The stream echoed until the old ztunnel was told to terminate.
	if res.Stream.LastEcho.Before(deleting.Add(-time.Second)) {
		t.Errorf("the stream through %s stopped echoing at %s, %s before the pod started terminating (err %q)",
			oldZ.Name, res.Stream.LastEcho.Format(time.RFC3339Nano), deleting.Sub(res.Stream.LastEcho), res.Stream.Err)
	}
	// New connections go to the new ztunnel.
	var after, onNew int
	recByClient := map[string]realcluster.ZRecord{}
	for _, r := range recs {
		recByClient[r.Client] = r
	}
	for _, d := range res.Loop {
		if d.Err != "" || d.At.Before(deleting.Add(time.Second)) {
			continue
		}
		after++
		if r, ok := recByClient[d.Local]; ok && r.Pod == newName {
			onNew++
		}
	}
	if after == 0 || onNew != after {
		t.Errorf("of %d connections made after the old ztunnel began terminating, %d were recorded by the new one (%s)", after, onNew, newName)
	}
	if esc := escaped(res, recs); len(esc) > 0 {
		t.Errorf("%d of %d connections escaped the ztunnels (direct to the server): first %+v", len(esc), len(res.Loop), esc[0])
	}
	t.Logf("%d connections during the test (one per 10 ms), %d failed (fail-mode closed), 0 escaped; %d after the switch, %d of them on the new ztunnel",
		len(res.Loop), res.LoopErrors, after, onNew)
	logFailures(t, res, began)
}

var reWrites = regexp.MustCompile(`(?m)^ambient_redirect_kernel_writes_total\{[^}]*\} (\S+)$`)

// kernelWrites sums ambient_redirect_kernel_writes_total of a node's agent.
func kernelWrites(t *testing.T, n *realcluster.Node) float64 {
	t.Helper()
	code, body, err := n.AgentDebug("/metrics")
	if err != nil || code != 200 {
		t.Fatalf("%s /metrics: %d %v", n.Name, code, err)
	}
	var sum float64
	for _, m := range reWrites.FindAllStringSubmatch(string(body), -1) {
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			t.Fatal(err)
		}
		sum += v
	}
	return sum
}

// TestAgentRollout: a new agent image rolled out through the DaemonSet:
// live streams untouched, zero kernel writes by the new agents on
// adoption, the plugin entry never missing from the conflist.
func TestAgentRollout(t *testing.T) {
	ensureInstalled(t)
	client, _, _ := streamAndLoop(t, "agent-rollout")
	// Watch every node's conflist as containerd reads it.
	var missing []string
	var mmu sync.Mutex
	stop := make(chan struct{})
	done := make(chan struct{})
	reads := 0
	go func() {
		defer close(done)
		for {
			for _, n := range c.Nodes {
				b, err := os.ReadFile(filepath.Join(n.CNIConfDir, n.ConflistName))
				mmu.Lock()
				reads++
				if err != nil || !strings.Contains(string(b), `"ambient-redirect"`) {
					missing = append(missing, fmt.Sprintf("%s at %s: %v %q", n.Name, time.Now().Format(time.RFC3339Nano), err, b))
				}
				mmu.Unlock()
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	// Every agent has caught up with the earlier tests' pods (gone or
	// running): what the new agents find is what they would write.
	for _, n := range c.Nodes {
		if err := realcluster.Poll(30*time.Second, func() error {
			code, body, err := n.AgentDebug("/debug/state")
			var st struct {
				Converged bool `json:"converged"`
			}
			if err == nil {
				err = json.Unmarshal(body, &st)
			}
			if err != nil || code != 200 || !st.Converged {
				return fmt.Errorf("%s not converged: %d %v", n.Name, code, err)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	before := appResults(t, &client)
	old := map[string]bool{}
	for _, p := range c.PodsOf(t, realcluster.AgentNamespace, "app.kubernetes.io/name=ambient-redirect") {
		old[p.Name] = true
	}
	began := time.Now()
	if _, err := c.Kubectl("-n", realcluster.AgentNamespace, "set", "image", "ds/"+realcluster.AgentDaemonSet, "agent=ambient-redirect.test/ambient-redirect:v2"); err != nil {
		t.Fatal(err)
	}
	took := c.WaitDaemonSet(t, realcluster.AgentNamespace, realcluster.AgentDaemonSet, 180*time.Second)
	t.Logf("agent rolled out to v2 in %s", took.Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	close(stop)
	<-done
	mmu.Lock()
	if len(missing) > 0 {
		t.Errorf("the plugin entry was missing from a conflist in %d of %d reads; first: %s", len(missing), reads, missing[0])
	}
	mmu.Unlock()
	for _, p := range c.PodsOf(t, realcluster.AgentNamespace, "app.kubernetes.io/name=ambient-redirect") {
		if old[p.Name] {
			t.Errorf("agent pod %s was not replaced", p.Name)
			continue
		}
		if img := p.Spec.Containers[0].Image; !strings.HasSuffix(img, ":v2") {
			t.Errorf("agent pod %s runs %s", p.Name, img)
		}
		n := c.Node(p.Spec.NodeName)
		if w := kernelWrites(t, n); w != 0 {
			_, body, _ := n.AgentDebug("/metrics")
			t.Errorf("%s: the new agent made %v kernel writes adopting the node, want 0:\n%s", n.Name, w, reWrites.FindAllString(string(body), -1))
		}
	}
	after := appResults(t, &client)
	if after.Stream.Err != "" || after.Stream.Echoed <= before.Stream.Echoed || time.Since(after.Stream.LastEcho) > 2*time.Second {
		t.Errorf("the live stream was disturbed: before %+v, after %+v", before.Stream, after.Stream)
	}
	recs := collect().finish()
	if esc := escaped(after, recs); len(esc) > 0 {
		t.Errorf("%d connections escaped during the agent rollout: first %+v", len(esc), esc[0])
	}
	t.Logf("stream echoed %d -> %d during the rollout (%s); %d connections, %d failed", before.Stream.Echoed, after.Stream.Echoed,
		time.Since(began).Round(time.Millisecond), len(after.Loop), after.LoopErrors)
}

// TestNodeRestart: node-2 is "rebooted" (kubelet, containerd, agent and
// every container stopped; its network namespace with all kernel state,
// the pods' netns, cgroups and /run gone) and started again. No ambient
// pod's packet leaves uncaptured: the restarted ambient pod's sandbox waits
// for the agent (the plugin fails closed) and its first connection, made
// the moment its container starts, is captured or refused, never direct.
func TestNodeRestart(t *testing.T) {
	ensureInstalled(t)
	ns := "restart"
	c.Apply(t, realcluster.Namespace(ns, true)+realcluster.AppDeployment(ns, "server", len(c.Nodes)))
	c.WaitReady(t, ns, "server", len(c.Nodes))
	t.Cleanup(func() { _, _ = c.Kubectl("delete", "namespace", ns, "--wait=true", "--timeout=120s") })
	n1, n2 := c.Nodes[0], c.Nodes[1]
	echo := func(p corev1.Pod) string {
		return net.JoinHostPort(p.Status.PodIP, strconv.Itoa(realcluster.AppEchoPort))
	}
	remote := echo(podOn(t, ns, "app=server", n1.Name))
	c.Apply(t, realcluster.AppPod(ns, "client", n2.Name, "--dial-at-start", remote, "--loop", remote, "--loop-every", "10ms"))
	c.WaitReady(t, ns, "client", 1)
	old := podOn(t, ns, "app=client", n2.Name)

	began := time.Now()
	n2.PowerOff(t)
	t.Logf("%s powered off in %s", n2.Name, time.Since(began).Round(time.Millisecond))
	on := time.Now()
	n2.PowerOn(t)
	// The client comes back in a new sandbox once the agent is Ready.
	var client corev1.Pod
	if err := realcluster.Poll(180*time.Second, func() error {
		p, err := c.Client.CoreV1().Pods(ns).Get(ctx(), "client", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !kube.PodReady(p) || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].ContainerID == old.Status.ContainerStatuses[0].ContainerID {
			return fmt.Errorf("client not Ready in a new container yet")
		}
		client = *p
		return nil
	}); err != nil {
		c.DumpPods(t, ns)
		c.DumpPods(t, realcluster.AgentNamespace)
		t.Fatal(err)
	}
	agentReady := c.WaitDaemonSet(t, realcluster.AgentNamespace, realcluster.AgentDaemonSet, 120*time.Second)
	c.WaitDaemonSet(t, realcluster.ZtunnelNamespace, realcluster.ZtunnelDaemonSet, 120*time.Second)
	t.Logf("%s back: client Ready in a new sandbox %s after power-on (agent DaemonSet Ready %s later)", n2.Name,
		time.Since(on).Round(time.Millisecond), agentReady.Round(time.Millisecond))
	ev, _ := c.Kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=client,reason=FailedCreatePodSandBox", "-o", "custom-columns=MSG:.message", "--no-headers")
	if strings.TrimSpace(ev) != "" {
		t.Logf("sandbox creation refused before the agent was Ready (fail closed):\n%s", lastLine(ev))
	} else {
		t.Logf("no sandbox creation was refused (the agent was Ready first)")
	}
	time.Sleep(2 * time.Second)
	res := appResults(t, &client)
	recs := collect().finish()
	byClient := map[string]realcluster.ZRecord{}
	for _, r := range recs {
		byClient[r.Client] = r
	}
	for _, d := range res.Start {
		switch r, ok := byClient[d.Local]; {
		case d.Err != "":
			t.Logf("first connection refused (fail closed, ztunnel not up yet): %s", d.Err)
		case ok && d.Peer != d.Local:
			t.Logf("first connection %s -> %s captured by %s (listener %d)", d.Local, d.Target, r.Pod, r.Listener)
		default:
			t.Errorf("first connection of the restarted pod %s -> %s went direct (server saw %s, no ztunnel record)", d.Local, d.Target, d.Peer)
		}
	}
	if esc := escaped(res, recs); len(esc) > 0 {
		t.Errorf("%d of %d connections after the restart escaped: first %+v", len(esc), len(res.Loop), esc[0])
	}
	captured := 0
	for _, d := range res.Loop {
		if _, ok := byClient[d.Local]; ok && d.Err == "" {
			captured++
		}
	}
	if captured == 0 {
		t.Errorf("none of %d connections after the restart was captured (%d failed)", len(res.Loop), res.LoopErrors)
	}
	t.Logf("after the restart: %d connections, %d captured, %d failed, 0 escaped", len(res.Loop), captured, res.LoopErrors)
	logFailures(t, res, on)
}

// logFailures logs the first and last failed loop connections, relative to
// since.
func logFailures(t *testing.T, res appRes, since time.Time) {
	t.Helper()
	var failed []dial
	for _, d := range res.Loop {
		if d.Err != "" {
			failed = append(failed, d)
		}
	}
	if len(failed) == 0 {
		return
	}
	first, last := failed[0], failed[len(failed)-1]
	t.Logf("failed connections: %d, first at %s (%s), last at %s (%s)", len(failed),
		first.At.Sub(since).Round(time.Millisecond), first.Err, last.At.Sub(since).Round(time.Millisecond), last.Err)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
