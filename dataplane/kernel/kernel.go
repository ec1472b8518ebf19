// Package kernel is the dataplane's narrow view of one network namespace:
// netlink through a handle bound to it, /proc/sys and binaries (iptables)
// on a helper thread switched into it. Nothing here decides anything; the
// dataplane's managers do. kerneltest holds the in-memory fake.
package kernel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/nft"
)

// Netlink is the subset of *netlink.Handle the dataplane uses. A handle is
// bound to one network namespace, so no goroutine ever switches namespace
// for netlink work.
type Netlink interface {
	LinkList() ([]netlink.Link, error)
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkModify(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetUp(link netlink.Link) error
	LinkSetMTU(link netlink.Link, mtu int) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrReplace(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
	NeighList(linkIndex, family int) ([]netlink.Neigh, error)
	NeighSet(neigh *netlink.Neigh) error
	RouteGet(destination net.IP) ([]netlink.Route, error)
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	RouteReplace(route *netlink.Route) error
	RouteDel(route *netlink.Route) error
	RuleList(family int) ([]netlink.Rule, error)
	RuleAdd(rule *netlink.Rule) error
	RuleDel(rule *netlink.Rule) error
	IpsetList(name string) (*netlink.IPSetResult, error)
	IpsetCreate(setname, typename string, options netlink.IpsetCreateOptions) error
	IpsetAdd(setname string, entry *netlink.IPSetEntry) error
	IpsetDel(setname string, entry *netlink.IPSetEntry) error
	IpsetDestroy(setname string) error
	GetNetNsIdByFd(fd int) (int, error)
}

var _ Netlink = (*netlink.Handle)(nil)

// Sysctl reads and writes /proc/sys keys (dotted names) in one netns.
type Sysctl interface {
	Get(key string) (string, error)
	Set(key, value string) error
}

// Kernel bundles the kernel interfaces of one network namespace.
type Kernel struct {
	NL     Netlink
	Sysctl Sysctl
	// IPT returns the iptables runner for a backend and family (6 for
	// ip6tables) in this netns.
	IPT func(backend string, family int) (iptables.Runner, error)
	// InNS runs f on a thread in this netns (for binaries and /proc/sys).
	InNS iptables.InNS
	// NFT is nf_tables in this netns (nil: none).
	NFT   NFTables
	close func()
}

// NFTables is what the dataplane does with its nftables tables in one
// netns (nft.NetNS; kerneltest has a fake).
type NFTables interface {
	ReadBack(table string) (nft.Actual, error)
	// WriteChains makes want's chains exactly so and deletes drop, in one
	// transaction, creating the table and sets if missing.
	WriteChains(table string, sets []nft.Set, want []*nft.Chain, have nft.Actual, drop []string) error
	Elements(table string, s nft.Set) (map[netip.Addr]string, bool, error)
	// UpdateElements applies us in one transaction.
	UpdateElements(table string, us ...nft.ElementUpdate) error
	DeleteTable(table string) error
	// HasTable reports a table of family ("ip", "ip6", "inet") name.
	HasTable(family, name string) (bool, error)
}

// New bundles kernel interfaces (fakes); close may be nil.
func New(nl Netlink, sys Sysctl, ipt func(backend string, family int) (iptables.Runner, error), inNS iptables.InNS, close func()) *Kernel {
	return &Kernel{NL: nl, Sysctl: sys, IPT: ipt, InNS: inNS, close: close}
}

// Close releases the handles.
func (k *Kernel) Close() {
	if k != nil && k.close != nil {
		k.close()
	}
}

// Open returns the kernel interfaces of the netns at path ("" = the
// current one).
func Open(path string) (*Kernel, error) {
	var ns netns.NsHandle = -1
	if path != "" {
		h, err := netns.GetFromPath(path)
		if err != nil {
			return nil, fmt.Errorf("open netns %s: %w", path, err)
		}
		ns = h
	}
	var nl *netlink.Handle
	var err error
	if ns >= 0 {
		nl, err = netlink.NewHandleAt(ns)
	} else {
		nl, err = netlink.NewHandle()
	}
	if err != nil {
		if ns >= 0 {
			_ = ns.Close()
		}
		return nil, fmt.Errorf("netlink handle for %q: %w", path, err)
	}
	inNS := iptables.Here
	if ns >= 0 {
		// Re-open by path on each use: runners outlive this Kernel (they
		// are cached per netns), its handle does not.
		inNS = func(f func() error) error {
			h, err := netns.GetFromPath(path)
			if err != nil {
				return fmt.Errorf("open netns %s: %w", path, err)
			}
			defer h.Close()
			return doInNS(h, f)
		}
	}
	k := &Kernel{
		NL:     nl,
		Sysctl: procSysctl{inNS: inNS},
		InNS:   inNS,
		NFT:    nft.NetNS{Path: path},
		IPT: func(backend string, family int) (iptables.Runner, error) {
			if family == 6 {
				return iptables.NewExecRunner6(backend, inNS)
			}
			return iptables.NewExecRunner(backend, inNS)
		},
		close: func() {
			nl.Close()
			if ns >= 0 {
				_ = ns.Close()
			}
		},
	}
	return k, nil
}

// doInNS runs f on a fresh, locked OS thread switched into ns. The
// caller's thread never changes namespace; if switching back fails, the
// helper goroutine exits still locked and the runtime destroys its thread.
func doInNS(ns netns.NsHandle, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("restore netns: %w", err))
			return // still locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// PeerNetNS returns the path under dir of the network namespace holding the
// peer of veth (in the namespace of nl). It matches the veth's
// IFLA_LINK_NETNSID against the id each named namespace has in ours.
func PeerNetNS(nl Netlink, veth netlink.Link, dir string) (string, error) {
	want := veth.Attrs().NetNsID
	if want < 0 {
		return "", fmt.Errorf("veth %s has no peer in another netns", veth.Attrs().Name)
	}
	for _, p := range ListNetNSDir(dir) {
		if NsID(nl, p) == want {
			return p, nil
		}
	}
	return "", fmt.Errorf("no netns under %s has id %d (peer of %s)", dir, want, veth.Attrs().Name)
}

// NsID is the id the namespace at path has in nl's namespace, or -1.
func NsID(nl Netlink, path string) int {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	defer unix.Close(fd)
	id, err := nl.GetNetNsIdByFd(fd)
	if err != nil {
		return -1
	}
	return id
}

// ListNetNSDir lists the namespace files under dir.
func ListNetNSDir(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		var st unix.Statfs_t
		// Only nsfs bind mounts are namespaces; skip anything else.
		if unix.Statfs(p, &st) == nil && st.Type == unix.NSFS_MAGIC {
			out = append(out, p)
		}
	}
	return out
}
