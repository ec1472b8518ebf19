//go:build linux

package netnstest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// PrefixBase starts every cluster prefix ("ar" + 6 random hex digits).
const PrefixBase = "ar"

// LockDir holds one flock'ed file per live cluster so that CleanupStale,
// possibly running in another test process, never deletes a live cluster's
// namespaces.
const LockDir = "/var/run/netnstest"

// UnderlayBridge is the bridge inside the underlay namespace.
const UnderlayBridge = "br0"

// CNIPath holds the CNI plugins (Debian's containernetworking-plugins).
var CNIPath = "/usr/lib/cni"

var (
	clusterNSRe   = regexp.MustCompile(`^` + PrefixBase + `[0-9a-f]{6}-`)
	clusterIPAMRe = regexp.MustCompile(`^` + PrefixBase + `[0-9a-f]{6}\.ipam$`)
)

// Family is the set of address families a cluster's pods get.
type Family int

const (
	// DualStack pods get an IPv4 and an IPv6 address (the default).
	DualStack Family = iota
	// IPv4Only pods get an IPv4 address; nodes have no IPv6 underlay.
	IPv4Only
	// IPv6Only pods get an IPv6 address; nodes keep their IPv4 underlay
	// next to the IPv6 one, but pod traffic between nodes is IPv6.
	IPv6Only
)

// HasIPv4 reports whether pods get an IPv4 address.
func (f Family) HasIPv4() bool { return f != IPv6Only }

// HasIPv6 reports whether pods get an IPv6 address.
func (f Family) HasIPv6() bool { return f != IPv4Only }

func (f Family) String() string {
	switch f {
	case DualStack:
		return "dual-stack"
	case IPv4Only:
		return "IPv4-only"
	case IPv6Only:
		return "IPv6-only"
	}
	return fmt.Sprintf("Family(%d)", int(f))
}

// Options customise NewClusterWith; the zero value is NewCluster's.
type Options struct {
	Family Family
}

// Cluster is a set of node namespaces joined by an underlay bridge network.
type Cluster struct {
	Prefix string
	Family Family
	Nodes  []*Node
	// UnderlayNS is the namespace holding the underlay bridge (<prefix>-ul).
	UnderlayNS string
	// IPAMDir holds the host-local IPAM state of every node (one
	// subdirectory each); Close removes it.
	IPAMDir string

	mu         sync.Mutex
	created    []string // namespaces created, in order
	closeOnce  sync.Once
	closeErr   error
	lock       *os.File
	ulHandle   *netlink.Handle
	ulNsHandle netns.NsHandle
}

// Node is a Kubernetes-node-shaped network namespace.
type Node struct {
	Name  string // "node<i>"
	NS    string // "<prefix>-node<i>"
	Index int    // 1-based
	IP    net.IP // IPv4 underlay address 172.18.0.<i+1> (every family)
	IP6   net.IP // IPv6 underlay address fd00:172:18::<i+1>; nil in IPv4-only clusters
	// PodCIDR and Gateway are the first family's: 10.244.<i>.0/24 and
	// 10.244.<i>.1, or in IPv6-only clusters fd00:10:244:<i>::/64 and ::1.
	PodCIDR *net.IPNet
	Gateway net.IP // on every host-side veth (/32, /128)
	// PodCIDRs are all pod CIDRs, IPv4 first.
	PodCIDRs []*net.IPNet
	// PodCIDR6 and Gateway6 are the IPv6 ones; nil in IPv4-only clusters.
	PodCIDR6 *net.IPNet
	Gateway6 net.IP
	// Handle is a netlink handle bound to the node namespace.
	Handle *netlink.Handle
	// NsHandle is an open fd of the node namespace.
	NsHandle netns.NsHandle
	Pods     []*Pod

	cluster *Cluster
}

