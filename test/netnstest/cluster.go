//go:build linux

package netnstest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

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

var clusterNSRe = regexp.MustCompile(`^` + PrefixBase + `[0-9a-f]{6}-`)

// Cluster is a set of node namespaces joined by an underlay bridge network.
type Cluster struct {
	Prefix string
	Nodes  []*Node
	// UnderlayNS is the namespace holding the underlay bridge (<prefix>-ul).
	UnderlayNS string

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
	Name    string // "node<i>"
	NS      string // "<prefix>-node<i>"
	Index   int    // 1-based
	IP      net.IP // underlay address 172.18.0.<i+1>
	PodCIDR *net.IPNet
	Gateway net.IP // 10.244.<i>.1, on every host-side veth
	// Handle is a netlink handle bound to the node namespace.
	Handle *netlink.Handle
	// NsHandle is an open fd of the node namespace.
	NsHandle netns.NsHandle
	Pods     []*Pod

	cluster *Cluster
	used    map[int]bool // host octets in use in PodCIDR
}

// Pod is a pod network namespace attached to a node the way ptp does it.
type Pod struct {
	Name          string
	NS            string // "<prefix>-<node>-<name>"
	IP            net.IP
	HostVeth      string // host-side veth name in the node namespace
	HostVethIndex int    // its ifindex in the node namespace
	Node          *Node
	NsHandle      netns.NsHandle
	// Handle is a netlink handle bound to the pod namespace.
	Handle *netlink.Handle

	deleted bool
}

// PodOption customises AddPod.
type PodOption func(*podConfig)

type podConfig struct {
	ip       net.IP
	hostVeth string
}

// WithIP assigns a specific address from the node's pod CIDR instead of the
// next free one.
func WithIP(ip net.IP) PodOption { return func(c *podConfig) { c.ip = ip } }

// WithHostVeth names the host-side veth (at most 15 characters) instead of
// the deterministic "veth<8 hex>" default.
func WithHostVeth(name string) PodOption { return func(c *podConfig) { c.hostVeth = name } }

// NewCluster creates n nodes (n in 1..200) and the underlay joining them.
// Everything is torn down by Close, which is registered with t.Cleanup.
// It first removes stale namespaces of crashed runs (CleanupStale).
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	RequireRoot(t)
	if n < 1 || n > 200 {
		t.Fatalf("netnstest: NewCluster: bad node count %d", n)
	}
	if err := CleanupStale(PrefixBase); err != nil {
		t.Logf("netnstest: CleanupStale: %v", err)
	}
	var rnd [3]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{Prefix: PrefixBase + hex.EncodeToString(rnd[:]), ulNsHandle: -1}
	c.UnderlayNS = c.Prefix + "-ul"
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
			PodCIDR: &net.IPNet{IP: net.IPv4(10, 244, byte(i), 0).To4(), Mask: net.CIDRMask(24, 32)},
			Gateway: net.IPv4(10, 244, byte(i), 1).To4(),
			cluster: c,
			used:    map[int]bool{},
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
		if err := SetSysctl(node.NS, "net.ipv4.ip_forward", "1"); err != nil {
			return fmt.Errorf("ip_forward in %s: %w", node.NS, err)
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
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: node.IP, Mask: net.CIDRMask(16, 32)}}
		if err := h.AddrAdd(eth0, addr); err != nil {
			return fmt.Errorf("address %s on %s: %w", addr, node.Name, err)
		}
	}
	// Pod CIDR routes between every pair of nodes.
	for _, node := range c.Nodes {
		eth0, err := node.Handle.LinkByName("eth0")
		if err != nil {
			return err
		}
		for _, other := range c.Nodes {
			if other == node {
				continue
			}
			r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: other.PodCIDR, Gw: other.IP}
			if err := node.Handle.RouteAdd(r); err != nil {
				return fmt.Errorf("route %s via %s in %s: %w", other.PodCIDR, other.IP, node.NS, err)
			}
		}
	}
	return nil
}

