//go:build linux

// Package realcluster runs a real Kubernetes cluster on this one machine,
// without docker: N nodes, each a network namespace and a mount namespace
// of its own holding a Debian containerd + runc and a kubelet, with ptp +
// host-local as the primary CNI; etcd, kube-apiserver (test/cluster),
// kube-controller-manager and kube-scheduler in a control-plane namespace
// joined to the nodes by a bridge (the underlay); kube-proxy (iptables,
// or nftables where Options say so) per node. Images are docker-archive tars (package image) imported into
// every node's containerd. The agent is then installed with `kubectl apply
// -k` like a user installs it (see the tests and cmd/cluster).
//
// Everything it changes on the machine is recorded in <dir>/state.json
// before it is changed, and State.Teardown undoes it, also after a killed
// run (Start tears down what a previous run in the same dir left).
package realcluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambient-redirect/ambient-redirect/test/cluster"
	"github.com/ambient-redirect/ambient-redirect/test/realcluster/image"
)

// Addresses of the cluster (private ranges, only inside our namespaces).
const (
	APIServerIP = "10.200.0.1" // on the underlay bridge in the control-plane netns
	underlayLen = 24
	bridgeName  = "arbr0"
	// PodCIDRFormat is node i's pod range (i from 1).
	PodCIDRFormat = "10.244.%d.0/24"
)

// NodeIP is node i's underlay address (i from 1).
func NodeIP(i int) string { return fmt.Sprintf("10.200.0.%d", 10+i) }

// Options configure Start.
type Options struct {
	// Dir is the work directory (state, node dirs, logs); it is removed at
	// teardown. A state.json left there by a killed run is torn down first.
	Dir string
	// Prefix names our namespaces and cgroups ("arc" -> arc-cp,
	// arc-node-1, /arc-node-1).
	Prefix string
	// Nodes is the number of nodes (default 2).
	Nodes int
	// Repo is the module root (images are built from it).
	Repo string
	// AgentTags are the agent image tags to build (default "v1").
	AgentTags []string
	// KubeProxyModes are the nodes' kube-proxy modes, by node index
	// ("iptables" or "nftables"; default iptables).
	KubeProxyModes []string
}

// Node is one node.
type Node struct {
	Index   int
	Name    string // node-<i>
	Netns   string // <prefix>-node-<i>
	IP      string
	PodCIDR string
	Dir     string
	// KubeProxyMode is the mode its kube-proxy runs in.
	KubeProxyMode string
	// CNIConfDir, CNIBinDir are the node's /etc/cni/net.d and /opt/cni/bin
	// as seen from this machine.
	CNIConfDir, CNIBinDir string
	// ConflistName is the primary conflist's file name.
	ConflistName string
	// PodLogsDir is the kubelet's podLogsDir.
	PodLogsDir string
	Socket     string // containerd's socket
	CgroupRoot string

	holder     *cluster.Process
	mntIno     uint64
	containerd *cluster.Process
	kubelet    *cluster.Process
	kubeProxy  *cluster.KubeProxy
	c          *Cluster
}

// Cluster is a running cluster.
type Cluster struct {
	Opts    Options
	State   *State
	CP      *cluster.ControlPlane
	Client  kubernetes.Interface
	Nodes   []*Node
	Images  image.Archives
	BinDir  string
	CPNetns string
	AdminKC string // kubeconfig of the admin (for processes inside our netns)

	cm, sched *cluster.Process
}

// hostMounts are the node paths bind-mounted from per-node directories
// inside each node's mount namespace (host path -> node dir name). The
// agent's DaemonSet mounts them by fixed hostPath.
var hostMounts = [][2]string{
	{"/opt/cni/bin", "cni-bin"},
	{"/etc/cni/net.d", "cni-conf"},
	{"/var/lib/cni", "var-lib-cni"},
	{"/run/netns", "netns"},
	{"/run/ambient-redirect", "run-ambient-redirect"},
	{"/run/containerd", "run-containerd"},
	{"/var/log/containers", "log-containers"},
}

// hostFileMounts are files bind-mounted the same way.
var hostFileMounts = [][2]string{
	{"/run/xtables.lock", "xtables.lock"},
}