// Pod is a pod network namespace wired to its node by the real ptp CNI
// plugin with host-local IPAM.
type Pod struct {
	Name string
	NS   string // "<prefix>-<node>-<name>"
	// IP is the IPv4 address, or the IPv6 one in IPv6-only clusters.
	IP  net.IP
	IP6 net.IP   // the IPv6 address; nil in IPv4-only clusters
	IPs []net.IP // every address, IPv4 first
	// HostVeth is the host-side veth in the node namespace (named by ptp).
	HostVeth      string
	HostVethIndex int // its ifindex in the node namespace
	// ChainTook is how long the chained plugin's ADD took (WithChain).
	ChainTook time.Duration
	Node      *Node
	NsHandle  netns.NsHandle
	// Handle is a netlink handle bound to the pod namespace.
	Handle *netlink.Handle

	deleted bool
}

// PodOption customises AddPod.
type PodOption func(*podConfig)

type podConfig struct {
	ips   []net.IP
	chain *Chain
}

// Chain is a plugin chained after ptp in the node's conflist, run the way a
// container runtime (libcni) runs one: its binary is the entry's "type"
// looked up in Path, run after ptp's ADD with ptp's result as prevResult,
// CNI_PATH and the Kubernetes CNI_ARGS.
type Chain struct {
	// Path is the runtime's CNI bin dirs (CNI_PATH), searched in order for
	// the entry's type.
	Path []string
	// Conf is the plugin's entry in the conflist ("type" included).
	Conf map[string]any
	// Args is CNI_ARGS (K8S_POD_NAMESPACE=...;K8S_POD_NAME=...;...).
	Args string
}

// WithChain runs c after ptp. A failed chained ADD fails AddPod (ptp's
// part is undone with DEL, as a runtime does).
func WithChain(c Chain) PodOption { return func(pc *podConfig) { pc.chain = &c } }

// WithIP requests a specific address from the node's pod CIDR of its
// family instead of host-local's next one; give it once per family at
// most. The other family's address is allocated as usual.
func WithIP(ip net.IP) PodOption { return func(c *podConfig) { c.ips = append(c.ips, ip) } }

// NewCluster creates a dual-stack cluster of n nodes (n in 1..200) and the
// underlay joining them. Everything is torn down by Close, which is
// registered with t.Cleanup. It first removes stale namespaces of crashed
// runs (CleanupStale).
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	return NewClusterWith(t, n, Options{})
}

// NewClusterWith is NewCluster with options (e.g. the address family).
func NewClusterWith(t testing.TB, n int, o Options) *Cluster {
	t.Helper()
	RequireRoot(t)
	if n < 1 || n > 200 {
		t.Fatalf("netnstest: NewCluster: bad node count %d", n)
	}
	if o.Family < DualStack || o.Family > IPv6Only {
		t.Fatalf("netnstest: NewCluster: bad family %v", o.Family)
	}
	if _, err := os.Stat(filepath.Join(CNIPath, "ptp")); err != nil {
		t.Fatalf("netnstest: the ptp CNI plugin is missing (apt-get install containernetworking-plugins): %v", err)
	}
	if err := CleanupStale(PrefixBase); err != nil {
		t.Logf("netnstest: CleanupStale: %v", err)
	}
	var rnd [3]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{Prefix: PrefixBase + hex.EncodeToString(rnd[:]), Family: o.Family, ulNsHandle: -1}
	c.UnderlayNS = c.Prefix + "-ul"
	// Next to the lock, so that CleanupStale finds it after a crash.
	c.IPAMDir = filepath.Join(LockDir, c.Prefix+".ipam")
	if err := c.takeLock(); err != nil {
		t.Fatalf("netnstest: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("netnstest: cluster cleanup: %v", err)
		}
	})
	if err := c.setup(n); err != nil {
		t.Fatalf("netnstest: NewCluster: %v", err)
	}
	return c
}

// Node returns node i (1-based, as in the node names).
func (c *Cluster) Node(i int) *Node {
	if i < 1 || i > len(c.Nodes) {
		panic(fmt.Sprintf("netnstest: no node %d (cluster has %d)", i, len(c.Nodes)))
	}
	return c.Nodes[i-1]
}

// Namespaces lists every namespace this cluster currently owns.
func (c *Cluster) Namespaces() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.created...)
}