// AddPod creates pod namespace <prefix>-<node>-<name> and connects it to the
// node like the ptp CNI plugin: a veth pair (eth0 in the pod, veth<hex> on
// the host), the pod address /24 with the connected route replaced by
// "<podCIDR> via <gw> dev eth0 onlink" and "default via <gw> dev eth0
// onlink", and on the host the gateway address /32 on the veth plus a
// "<podIP>/32 dev veth scope host" route.
func (n *Node) AddPod(t testing.TB, name string, opts ...PodOption) *Pod {
	t.Helper()
	p, err := n.addPod(name, opts...)
	if err != nil {
		t.Fatalf("netnstest: AddPod %s on %s: %v", name, n.Name, err)
	}
	return p
}

func (n *Node) addPod(name string, opts ...PodOption) (*Pod, error) {
	c := n.cluster
	var cfg podConfig
	for _, o := range opts {
		o(&cfg)
	}
	if name == "" || strings.ContainsAny(name, "/ ") {
		return nil, fmt.Errorf("invalid pod name %q", name)
	}
	p := &Pod{Name: name, NS: n.NS + "-" + name, Node: n, NsHandle: -1}

	// Allocate the address and record the pod under the cluster lock.
	c.mu.Lock()
	for _, other := range n.Pods {
		if other.Name == name && !other.deleted {
			c.mu.Unlock()
			return nil, fmt.Errorf("pod %q already exists", name)
		}
	}
	if cfg.ip != nil {
		ip := cfg.ip.To4()
		if ip == nil || !n.PodCIDR.Contains(ip) || ip[3] < 2 || ip[3] == 255 || n.used[int(ip[3])] {
			c.mu.Unlock()
			return nil, fmt.Errorf("address %s unusable in %s", cfg.ip, n.PodCIDR)
		}
		p.IP = ip
	} else {
		for k := 2; k < 255; k++ {
			if !n.used[k] {
				p.IP = net.IPv4(10, 244, byte(n.Index), byte(k)).To4()
				break
			}
		}
		if p.IP == nil {
			c.mu.Unlock()
			return nil, fmt.Errorf("pod CIDR %s exhausted", n.PodCIDR)
		}
	}
	n.used[int(p.IP[3])] = true
	n.Pods = append(n.Pods, p)
	c.mu.Unlock()

	p.HostVeth = cfg.hostVeth
	if p.HostVeth == "" {
		h := fnv.New32a()
		h.Write([]byte(p.NS))
		p.HostVeth = fmt.Sprintf("veth%08x", h.Sum32())
	}
	if len(p.HostVeth) > 15 {
		return nil, fmt.Errorf("host veth name %q longer than 15", p.HostVeth)
	}

	var err error
	if p.NsHandle, err = c.addNS(p.NS); err != nil {
		return nil, err
	}
	if p.Handle, err = newHandle(p.NsHandle); err != nil {
		return nil, err
	}
	ph, hh := p.Handle, n.Handle
	if _, err := setUp(ph, "lo"); err != nil {
		return nil, err
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "eth0"},
		PeerName:      p.HostVeth,
		PeerNamespace: netlink.NsFd(int(n.NsHandle)),
	}
	if err := ph.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("add veth eth0/%s: %w", p.HostVeth, err)
	}

	// Pod side.
	eth0, err := setUp(ph, "eth0")
	if err != nil {
		return nil, err
	}
	podNet := &net.IPNet{IP: p.IP, Mask: n.PodCIDR.Mask}
	if err := ph.AddrAdd(eth0, &netlink.Addr{IPNet: podNet}); err != nil {
		return nil, fmt.Errorf("pod address %s: %w", podNet, err)
	}
	idx := eth0.Attrs().Index
	if err := ph.RouteDel(&netlink.Route{LinkIndex: idx, Dst: n.PodCIDR, Scope: netlink.SCOPE_LINK}); err != nil {
		return nil, fmt.Errorf("delete connected route %s: %w", n.PodCIDR, err)
	}
	onlink := int(netlink.FLAG_ONLINK)
	if err := ph.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: n.PodCIDR, Gw: n.Gateway, Flags: onlink}); err != nil {
		return nil, fmt.Errorf("route %s via %s: %w", n.PodCIDR, n.Gateway, err)
	}
	def := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if err := ph.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: def, Gw: n.Gateway, Flags: onlink}); err != nil {
		return nil, fmt.Errorf("default route via %s: %w", n.Gateway, err)
	}

	// Host side.
	hv, err := setUp(hh, p.HostVeth)
	if err != nil {
		return nil, err
	}
	p.HostVethIndex = hv.Attrs().Index
	gw := &netlink.Addr{IPNet: &net.IPNet{IP: n.Gateway, Mask: net.CIDRMask(32, 32)}}
	if err := hh.AddrAdd(hv, gw); err != nil {
		return nil, fmt.Errorf("gateway address on %s: %w", p.HostVeth, err)
	}
	hr := &netlink.Route{
		LinkIndex: p.HostVethIndex,
		Dst:       &net.IPNet{IP: p.IP, Mask: net.CIDRMask(32, 32)},
		Scope:     netlink.SCOPE_HOST,
	}
	if err := hh.RouteAdd(hr); err != nil {
		return nil, fmt.Errorf("host route %s dev %s: %w", p.IP, p.HostVeth, err)
	}
	return p, nil
}

