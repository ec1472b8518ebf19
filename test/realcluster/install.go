//go:build linux

package realcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// Names of what Install installs.
const (
	AgentNamespace   = "kube-system"
	AgentDaemonSet   = "ambient-redirect"
	ZtunnelNamespace = "istio-system"
	ZtunnelDaemonSet = "ztunnel"
	AgentDebugPort   = 15099
)

// Overlay is the test overlay of manifests/ (relative to the module root).
const Overlay = "test/realcluster/overlay"

// ZtunnelManifest is the test ztunnel's DaemonSet (relative to the module
// root).
const ZtunnelManifest = "test/realcluster/testdata/ztunnel.yaml"

func (c *Cluster) repoPath(p string) string { return filepath.Join(c.Opts.Repo, p) }

// InstallZtunnel applies the test ztunnel DaemonSet and waits until it is
// Ready on every node.
func (c *Cluster) InstallZtunnel(t testing.TB) {
	t.Helper()
	if out, err := c.Kubectl("apply", "-f", c.repoPath(ZtunnelManifest)); err != nil {
		t.Fatalf("realcluster: %v", err)
	} else {
		t.Logf("%s", strings.TrimSpace(out))
	}
	c.WaitDaemonSet(t, ZtunnelNamespace, ZtunnelDaemonSet, 120*time.Second)
}

// InstallAgent runs `kubectl apply -k` of the test overlay; it does not
// wait.
func (c *Cluster) InstallAgent(t testing.TB) {
	t.Helper()
	out, err := c.Kubectl("apply", "-k", c.repoPath(Overlay))
	if err != nil {
		t.Fatalf("realcluster: %v", err)
	}
	t.Logf("%s", strings.TrimSpace(out))
}

// WaitDaemonSet waits until the DaemonSet has its latest generation
// observed, updated and available on every node it schedules to, and
// returns how long it took.
func (c *Cluster) WaitDaemonSet(t testing.TB, ns, name string, timeout time.Duration) time.Duration {
	t.Helper()
	began := time.Now()
	var last *appsv1.DaemonSet
	err := Poll(timeout, func() error {
		ds, err := c.Client.AppsV1().DaemonSets(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		last = ds
		s := ds.Status
		if s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != int32(len(c.Nodes)) ||
			s.UpdatedNumberScheduled != s.DesiredNumberScheduled || s.NumberAvailable != s.DesiredNumberScheduled ||
			s.NumberReady != s.DesiredNumberScheduled || s.CurrentNumberScheduled != s.DesiredNumberScheduled {
			return fmt.Errorf("daemonset %s/%s: %+v", ns, name, s)
		}
		return nil
	})
	if err != nil {
		c.DumpPods(t, ns)
		t.Fatalf("realcluster: %v", err)
	}
	_ = last
	return time.Since(began)
}

// DumpPods logs the pods of a namespace with their conditions and the
// last events, for failure messages.
func (c *Cluster) DumpPods(t testing.TB, ns string) {
	t.Helper()
	out, _ := c.Kubectl("get", "pods", "-n", ns, "-o", "wide")
	t.Logf("pods in %s:\n%s", ns, out)
	out, _ = c.Kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp")
	t.Logf("events in %s (tail):\n%s", ns, lastLines(out, 25))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// PodsOf returns the running pods of a namespace matching a label
// selector.
func (c *Cluster) PodsOf(t testing.TB, ns, selector string) []corev1.Pod {
	t.Helper()
	l, err := c.Client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatalf("realcluster: list pods: %v", err)
	}
	var out []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			out = append(out, p)
		}
	}
	return out
}

// Node returns the node of name.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// HTTPGet does a GET of http://ip:port/path from inside node's netns.
func (n *Node) HTTPGet(ip string, port int, path string) (int, []byte, error) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: cluster.NetnsDialer(n.Netns), Proxy: nil}}
	resp, err := client.Get(fmt.Sprintf("http://%s%s", net.JoinHostPort(ip, fmt.Sprint(port)), path))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return resp.StatusCode, b, err
}

// AgentDebug GETs a path of the node's agent debug server (127.0.0.1:15099
// in the node netns: the agent is hostNetwork).
func (n *Node) AgentDebug(path string) (int, []byte, error) {
	return n.HTTPGet("127.0.0.1", AgentDebugPort, path)
}

// ContainerLogs returns the lines a container wrote to stdout, from the
// kubelet's log files of every restart (CRI format: time stream tag text).
func (n *Node) ContainerLogs(pod *corev1.Pod, container string) ([]string, error) {
	dir := filepath.Join(n.PodLogsDir, fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), container)
	files, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(fh)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			parts := strings.SplitN(sc.Text(), " ", 4)
			if len(parts) == 4 && parts[1] == "stdout" {
				out = append(out, parts[3])
			}
		}
		fh.Close()
	}
	return out, nil
}

// ZtunnelRecords returns what the test ztunnel pods of a node recorded
// (every ztunnel pod ever on the node whose logs are still there), each
// with the pod's name.
func (c *Cluster) ZtunnelRecords(t testing.TB, n *Node) []ZRecord {
	t.Helper()
	out, err := c.ZtunnelRecordsErr(n)
	if err != nil {
		t.Fatalf("realcluster: %v", err)
	}
	return out
}

// ZtunnelRecordsErr is ZtunnelRecords returning its error.
func (c *Cluster) ZtunnelRecordsErr(n *Node) ([]ZRecord, error) {
	l, err := c.Client.CoreV1().Pods(ZtunnelNamespace).List(context.Background(), metav1.ListOptions{LabelSelector: "app=ztunnel", FieldSelector: "spec.nodeName=" + n.Name})
	if err != nil {
		return nil, err
	}
	var out []ZRecord
	for i := range l.Items {
		lines, err := n.ContainerLogs(&l.Items[i], "ztunnel")
		if err != nil {
			return nil, err
		}
		for _, line := range lines {
			var r record.Record
			if json.Unmarshal([]byte(line), &r) == nil && r.Listener != 0 {
				out = append(out, ZRecord{Record: r, Pod: l.Items[i].Name})
			}
		}
	}
	return out, nil
}

// ZRecord is a test ztunnel record and the ztunnel pod that wrote it.
type ZRecord struct {
	record.Record
	Pod string
}

// PodNetns returns an nsfs path of a running pod's network namespace (its
// first container's /proc/<pid>/ns/net, from the node's containerd).
func (n *Node) PodNetns(pod *corev1.Pod) (string, error) {
	if len(pod.Status.ContainerStatuses) == 0 {
		return "", fmt.Errorf("%s: no container status", pod.Name)
	}
	id := strings.TrimPrefix(pod.Status.ContainerStatuses[0].ContainerID, "containerd://")
	out, err := n.Ctr("tasks", "ls")
	if err != nil {
		return "", fmt.Errorf("ctr tasks ls: %v: %s", err, out)
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[0] == id && f[2] == "RUNNING" {
			return "/proc/" + f[1] + "/ns/net", nil
		}
	}
	return "", fmt.Errorf("%s: container %s has no running task:\n%s", pod.Name, id, out)
}

// NodeNetnsPath is the node's network namespace.
func (n *Node) NodeNetnsPath() string { return filepath.Join(cluster.NetnsDir, n.Netns) }

// NodePath returns path as the node's processes see it (through its mount
// namespace holder's /proc/<pid>/root): tmpfs volumes the kubelet mounts,
// such as projected tokens, exist only there.
func (n *Node) NodePath(path string) string {
	return filepath.Join(fmt.Sprintf("/proc/%d/root", n.holder.Pid()), path)
}