func (c *Cluster) takeLock() error {
	if err := os.MkdirAll(LockDir, 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(LockDir, c.Prefix+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		return fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	fmt.Fprintf(f, "%d\n", os.Getpid())
	c.lock = f
	return nil
}

// addNS creates a named namespace with `ip netns add` and records it for
// deletion before anything else can fail.
func (c *Cluster) addNS(name string) (netns.NsHandle, error) {
	if err := checkNSName(name); err != nil {
		return -1, err
	}
	if !strings.HasPrefix(name, c.Prefix+"-") {
		return -1, fmt.Errorf("namespace %q lacks cluster prefix", name)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return -1, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	c.mu.Lock()
	c.created = append(c.created, name)
	c.mu.Unlock()
	h, err := netns.GetFromName(name)
	if err != nil {
		return -1, fmt.Errorf("open netns %s: %w", name, err)
	}
	// Without DAD, IPv6 link-local addresses and their routes settle
	// immediately, which keeps Dump stable right after setup.
	for _, k := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := SetSysctl(name, k, "0"); err != nil && !errors.Is(err, os.ErrNotExist) {
			h.Close()
			return -1, fmt.Errorf("%s in %s: %w", k, name, err)
		}
	}
	return h, nil
}

func newHandle(ns netns.NsHandle) (*netlink.Handle, error) {
	return netlink.NewHandleAt(ns)
}

func setUp(h *netlink.Handle, name string) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	return l, nil
}

func (c *Cluster) setup(n int) error {
	// Underlay.
	var err error
	c.ulNsHandle, err = c.addNS(c.UnderlayNS)
	if err != nil {
		return err
	}
	if c.ulHandle, err = newHandle(c.ulNsHandle); err != nil {
		return err
	}
	if _, err := setUp(c.ulHandle, "lo"); err != nil {
		return err
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: UnderlayBridge}}
	if err := c.ulHandle.LinkAdd(br); err != nil {
		return fmt.Errorf("add underlay bridge: %w", err)
	}
	brLink, err := setUp(c.ulHandle, UnderlayBridge)
	if err != nil {
		return err
	}

	for i := 1; i <= n; i++ {
		node := &Node{
			Name:    fmt.Sprintf("node%d", i),
			Index:   i,
			IP:      net.IPv4(172, 18, 0, byte(i+1)).To4(),
			cluster: c,
		}
		if c.Family.HasIPv4() {
			cidr := &net.IPNet{IP: net.IPv4(10, 244, byte(i), 0).To4(), Mask: net.CIDRMask(24, 32)}
			node.PodCIDRs = append(node.PodCIDRs, cidr)
			node.PodCIDR, node.Gateway = cidr, net.IPv4(10, 244, byte(i), 1).To4()
		}
		if c.Family.HasIPv6() {
			node.IP6 = v6(0xfd00, 0x172, 0x18, 0, uint16(i+1))
			node.PodCIDR6 = &net.IPNet{IP: v6(0xfd00, 0x10, 0x244, uint16(i), 0), Mask: net.CIDRMask(64, 128)}
			node.Gateway6 = v6(0xfd00, 0x10, 0x244, uint16(i), 1)
			node.PodCIDRs = append(node.PodCIDRs, node.PodCIDR6)
			if node.PodCIDR == nil {
				node.PodCIDR, node.Gateway = node.PodCIDR6, node.Gateway6
			}
		}
		node.NS = c.Prefix + "-" + node.Name
		node.NsHandle = -1
		c.Nodes = append(c.Nodes, node)
		if node.NsHandle, err = c.addNS(node.NS); err != nil {
			return err
		}
		if node.Handle, err = newHandle(node.NsHandle); err != nil {
			return err
		}
		sysctls := []string{"net.ipv4.ip_forward"}
		if node.IP6 != nil {
			sysctls = append(sysctls, "net.ipv6.conf.all.forwarding")
		}
		for _, k := range sysctls {
			if err := SetSysctl(node.NS, k, "1"); err != nil {
				return fmt.Errorf("%s in %s: %w", k, node.NS, err)
			}
		}
		h := node.Handle
		if _, err := setUp(h, "lo"); err != nil {
			return err
		}
		peer := fmt.Sprintf("n%d", i)
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: "eth0"},
			PeerName:      peer,
			PeerNamespace: netlink.NsFd(int(c.ulNsHandle)),
		}
		if err := h.LinkAdd(veth); err != nil {
			return fmt.Errorf("add underlay veth for %s: %w", node.Name, err)
		}
		pl, err := c.ulHandle.LinkByName(peer)
		if err != nil {
			return fmt.Errorf("underlay port %s: %w", peer, err)
		}
		if err := c.ulHandle.LinkSetMaster(pl, brLink); err != nil {
			return fmt.Errorf("enslave %s: %w", peer, err)
		}
		if err := c.ulHandle.LinkSetUp(pl); err != nil {
			return fmt.Errorf("set %s up: %w", peer, err)
		}
		eth0, err := setUp(h, "eth0")
		if err != nil {
			return err
		}
		addrs := []*netlink.Addr{{IPNet: &net.IPNet{IP: node.IP, Mask: net.CIDRMask(16, 32)}}}
		if node.IP6 != nil {
			addrs = append(addrs, &netlink.Addr{IPNet: &net.IPNet{IP: node.IP6, Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD})
		}
		for _, addr := range addrs {
			if err := h.AddrAdd(eth0, addr); err != nil {
				return fmt.Errorf("address %s on %s: %w", addr, node.Name, err)
			}
		}
	}
	// Pod CIDR routes between every pair of nodes, via the peer's underlay
	// address of the same family.
	for _, node := range c.Nodes {
		eth0, err := node.Handle.LinkByName("eth0")
		if err != nil {
			return err
		}
		for _, other := range c.Nodes {
			if other == node {
				continue
			}
			for _, cidr := range other.PodCIDRs {
				gw := other.IP
				if cidr.IP.To4() == nil {
					gw = other.IP6
				}
				r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: cidr, Gw: gw}
				if err := node.Handle.RouteAdd(r); err != nil {
					return fmt.Errorf("route %s via %s in %s: %w", cidr, gw, node.NS, err)
				}
			}
		}
	}
	return nil
}