func logf(t testing.TB) func(string, ...any) {
	return func(f string, a ...any) { t.Logf(f, a...) }
}

// Start brings a cluster up and registers its teardown with t.Cleanup.
func Start(t testing.TB, o Options) *Cluster {
	t.Helper()
	began := time.Now()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	if o.Prefix == "" {
		o.Prefix = "arc"
	}
	if len(o.AgentTags) == 0 {
		o.AgentTags = []string{"v1"}
	}
	for _, tool := range []string{"containerd", "runc", "ctr", "nsenter", "unshare", "ip", "mmdebstrap"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("realcluster: %s not found (apt-get install containerd runc mmdebstrap util-linux iproute2)", tool)
		}
	}
	if old, err := LoadState(o.Dir); err != nil {
		t.Fatalf("realcluster: %v", err)
	} else if old != nil {
		t.Logf("realcluster: tearing down what a previous run left in %s", o.Dir)
		if err := old.Teardown(logf(t)); err != nil {
			t.Fatalf("realcluster: stale teardown: %v", err)
		}
	}
	if err := os.RemoveAll(o.Dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	st := &State{Dir: o.Dir, Netns: map[string]uint64{}, Sysctls: map[string]string{}}
	for _, s := range GlobalSysctls {
		v, err := readSysctl(s)
		if err != nil {
			t.Fatal(err)
		}
		st.Sysctls[s] = v
	}
	must(t, st.save())
	c := &Cluster{Opts: o, State: st, CPNetns: o.Prefix + "-cp"}
	t.Cleanup(func() {
		c.stopNodes(t)
		if err := st.Teardown(logf(t)); err != nil {
			t.Errorf("realcluster: teardown: %v", err)
		}
	})

	binDir, err := cluster.BinDir()
	must(t, err)
	c.BinDir = binDir
	cache, err := cacheDir()
	must(t, err)
	imgStart := time.Now()
	c.Images, err = image.Build(o.Repo, filepath.Join(o.Dir, "images"), cache, o.AgentTags, logf(t))
	must(t, err)
	t.Logf("realcluster: images built in %s", time.Since(imgStart).Round(time.Millisecond))

	c.network(t)
	c.CP = cluster.StartWith(t, c.CPNetns, APIServerIP, cluster.Options{APIServerArgs: apiserverArgs})
	c.Client = c.CP.AdminClient()
	c.AdminKC = c.CP.AdminKubeconfig(t)
	c.startControllers(t)
	for _, n := range c.Nodes {
		n.start(t)
	}
	c.waitNodesReady(t, 90*time.Second)
	t.Logf("realcluster: %d nodes Ready after %s (work dir %s)", len(c.Nodes), time.Since(began).Round(time.Millisecond), o.Dir)
	return c
}

// apiserverArgs turns test/cluster's apiserver (no controller-manager, no
// kubelets) into a real cluster's: the kubernetes Service gets endpoints,
// pods get their ServiceAccount token volume, the apiserver reaches
// kubelets by their InternalIP.
func apiserverArgs(argv []string) []string {
	var out []string
	for _, a := range argv {
		switch a {
		case "--endpoint-reconciler-type=none", "--disable-admission-plugins=ServiceAccount":
			continue
		}
		out = append(out, a)
	}
	return append(out, "--kubelet-preferred-address-types=InternalIP")
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("realcluster: %v", err)
	}
}