// Delete removes the pod namespace (the veth pair and the node's host route
// disappear with it) and frees the pod's address. Listeners or connections
// still open in the pod keep the kernel namespace alive until closed.
func (p *Pod) Delete(t testing.TB) {
	t.Helper()
	c := p.Node.cluster
	c.mu.Lock()
	if p.deleted {
		c.mu.Unlock()
		return
	}
	p.deleted = true
	delete(p.Node.used, int(p.IP[3]))
	pods := p.Node.Pods[:0]
	for _, o := range p.Node.Pods {
		if o != p {
			pods = append(pods, o)
		}
	}
	p.Node.Pods = pods
	for i, ns := range c.created {
		if ns == p.NS {
			c.created = append(c.created[:i], c.created[i+1:]...)
			break
		}
	}
	c.mu.Unlock()
	p.closeHandles()
	if err := deleteNS(p.NS); err != nil {
		t.Fatalf("netnstest: delete pod %s: %v", p.NS, err)
	}
	// The host-side veth dies with the pod namespace; make it synchronous so
	// callers observe a consistent node.
	if l, err := p.Node.Handle.LinkByName(p.HostVeth); err == nil {
		_ = p.Node.Handle.LinkDel(l)
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

// Close deletes every namespace of the cluster. It is idempotent and is
// registered with t.Cleanup by NewCluster, so calling it is optional.
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
		// Pods first, then nodes, then the underlay.
		for i := len(created) - 1; i >= 0; i-- {
			if err := deleteNS(created[i]); err != nil {
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
// missing). Namespaces of live clusters, in this or any other process, are
// left alone.
func CleanupStale(prefix string) error {
	if prefix == "" {
		return errors.New("netnstest: CleanupStale needs a non-empty prefix")
	}
	entries, err := os.ReadDir(NetnsDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	byCluster := map[string][]string{}
	var order []string
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || !clusterNSRe.MatchString(name) {
			continue
		}
		cp := name[:len(PrefixBase)+6]
		if _, ok := byCluster[cp]; !ok {
			order = append(order, cp)
		}
		byCluster[cp] = append(byCluster[cp], name)
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
		if f != nil {
			if !failed {
				_ = os.Remove(lockPath)
			}
			_ = f.Close()
		}
	}
	return errors.Join(errs...)
}