// v6 builds a:b:c:d::e.
func v6(a, b, c, d, e uint16) net.IP {
	ip := make(net.IP, net.IPv6len)
	for i, g := range []uint16{a, b, c, d} {
		ip[2*i], ip[2*i+1] = byte(g>>8), byte(g)
	}
	ip[14], ip[15] = byte(e>>8), byte(e)
	return ip
}

// AddPod creates pod namespace <prefix>-<node>-<name> and runs the real ptp
// CNI plugin with host-local IPAM for it inside the node namespace, as
// kindnet does: a veth pair (eth0 in the pod, veth<hex> on the host), the
// pod addresses with routes via the gateways, and on the host the gateway
// addresses (/32, /128) on the veth plus a host route per pod address.
func (n *Node) AddPod(t testing.TB, name string, opts ...PodOption) *Pod {
	t.Helper()
	p, err := n.addPod(name, opts...)
	if err != nil {
		t.Fatalf("netnstest: AddPod %s on %s: %v", name, n.Name, err)
	}
	return p
}

// AddPodE is AddPod returning its error (a chained plugin's ADD may fail
// on purpose).
func (n *Node) AddPodE(name string, opts ...PodOption) (*Pod, error) { return n.addPod(name, opts...) }

func (n *Node) addPod(name string, opts ...PodOption) (*Pod, error) {
	c := n.cluster
	var cfg podConfig
	for _, o := range opts {
		o(&cfg)
	}
	if name == "" || strings.ContainsAny(name, "/ ") {
		return nil, fmt.Errorf("invalid pod name %q", name)
	}
	var v4, v6 int
	for _, ip := range cfg.ips {
		switch {
		case ip.To4() != nil && c.Family.HasIPv4():
			v4++
		case ip.To4() == nil && len(ip) == net.IPv6len && c.Family.HasIPv6():
			v6++
		default:
			return nil, fmt.Errorf("address %v unusable in a %v cluster", ip, c.Family)
		}
	}
	if v4 > 1 || v6 > 1 {
		return nil, fmt.Errorf("at most one requested address per family: %v", cfg.ips)
	}
	p := &Pod{Name: name, NS: n.NS + "-" + name, Node: n, NsHandle: -1}

	c.mu.Lock()
	for _, other := range n.Pods {
		if other.Name == name && !other.deleted {
			c.mu.Unlock()
			return nil, fmt.Errorf("pod %q already exists", name)
		}
	}
	n.Pods = append(n.Pods, p)
	c.mu.Unlock()
	if err := n.wirePod(p, cfg); err != nil {
		c.mu.Lock()
		n.removePod(p)
		c.mu.Unlock()
		p.closeHandles()
		// ptp undoes a failed ADD itself; only the namespace remains.
		if derr := deleteNS(p.NS); derr == nil {
			c.forget(p.NS)
		}
		return nil, err
	}
	return p, nil
}