func run(t testing.TB, argv ...string) string {
	t.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("realcluster: %s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

func cacheDir() (string, error) {
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", err
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "ambient-redirect", "images"), nil
}

// addNetns creates a network namespace and records it.
func (c *Cluster) addNetns(t testing.TB, name string) {
	t.Helper()
	c.State.Netns[name] = 0
	must(t, c.State.save())
	run(t, "ip", "netns", "add", name)
	ino, err := nsInode(filepath.Join(cluster.NetnsDir, name))
	must(t, err)
	if self, err := nsInode("/proc/self/ns/net"); err != nil || self == ino {
		t.Fatalf("realcluster: netns %s has this process's inode %d (%v)", name, ino, err)
	}
	c.State.Netns[name] = ino
	must(t, c.State.save())
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
}

// network makes the control-plane namespace with the underlay bridge and a
// namespace per node joined to it by a veth, with routes to every other
// node's pod range.
func (c *Cluster) network(t testing.TB) {
	t.Helper()
	c.addNetns(t, c.CPNetns)
	cp := c.CPNetns
	run(t, "ip", "-n", cp, "link", "add", bridgeName, "type", "bridge")
	run(t, "ip", "-n", cp, "addr", "add", APIServerIP+"/"+strconv.Itoa(underlayLen), "dev", bridgeName)
	run(t, "ip", "-n", cp, "link", "set", bridgeName, "up")
	for i := 1; i <= c.Opts.Nodes; i++ {
		n := &Node{
			Index: i, Name: fmt.Sprintf("node-%d", i), Netns: fmt.Sprintf("%s-node-%d", c.Opts.Prefix, i),
			IP: NodeIP(i), PodCIDR: fmt.Sprintf(PodCIDRFormat, i),
			Dir: filepath.Join(c.Opts.Dir, "nodes", fmt.Sprintf("node-%d", i)), c: c,
			CgroupRoot: fmt.Sprintf("%s-node-%d", c.Opts.Prefix, i),
		}
		c.Nodes = append(c.Nodes, n)
		n.wire(t)
	}
	for _, n := range c.Nodes {
		n.routes(t)
	}
}

// wire creates the node's network namespace, joined to the underlay bridge
// by a veth, with a default route to the control plane and ip_forward on.
func (n *Node) wire(t testing.TB) {
	t.Helper()
	c, cp := n.c, n.c.CPNetns
	c.addNetns(t, n.Netns)
	peer := fmt.Sprintf("arn%d", n.Index)
	run(t, "ip", "-n", cp, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", n.Netns)
	run(t, "ip", "-n", cp, "link", "set", peer, "master", bridgeName, "up")
	run(t, "ip", "-n", n.Netns, "addr", "add", n.IP+"/"+strconv.Itoa(underlayLen), "dev", "eth0")
	run(t, "ip", "-n", n.Netns, "link", "set", "eth0", "up")
	// Service VIPs (and anything else) leave through the underlay; the
	// node's kube-proxy DNATs them first.
	run(t, "ip", "-n", n.Netns, "route", "add", "default", "via", APIServerIP)
	run(t, "ip", "netns", "exec", n.Netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
}

// routes adds routes to every other node's pod range.
func (n *Node) routes(t testing.TB) {
	t.Helper()
	for _, m := range n.c.Nodes {
		if m != n {
			run(t, "ip", "-n", n.Netns, "route", "add", m.PodCIDR, "via", m.IP)
		}
	}
}

// PowerOff takes away what a reboot takes away: it stops the kubelet and
// kube-proxy, kills containerd, the shims and every container of the node
// (the agent and ztunnel included), deletes the node's network namespace
// (all kernel state in it: the agent's, kube-proxy's, the pods' veths)
// with the pods' network namespaces, the node's cgroups and the contents
// of its /run directories. Files on "disk" (CNI dirs, kubelet and
// containerd roots) stay.
func (n *Node) PowerOff(t testing.TB) {
	t.Helper()
	n.StopKubelet(t)
	n.kubeProxy.Stop(t)
	sub := &State{Dir: n.c.State.Dir, Netns: map[string]uint64{n.Netns: n.c.State.Netns[n.Netns]}, MountNs: []uint64{n.mntIno}, CgroupRoots: []string{n.CgroupRoot}}
	deadline := time.Now().Add(30 * time.Second)
	for pids := sub.ourPids(); len(pids) > 0; pids = sub.ourPids() {
		if time.Now().After(deadline) {
			t.Fatalf("realcluster: %s: processes survive SIGKILL: %v", n.Name, pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	<-n.holder.Done()
	<-n.containerd.Done()
	// The mount namespace is gone; its inode number may be reused.
	st := n.c.State
	for i, ino := range st.MountNs {
		if ino == n.mntIno {
			st.MountNs = append(st.MountNs[:i], st.MountNs[i+1:]...)
			break
		}
	}
	must(t, st.save())
	mounts, err := cgroupMounts()
	must(t, err)
	for _, m := range mounts {
		must(t, removeCgroupTree(filepath.Join(m, n.CgroupRoot)))
	}
	// The underlay veth goes with the node's netns, but the kernel frees a
	// netns asynchronously: delete it now, so that PowerOn can make it again.
	run(t, "ip", "-n", n.c.CPNetns, "link", "del", fmt.Sprintf("arn%d", n.Index))
	run(t, "ip", "netns", "del", n.Netns)
	for _, d := range []string{"run-containerd", "netns", "run-ambient-redirect", "containerd/state"} {
		must(t, os.RemoveAll(filepath.Join(n.Dir, d)))
		must(t, os.MkdirAll(filepath.Join(n.Dir, d), 0o755))
	}
}

// PowerOn starts a node PowerOff stopped: network namespace and underlay,
// mount namespace, cgroups, containerd (its images are still there),
// kubelet and kube-proxy.
func (n *Node) PowerOn(t testing.TB) {
	t.Helper()
	n.wire(t)
	n.routes(t)
	n.startHolder(t)
	n.makeCgroupRoot(t)
	n.startContainerd(t)
	n.startKubelet(t)
	n.kubeProxy.Start(t)
}

// startControllers runs kube-controller-manager and kube-scheduler in the
// control-plane namespace with the admin kubeconfig.
func (c *Cluster) startControllers(t testing.TB) {
	t.Helper()
	nsenter := []string{"nsenter", "--net=" + filepath.Join(cluster.NetnsDir, c.CPNetns), "--"}
	logs := filepath.Join(c.Opts.Dir, "logs")
	must(t, os.MkdirAll(logs, 0o755))
	var err error
	c.cm, err = cluster.StartProcess("kube-controller-manager", filepath.Join(logs, "kube-controller-manager.log"), append(nsenter,
		filepath.Join(c.BinDir, cluster.ControllerManagerBinary),
		"--kubeconfig="+c.AdminKC,
		"--leader-elect=false",
		"--secure-port=0",
		"--root-ca-file="+c.CP.CAFile(),
		"--service-account-private-key-file="+c.CP.ServiceAccountKeyFile(),
		"--service-cluster-ip-range="+cluster.ServiceClusterIPRange,
		"--allocate-node-cidrs=false",
		"--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle",
		"--v=1",
	))
	must(t, err)
	c.sched, err = cluster.StartProcess("kube-scheduler", filepath.Join(logs, "kube-scheduler.log"), append(nsenter,
		filepath.Join(c.BinDir, cluster.SchedulerBinary),
		"--kubeconfig="+c.AdminKC,
		"--leader-elect=false",
		"--secure-port=0",
		"--v=1",
	))
	must(t, err)
}

// start makes the node's directories, its mount namespace, cgroup root,
// containerd (with the images imported), kubelet and kube-proxy.
func (n *Node) start(t testing.TB) {
	t.Helper()
	c := n.c
	began := time.Now()
	dirs := []string{"containerd/root", "containerd/state", "containerd/opt", "kubelet", "pod-logs", "volume-plugins", "logs"}
	for _, m := range hostMounts {
		dirs = append(dirs, m[1])
	}
	for _, d := range dirs {
		must(t, os.MkdirAll(filepath.Join(n.Dir, d), 0o755))
	}
	for _, m := range hostFileMounts {
		must(t, os.WriteFile(filepath.Join(n.Dir, m[1]), nil, 0o600))
	}
	n.CNIConfDir = filepath.Join(n.Dir, "cni-conf")
	n.CNIBinDir = filepath.Join(n.Dir, "cni-bin")
	n.PodLogsDir = filepath.Join(n.Dir, "pod-logs")
	n.Socket = filepath.Join(n.Dir, "containerd.sock")
	for _, p := range []string{"ptp", "host-local", "loopback"} {
		b, err := os.ReadFile(filepath.Join("/usr/lib/cni", p))
		if err != nil {
			t.Fatalf("realcluster: %v (apt-get install containernetworking-plugins)", err)
		}
		must(t, os.WriteFile(filepath.Join(n.CNIBinDir, p), b, 0o755))
	}
	n.ConflistName = "10-ptp.conflist"
	must(t, os.WriteFile(filepath.Join(n.CNIConfDir, n.ConflistName), []byte(fmt.Sprintf(conflist, n.PodCIDR)), 0o644))
	must(t, os.WriteFile(filepath.Join(n.Dir, "resolv.conf"), []byte("nameserver "+APIServerIP+"\n"), 0o644))

	// Mount points on this machine for the node's bind mounts.
	for _, m := range hostMounts {
		n.ensureHostPath(t, m[0], true)
	}
	for _, m := range hostFileMounts {
		n.ensureHostPath(t, m[0], false)
	}
	n.startHolder(t)
	n.makeCgroupRoot(t)
	n.startContainerd(t)
	n.importImages(t)
	n.startKubelet(t)
	n.KubeProxyMode = "iptables"
	if n.Index < len(c.Opts.KubeProxyModes) {
		n.KubeProxyMode = c.Opts.KubeProxyModes[n.Index]
	}
	n.kubeProxy = c.CP.LaunchKubeProxyMode(t, n.Netns, n.Name, c.AdminKC, n.KubeProxyMode)
	t.Logf("realcluster: %s: containerd and kubelet started in %s", n.Name, time.Since(began).Round(time.Millisecond))
}

const conflist = `{
  "cniVersion": "0.4.0",
  "name": "ptp",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "%s"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
`

// ensureHostPath creates a missing mount point on this machine (and its
// missing parents), recording each so teardown removes it.
func (n *Node) ensureHostPath(t testing.TB, p string, dir bool) {
	t.Helper()
	st := n.c.State
	var missing []string
	for d := p; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		}
		missing = append([]string{d}, missing...)
	}
	for i, d := range missing {
		st.Created = append(st.Created, d)
		must(t, st.save())
		if i == len(missing)-1 && !dir {
			must(t, os.WriteFile(d, nil, 0o600))
		} else {
			must(t, os.Mkdir(d, 0o755))
		}
	}
}

// startHolder starts the process holding the node's mount namespace: a
// private copy of this machine's mounts with / made rshared (as on a
// systemd host: the DaemonSet's HostToContainer mounts need it), the
// node's directories bind-mounted over the fixed paths, and /run/netns a
// shared mount of its own (pod netns stay in the node; the agent sees them
// appear).
func (n *Node) startHolder(t testing.TB) {
	t.Helper()
	ready := filepath.Join(n.Dir, "holder.ready")
	// A ready file of an earlier boot would be taken for this one's.
	if err := os.Remove(ready); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var sb strings.Builder
	sb.WriteString("set -e\nmount --make-rshared /\n")
	// Drop the copies of this machine's netns mounts (they would keep
	// other namespaces alive), then put the node's own dir there.
	sb.WriteString("umount -R -l /run/netns 2>/dev/null || true\n")
	for _, m := range append(append([][2]string{}, hostMounts...), hostFileMounts...) {
		fmt.Fprintf(&sb, "mount --bind %q %q\n", filepath.Join(n.Dir, m[1]), m[0])
	}
	sb.WriteString("mount --make-private /run/netns\nmount --make-shared /run/netns\n")
	// The holder's command line names the work directory: teardown knows
	// the mount namespace is ours by it (see State.ourPids).
	fmt.Fprintf(&sb, "touch %q\nexec -a %q sleep infinity\n", ready, "ambient-redirect-node-holder "+n.Dir)
	p, err := cluster.StartProcess(n.Name+"-holder", filepath.Join(n.Dir, "logs", "holder.log"), []string{
		"nsenter", "--net=" + filepath.Join(cluster.NetnsDir, n.Netns), "--",
		"unshare", "--mount", "--propagation", "private", "--", "bash", "-c", sb.String(),
	})
	must(t, err)
	n.holder = p
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if p.Exited() || time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(n.Dir, "logs", "holder.log"))
			t.Fatalf("realcluster: %s: mount namespace holder did not get ready:\n%s", n.Name, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ino, err := nsInode(fmt.Sprintf("/proc/%d/ns/mnt", p.Pid()))
	must(t, err)
	if self, err := nsInode("/proc/self/ns/mnt"); err != nil || self == ino {
		t.Fatalf("realcluster: %s: the holder is in this process's mount namespace (%d, %v)", n.Name, ino, err)
	}
	n.mntIno = ino
	n.c.State.MountNs = append(n.c.State.MountNs, ino)
	must(t, n.c.State.save())
}

// Enter returns the argv prefix that runs a command in the node's network
// and mount namespaces.
func (n *Node) Enter() []string {
	return []string{"nsenter", "-t", strconv.Itoa(n.holder.Pid()), "-m", "-n", "--"}
}

// makeCgroupRoot creates the kubelet's cgroup root in every v1 hierarchy
// (cpuset needs its cpus and mems copied from the parent).
func (n *Node) makeCgroupRoot(t testing.TB) {
	t.Helper()
	st := n.c.State
	if !slices.Contains(st.CgroupRoots, n.CgroupRoot) {
		st.CgroupRoots = append(st.CgroupRoots, n.CgroupRoot)
		must(t, st.save())
	}
	mounts, err := cgroupMounts()
	must(t, err)
	for _, m := range mounts {
		d := filepath.Join(m, n.CgroupRoot)
		if err := os.Mkdir(d, 0o755); err != nil && !os.IsExist(err) {
			t.Fatalf("realcluster: %v", err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if b, err := os.ReadFile(filepath.Join(m, f)); err == nil {
				must(t, os.WriteFile(filepath.Join(d, f), b, 0o644))
			}
		}
	}
}

const containerdConfig = `version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %[3]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj would fail.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
`

func (n *Node) startContainerd(t testing.TB) {
	t.Helper()
	cfg := filepath.Join(n.Dir, "containerd.toml")
	must(t, os.WriteFile(cfg, []byte(fmt.Sprintf(containerdConfig,
		filepath.Join(n.Dir, "containerd/root"), filepath.Join(n.Dir, "containerd/state"),
		n.Socket, filepath.Join(n.Dir, "containerd/opt"), image.Pause)), 0o644))
	p, err := cluster.StartProcess(n.Name+"-containerd", filepath.Join(n.Dir, "logs", "containerd.log"),
		append(n.Enter(), "containerd", "--config", cfg))
	must(t, err)
	n.containerd = p
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command("ctr", "-a", n.Socket, "version").CombinedOutput()
		if err == nil {
			break
		}
		if p.Exited() || time.Now().After(deadline) {
			t.Fatalf("realcluster: %s: containerd not up: %v %s\n%s", n.Name, err, out, tailFile(filepath.Join(n.Dir, "logs", "containerd.log"), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Ctr runs ctr against the node's containerd in the k8s.io namespace.
func (n *Node) Ctr(args ...string) (string, error) {
	out, err := exec.Command("ctr", append([]string{"-a", n.Socket, "-n", "k8s.io"}, args...)...).CombinedOutput()
	return string(out), err
}

func (n *Node) importImages(t testing.TB) {
	t.Helper()
	for _, a := range n.c.Images.All() {
		if out, err := n.Ctr("images", "import", a); err != nil {
			t.Fatalf("realcluster: %s: ctr images import %s: %v\n%s", n.Name, a, err, out)
		}
	}
}

const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%[1]s
cgroupDriver: cgroupfs
cgroupRoot: /%[2]s
failCgroupV1: false
failSwapOn: false
address: %[3]s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
volumePluginDir: %[4]s
podLogsDir: %[5]s
resolvConf: %[6]s
clusterDomain: cluster.local
hairpinMode: none
# The machine's disk and memory are shared by every node: never evict.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
`

func (n *Node) startKubelet(t testing.TB) {
	t.Helper()
	cfg := filepath.Join(n.Dir, "kubelet.yaml")
	must(t, os.WriteFile(cfg, []byte(fmt.Sprintf(kubeletConfig, n.Socket, n.CgroupRoot, n.IP,
		filepath.Join(n.Dir, "volume-plugins"), n.PodLogsDir, filepath.Join(n.Dir, "resolv.conf"))), 0o644))
	p, err := cluster.StartProcess(n.Name+"-kubelet", filepath.Join(n.Dir, "logs", "kubelet.log"), append(n.Enter(),
		filepath.Join(n.c.BinDir, cluster.KubeletBinary),
		"--config="+cfg,
		"--kubeconfig="+n.c.AdminKC,
		"--hostname-override="+n.Name,
		"--node-ip="+n.IP,
		"--root-dir="+filepath.Join(n.Dir, "kubelet"),
		"--v=2",
	))
	must(t, err)
	n.kubelet = p
}

// StopKubelet and StopContainerd stop them (SIGTERM, then SIGKILL).
func (n *Node) StopKubelet(t testing.TB) {
	t.Helper()
	if n.kubelet != nil {
		must(t, n.kubelet.Stop(15*time.Second))
	}
}

// StopContainerd stops containerd; the shims and containers keep running.
func (n *Node) StopContainerd(t testing.TB) {
	t.Helper()
	if n.containerd != nil {
		must(t, n.containerd.Stop(15*time.Second))
	}
}

// StartContainerd and StartKubelet start them again.
func (n *Node) StartContainerd(t testing.TB) { t.Helper(); n.startContainerd(t) }

// StartKubelet starts the kubelet again.
func (n *Node) StartKubelet(t testing.TB) { t.Helper(); n.startKubelet(t) }

func (c *Cluster) stopNodes(t testing.TB) {
	for _, n := range c.Nodes {
		if n.kubelet != nil {
			_ = n.kubelet.Stop(10 * time.Second)
		}
	}
	for _, p := range []*cluster.Process{c.cm, c.sched} {
		if p != nil {
			_ = p.Stop(10 * time.Second)
		}
	}
	if t.Failed() {
		for _, n := range c.Nodes {
			t.Logf("--- %s kubelet log (tail) ---\n%s", n.Name, tailFile(filepath.Join(n.Dir, "logs", "kubelet.log"), 40))
			t.Logf("--- %s containerd log (tail) ---\n%s", n.Name, tailFile(filepath.Join(n.Dir, "logs", "containerd.log"), 20))
		}
	}
}

func (c *Cluster) waitNodesReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	err := Poll(timeout, func() error {
		for _, n := range c.Nodes {
			if n.kubelet.Exited() {
				return fmt.Errorf("kubelet of %s exited: %v", n.Name, n.kubelet.Err())
			}
			node, err := c.Client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if !nodeReady(node) {
				return fmt.Errorf("node %s not Ready", n.Name)
			}
		}
		// Pods need their namespace's default ServiceAccount.
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(context.Background(), "default", metav1.GetOptions{})
		return err
	})
	if err != nil {
		for _, n := range c.Nodes {
			t.Logf("--- %s kubelet log (tail) ---\n%s", n.Name, tailFile(filepath.Join(n.Dir, "logs", "kubelet.log"), 40))
		}
		t.Fatalf("realcluster: nodes not ready: %v", err)
	}
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Poll calls f every 200ms until it returns nil or timeout passes.
func Poll(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func tailFile(p string, n int) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Kubectl runs the cached kubectl with the admin credentials inside the
// control-plane namespace (the apiserver's address exists only there).
func (c *Cluster) Kubectl(args ...string) (string, error) {
	kc := filepath.Join(c.Opts.Dir, "kubeconfig")
	if _, err := os.Stat(kc); err != nil {
		b, err := os.ReadFile(c.AdminKC)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(kc, b, 0o600); err != nil {
			return "", err
		}
	}
	argv := append([]string{"netns", "exec", c.CPNetns, filepath.Join(c.BinDir, cluster.KubectlBinary), "--kubeconfig=" + kc}, args...)
	out, err := exec.Command("ip", argv...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// FileDigest returns the sha256 of a file ("" if it cannot be read).
func FileDigest(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return ""
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// NodeOf returns the node whose pod range holds ip.
func (c *Cluster) NodeOf(ip string) *Node {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return nil
	}
	for _, n := range c.Nodes {
		if netip.MustParsePrefix(n.PodCIDR).Contains(a) {
			return n
		}
	}
	return nil
}

// SaveState writes the cluster's state file.
func (c *Cluster) SaveState() error { return c.State.save() }