// forget drops ns from the namespaces Close deletes.
func (c *Cluster) forget(ns string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, n := range c.created {
		if n == ns {
			c.created = append(c.created[:i], c.created[i+1:]...)
			return
		}
	}
}

// removePod drops p from n.Pods; the caller holds the cluster lock.
func (n *Node) removePod(p *Pod) {
	pods := n.Pods[:0]
	for _, o := range n.Pods {
		if o != p {
			pods = append(pods, o)
		}
	}
	n.Pods = pods
}

func (n *Node) wirePod(p *Pod, cfg podConfig) error {
	var err error
	if p.NsHandle, err = n.cluster.addNS(p.NS); err != nil {
		return err
	}
	if p.Handle, err = newHandle(p.NsHandle); err != nil {
		return err
	}
	// ptp leaves lo alone (the loopback plugin's job).
	if _, err := setUp(p.Handle, "lo"); err != nil {
		return err
	}
	out, err := n.cni("ADD", p, cfg.ips)
	if err != nil {
		return err
	}
	if cfg.chain != nil {
		start := time.Now()
		_, err := n.runChained(cfg.chain, "ADD", p, out)
		p.ChainTook = time.Since(start)
		if err != nil {
			_, _ = n.cni("DEL", p, nil)
			return err
		}
	}
	var res struct {
		Interfaces []struct {
			Name    string `json:"name"`
			Sandbox string `json:"sandbox"`
		} `json:"interfaces"`
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return fmt.Errorf("ptp result %q: %w", out, err)
	}
	for _, i := range res.Interfaces {
		if i.Sandbox == "" {
			p.HostVeth = i.Name
		}
	}
	for _, a := range res.IPs {
		ip, _, err := net.ParseCIDR(a.Address)
		if err != nil {
			return fmt.Errorf("ptp result address %q: %w", a.Address, err)
		}
		if ip4 := ip.To4(); ip4 != nil {
			ip = ip4
		}
		p.IPs = append(p.IPs, ip)
	}
	sort.SliceStable(p.IPs, func(i, j int) bool { return p.IPs[i].To4() != nil && p.IPs[j].To4() == nil })
	if p.HostVeth == "" || len(p.IPs) == 0 {
		return fmt.Errorf("ptp result lacks the host veth or addresses: %s", out)
	}
	p.IP = p.IPs[0]
	for _, ip := range p.IPs {
		if ip.To4() == nil {
			p.IP6 = ip
			break
		}
	}
	hv, err := n.Handle.LinkByName(p.HostVeth)
	if err != nil {
		return fmt.Errorf("host veth %s: %w", p.HostVeth, err)
	}
	p.HostVethIndex = hv.Attrs().Index
	return nil
}

// cniConf is the node's kindnet-like ptp configuration; ips become
// host-local's requested addresses ("args" → "cni" → "ips"; CNI_ARGS IP=
// takes a single address only).
func (n *Node) cniConf(ips []net.IP) []byte {
	type subnet struct {
		Subnet string `json:"subnet"`
	}
	type route struct {
		Dst string `json:"dst"`
	}
	var ranges [][]subnet
	var routes []route
	for _, cidr := range n.PodCIDRs {
		ranges = append(ranges, []subnet{{cidr.String()}})
		if cidr.IP.To4() != nil {
			routes = append(routes, route{"0.0.0.0/0"})
		} else {
			routes = append(routes, route{"::/0"})
		}
	}
	conf := map[string]any{
		"cniVersion": "0.4.0", "name": "kindnet", "type": "ptp", "ipMasq": false, "mtu": 1500,
		"ipam": map[string]any{
			"type": "host-local", "dataDir": filepath.Join(n.cluster.IPAMDir, n.Name),
			"ranges": ranges, "routes": routes,
		},
	}
	if len(ips) > 0 {
		var s []string
		for _, ip := range ips {
			s = append(s, ip.String())
		}
		conf["args"] = map[string]any{"cni": map[string]any{"ips": s}}
	}
	b, err := json.Marshal(conf)
	if err != nil {
		panic(err) // only plain types above
	}
	return b
}

// cni runs the ptp plugin inside the node namespace for pod p (container ID
// = the pod's namespace name) and returns its result.
func (n *Node) cni(command string, p *Pod, ips []net.IP) ([]byte, error) {
	cmd := exec.Command("ip", "netns", "exec", n.NS, filepath.Join(CNIPath, "ptp"))
	cmd.Env = []string{
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=" + p.NS, "CNI_NETNS=" + NsPath(p.NS),
		"CNI_IFNAME=eth0", "CNI_PATH=" + CNIPath, "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	cmd.Stdin = bytes.NewReader(n.cniConf(ips))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("ptp %s for %s: %v: %s %s", command, p.NS, err,
			strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// runChained runs a chained plugin for p with prevResult.
func (n *Node) runChained(c *Chain, command string, p *Pod, prevResult []byte) ([]byte, error) {
	conf := map[string]any{"cniVersion": "0.4.0", "name": "kindnet"}
	for k, v := range c.Conf {
		conf[k] = v
	}
	if prevResult != nil {
		conf["prevResult"] = json.RawMessage(prevResult)
	}
	stdin, err := json.Marshal(conf)
	if err != nil {
		return nil, err
	}
	typ, _ := c.Conf["type"].(string)
	plugin, err := FindPlugin(typ, c.Path)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", "netns", "exec", n.NS, plugin)
	cmd.Env = []string{
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=" + p.NS, "CNI_NETNS=" + NsPath(p.NS),
		"CNI_IFNAME=eth0", "CNI_PATH=" + strings.Join(c.Path, ":"), "CNI_ARGS=" + c.Args, "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s for %s: %v: %s %s", typ, command, p.NS, err,
			strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// FindPlugin is where a runtime finds the plugin of type typ: the first
// regular file of that name in the dirs of CNI_PATH, as libcni's
// invoke.FindInPath looks it up (and with its error when none is there).
func FindPlugin(typ string, path []string) (string, error) {
	if typ == "" || strings.ContainsRune(typ, '/') {
		return "", fmt.Errorf("invalid plugin type %q", typ)
	}
	for _, dir := range path {
		p := filepath.Join(dir, typ)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("failed to find plugin %q in path %v", typ, path)
}

// Delete runs CNI DEL for the pod (releasing its addresses) and removes its
// namespace. Listeners or connections still open in the pod keep the kernel
// namespace alive until closed.
func (p *Pod) Delete(t testing.TB) {
	t.Helper()
	c := p.Node.cluster
	c.mu.Lock()
	if p.deleted {
		c.mu.Unlock()
		return
	}
	p.deleted = true
	p.Node.removePod(p)
	c.mu.Unlock()
	c.forget(p.NS)
	p.closeHandles()
	var errs []error
	// After Close the node and the IPAM state are gone already.
	if Exists(p.Node.NS) {
		if _, err := p.Node.cni("DEL", p, nil); err != nil {
			errs = append(errs, err)
		}
	}
	if err := deleteNS(p.NS); err != nil {
		errs = append(errs, err)
	}
	// ptp's DEL deletes the veth pair; without it (a failed DEL) the host
	// side dies with the pod namespace, asynchronously: make it synchronous
	// so callers observe a consistent node.
	if h := p.Node.Handle; h != nil {
		if l, err := h.LinkByName(p.HostVeth); err == nil {
			_ = h.LinkDel(l)
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("netnstest: delete pod %s: %v", p.NS, err)
	}
}

func (p *Pod) closeHandles() {
	if p.Handle != nil {
		p.Handle.Close()
		p.Handle = nil
	}
	if p.NsHandle.IsOpen() {
		_ = p.NsHandle.Close()
		p.NsHandle = -1
	}
}

// Close deletes every namespace of the cluster and its IPAM state. It is
// idempotent and is registered with t.Cleanup by NewCluster, so calling it
// is optional.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		var errs []error
		c.mu.Lock()
		for _, n := range c.Nodes {
			for _, p := range n.Pods {
				p.closeHandles()
			}
			if n.Handle != nil {
				n.Handle.Close()
				n.Handle = nil
			}
			if n.NsHandle.IsOpen() {
				_ = n.NsHandle.Close()
				n.NsHandle = -1
			}
		}
		if c.ulHandle != nil {
			c.ulHandle.Close()
			c.ulHandle = nil
		}
		if c.ulNsHandle.IsOpen() {
			_ = c.ulNsHandle.Close()
			c.ulNsHandle = -1
		}
		created := c.created
		c.created = nil
		c.mu.Unlock()
		// Pods first, then nodes, then the underlay. No CNI DEL: the veths
		// die with the namespaces and the IPAM state goes as a whole.
		for i := len(created) - 1; i >= 0; i-- {
			if err := deleteNS(created[i]); err != nil {
				errs = append(errs, err)
			}
		}
		if c.IPAMDir != "" {
			if err := os.RemoveAll(c.IPAMDir); err != nil {
				errs = append(errs, err)
			}
		}
		if c.lock != nil {
			if len(errs) == 0 {
				_ = os.Remove(c.lock.Name())
			}
			_ = c.lock.Close()
			c.lock = nil
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// deleteNS removes a named namespace like `ip netns delete`, falling back to
// a lazy unmount + unlink.
func deleteNS(name string) error {
	if err := checkNSName(name); err != nil {
		return err
	}
	if !Exists(name) {
		return nil
	}
	out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput()
	if err == nil || !Exists(name) {
		return nil
	}
	path := NsPath(name)
	uerr := unix.Unmount(path, unix.MNT_DETACH)
	if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return fmt.Errorf("delete netns %s: ip: %v: %s; umount: %v; remove: %v", name, err, strings.TrimSpace(string(out)), uerr, rerr)
	}
	return nil
}

// CleanupStale deletes namespaces under /var/run/netns whose names start
// with prefix and that belong to a netnstest cluster ("ar" + 6 hex digits +
// "-") whose owning process is gone (its lock in LockDir is free or
// missing), and such clusters' IPAM state in LockDir. Namespaces of live
// clusters, in this or any other process, are left alone.
func CleanupStale(prefix string) error {
	if prefix == "" {
		return errors.New("netnstest: CleanupStale needs a non-empty prefix")
	}
	entries, err := os.ReadDir(NetnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	byCluster := map[string][]string{}
	var order []string
	add := func(cp string) {
		if _, ok := byCluster[cp]; !ok {
			order = append(order, cp)
			byCluster[cp] = nil
		}
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || !clusterNSRe.MatchString(name) {
			continue
		}
		cp := name[:len(PrefixBase)+6]
		add(cp)
		byCluster[cp] = append(byCluster[cp], name)
	}
	// IPAM state can outlive the namespaces (a crash during Close).
	locks, err := os.ReadDir(LockDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range locks {
		if name := e.Name(); strings.HasPrefix(name, prefix) && clusterIPAMRe.MatchString(name) {
			add(strings.TrimSuffix(name, ".ipam"))
		}
	}
	var errs []error
	for _, cp := range order {
		lockPath := filepath.Join(LockDir, cp+".lock")
		f, err := os.OpenFile(lockPath, os.O_RDWR, 0)
		if err == nil {
			if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
				_ = f.Close() // live cluster
				continue
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		names := byCluster[cp]
		failed := false
		for i := len(names) - 1; i >= 0; i-- {
			if err := deleteNS(names[i]); err != nil {
				errs = append(errs, err)
				failed = true
			}
		}
		if err := os.RemoveAll(filepath.Join(LockDir, cp+".ipam")); err != nil {
			errs = append(errs, err)
			failed = true
		}
		if f != nil {
			if !failed {
				_ = os.Remove(lockPath)
			}
			_ = f.Close()
		}
	}
	return errors.Join(errs...)
}
