// Package kerneltest is an in-memory, family-aware fake of one network
// namespace for the dataplane's unit tests. It keys routes, rules and
// addresses by its own rules (what the kernel treats as the same object),
// never by the dataplane's keys, so a key bug there cannot hide here.
package kerneltest

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
)

// FakeNetlink is an in-memory Netlink for unit tests. It keeps state,
// counts writes by method and can fail the next call of a method.
type FakeNetlink struct {
	mu     sync.Mutex
	links  []netlink.Link
	addrs  map[int][]netlink.Addr
	neighs []netlink.Neigh
	routes []netlink.Route
	rules  []netlink.Rule
	ipsets map[string]*netlink.IPSetResult
	next   int
	fail   map[string]error

	// Writes counts successful write calls by method name.
	Writes map[string]int
	// GeneveSupported makes geneve devices creatable.
	GeneveSupported bool
	// Src and Src6 are the source addresses RouteGet reports for a
	// destination of their family that no main-table route with a source
	// covers (Src may also be an IPv6 address when Src6 is unset).
	Src, Src6 netip.Addr
	// Journal, when set, records every successful write, as NS.
	Journal *Journal
	NS      string

	pending []Entry
}

var _ kernel.Netlink = (*FakeNetlink)(nil)

// NewFakeNetlink returns a namespace with lo and the kernel's default rules.
func NewFakeNetlink() *FakeNetlink {
	f := &FakeNetlink{addrs: map[int][]netlink.Addr{}, ipsets: map[string]*netlink.IPSetResult{}, fail: map[string]error{}, Writes: map[string]int{}, next: 1}
	f.addVeth("lo", 65536, 0)
	// The kernel's default rules: both families have local and main, IPv4
	// also default.
	for _, r := range []struct{ family, prio, table int }{
		{netlink.FAMILY_V4, 0, unix.RT_TABLE_LOCAL}, {netlink.FAMILY_V4, 32766, unix.RT_TABLE_MAIN}, {netlink.FAMILY_V4, 32767, unix.RT_TABLE_DEFAULT},
		{netlink.FAMILY_V6, 0, unix.RT_TABLE_LOCAL}, {netlink.FAMILY_V6, 32766, unix.RT_TABLE_MAIN},
	} {
		k := *netlink.NewRule()
		k.Family, k.Priority, k.Table, k.Protocol = r.family, r.prio, r.table, unix.RTPROT_KERNEL
		f.rules = append(f.rules, k)
	}
	return f
}

// AddVeth adds a veth whose peer has index peerIndex (in another netns) and
// returns its index.
func (f *FakeNetlink) AddVeth(name string, mtu, peerIndex int) int {
	f.lock()
	defer f.unlock()
	return f.addVeth(name, mtu, peerIndex)
}

func (f *FakeNetlink) addVeth(name string, mtu, peer int) int {
	idx := f.next
	f.next++
	f.links = append(f.links, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, Index: idx, MTU: mtu, ParentIndex: peer, Flags: net.FlagUp}})
	return idx
}

// FailNext makes the next call of method fail with err.
func (f *FakeNetlink) FailNext(method string, err error) {
	f.lock()
	defer f.unlock()
	f.fail[method] = err
}

// TotalWrites sums Writes.
func (f *FakeNetlink) TotalWrites() int {
	f.lock()
	defer f.unlock()
	n := 0
	for _, v := range f.Writes {
		n += v
	}
	return n
}

func (f *FakeNetlink) check(method string) error {
	if err, ok := f.fail[method]; ok {
		delete(f.fail, method)
		return err
	}
	return nil
}

func (f *FakeNetlink) wrote(method string) { f.Writes[method]++ }

func (f *FakeNetlink) lock() { f.mu.Lock() }

// unlock releases the lock, then journals what was written under it (the
// journal's observers may read this fake).
func (f *FakeNetlink) unlock() {
	p := f.pending
	f.pending = nil
	f.mu.Unlock()
	for _, e := range p {
		f.Journal.record(e)
	}
}

// log queues a journal entry of a write made under the lock.
func (f *FakeNetlink) log(kind string, op Op, format string, a ...any) {
	if f.Journal != nil {
		f.pending = append(f.pending, Entry{NS: f.NS, Kind: kind, Op: op, Object: fmt.Sprintf(format, a...)})
	}
}

// linkName is the name of the link with index idx ("#idx" if none).
func (f *FakeNetlink) linkName(idx int) string {
	for _, l := range f.links {
		if l.Attrs().Index == idx {
			return l.Attrs().Name
		}
	}
	return fmt.Sprintf("#%d", idx)
}

func errNoLink(s string) error { return fmt.Errorf("link %s not found: %w", s, unix.ENODEV) }

func copyLink(l netlink.Link) netlink.Link {
	switch v := l.(type) {
	case *netlink.Vxlan:
		c := *v
		return &c
	case *netlink.Geneve:
		c := *v
		return &c
	case *netlink.Veth:
		c := *v
		return &c
	}
	return l
}

// LinkList implements Netlink.
func (f *FakeNetlink) LinkList() ([]netlink.Link, error) {
	f.lock()
	defer f.unlock()
	if err := f.check("LinkList"); err != nil {
		return nil, err
	}
	var out []netlink.Link
	for _, l := range f.links {
		out = append(out, copyLink(l))
	}
	return out, nil
}

func (f *FakeNetlink) find(name string) (int, netlink.Link) {
	for i, l := range f.links {
		if l.Attrs().Name == name {
			return i, l
		}
	}
	return -1, nil
}

// LinkByName implements Netlink.
func (f *FakeNetlink) LinkByName(name string) (netlink.Link, error) {
	f.lock()
	defer f.unlock()
	if err := f.check("LinkByName"); err != nil {
		return nil, err
	}
	if _, l := f.find(name); l != nil {
		return copyLink(l), nil
	}
	return nil, errNoLink(name)
}

// LinkByIndex implements Netlink.
func (f *FakeNetlink) LinkByIndex(index int) (netlink.Link, error) {
	f.lock()
	defer f.unlock()
	for _, l := range f.links {
		if l.Attrs().Index == index {
			return copyLink(l), nil
		}
	}
	return nil, errNoLink(fmt.Sprint(index))
}

// LinkAdd implements Netlink.
func (f *FakeNetlink) LinkAdd(link netlink.Link) error {
	f.lock()
	defer f.unlock()
	if err := f.check("LinkAdd"); err != nil {
		return err
	}
	if _, ok := link.(*netlink.Geneve); ok && !f.GeneveSupported {
		return unix.EOPNOTSUPP
	}
	if i, _ := f.find(link.Attrs().Name); i >= 0 {
		return unix.EEXIST
	}
	c := copyLink(link)
	c.Attrs().Index = f.next
	if c.Attrs().MTU == 0 {
		c.Attrs().MTU = 1450
	}
	f.next++
	f.links = append(f.links, c)
	f.wrote("LinkAdd")
	f.log("link", OpAdd, "%s %s", c.Attrs().Name, c.Type())
	return nil
}

// LinkModify implements Netlink (geneve remote only, like the kernel's changelink).
func (f *FakeNetlink) LinkModify(link netlink.Link) error {
	f.lock()
	defer f.unlock()
	if err := f.check("LinkModify"); err != nil {
		return err
	}
	_, l := f.find(link.Attrs().Name)
	g, ok := l.(*netlink.Geneve)
	mod, ok2 := link.(*netlink.Geneve)
	if !ok || !ok2 || mod.Dport != 0 {
		return unix.EOPNOTSUPP
	}
	g.Remote = mod.Remote
	f.wrote("LinkModify")
	f.log("link", OpReplace, "%s remote %v", g.Name, g.Remote)
	return nil
}

// LinkDel implements Netlink.
func (f *FakeNetlink) LinkDel(link netlink.Link) error {
	f.lock()
	defer f.unlock()
	if err := f.check("LinkDel"); err != nil {
		return err
	}
	i, l := f.find(link.Attrs().Name)
	if l == nil {
		return errNoLink(link.Attrs().Name)
	}
	idx := l.Attrs().Index
	f.links = slices.Delete(f.links, i, i+1)
	delete(f.addrs, idx)
	f.neighs = slices.DeleteFunc(f.neighs, func(n netlink.Neigh) bool { return n.LinkIndex == idx })
	f.routes = slices.DeleteFunc(f.routes, func(r netlink.Route) bool { return r.LinkIndex == idx })
	f.wrote("LinkDel")
	f.log("link", OpDelete, "%s", l.Attrs().Name)
	return nil
}

func (f *FakeNetlink) setAttrLog(method string, link netlink.Link, set func(*netlink.LinkAttrs), what string) error {
	f.lock()
	defer f.unlock()
	if err := f.check(method); err != nil {
		return err
	}
	_, l := f.find(link.Attrs().Name)
	if l == nil {
		return errNoLink(link.Attrs().Name)
	}
	set(l.Attrs())
	f.wrote(method)
	f.log("link", OpReplace, "%s %s", l.Attrs().Name, what)
	return nil
}

// LinkSetUp implements Netlink.
func (f *FakeNetlink) LinkSetUp(link netlink.Link) error {
	return f.setAttrLog("LinkSetUp", link, func(a *netlink.LinkAttrs) { a.Flags |= net.FlagUp }, "up")
}

// LinkSetMTU implements Netlink.
func (f *FakeNetlink) LinkSetMTU(link netlink.Link, mtu int) error {
	return f.setAttrLog("LinkSetMTU", link, func(a *netlink.LinkAttrs) { a.MTU = mtu }, fmt.Sprintf("mtu %d", mtu))
}

// SetLinkDown is a test hook (drift).
func (f *FakeNetlink) SetLinkDown(name string) {
	f.lock()
	defer f.unlock()
	if _, l := f.find(name); l != nil {
		l.Attrs().Flags &^= net.FlagUp
	}
}

// AddrList implements Netlink.
func (f *FakeNetlink) AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	f.lock()
	defer f.unlock()
	var out []netlink.Addr
	for _, a := range f.addrs[link.Attrs().Index] {
		if family == netlink.FAMILY_ALL || ipFamily(a.IP) == family {
			out = append(out, a)
		}
	}
	return out, nil
}

// AddrReplace implements Netlink.
func (f *FakeNetlink) AddrReplace(link netlink.Link, addr *netlink.Addr) error {
	f.lock()
	defer f.unlock()
	if err := f.check("AddrReplace"); err != nil {
		return err
	}
	idx := link.Attrs().Index
	if l, _ := f.byIndex(idx); l == nil {
		return errNoLink(link.Attrs().Name)
	}
	n := len(f.addrs[idx])
	f.addrs[idx] = slices.DeleteFunc(f.addrs[idx], func(a netlink.Addr) bool { return a.IPNet.String() == addr.IPNet.String() })
	op := OpAdd
	if len(f.addrs[idx]) < n {
		op = OpReplace
	}
	f.addrs[idx] = append(f.addrs[idx], *addr)
	f.wrote("AddrReplace")
	f.log("addr", op, "%s dev %s", addr.IPNet, f.linkName(idx))
	return nil
}

// AddrDel implements Netlink.
func (f *FakeNetlink) AddrDel(link netlink.Link, addr *netlink.Addr) error {
	f.lock()
	defer f.unlock()
	idx := link.Attrs().Index
	f.addrs[idx] = slices.DeleteFunc(f.addrs[idx], func(a netlink.Addr) bool { return a.IPNet.String() == addr.IPNet.String() })
	f.wrote("AddrDel")
	f.log("addr", OpDelete, "%s dev %s", addr.IPNet, f.linkName(idx))
	return nil
}

// NeighList implements Netlink.
func (f *FakeNetlink) NeighList(linkIndex, family int) ([]netlink.Neigh, error) {
	f.lock()
	defer f.unlock()
	var out []netlink.Neigh
	for _, n := range f.neighs {
		if n.LinkIndex == linkIndex && n.Family == family {
			out = append(out, n)
		}
	}
	return out, nil
}

// NeighSet implements Netlink.
func (f *FakeNetlink) NeighSet(n *netlink.Neigh) error {
	f.lock()
	defer f.unlock()
	if err := f.check("NeighSet"); err != nil {
		return err
	}
	before := len(f.neighs)
	f.neighs = slices.DeleteFunc(f.neighs, func(x netlink.Neigh) bool {
		if x.LinkIndex != n.LinkIndex || x.Family != n.Family {
			return false
		}
		if n.Family == unix.AF_BRIDGE {
			return x.HardwareAddr.String() == n.HardwareAddr.String()
		}
		return x.IP.Equal(n.IP)
	})
	op := OpAdd
	if len(f.neighs) < before {
		op = OpReplace
	}
	f.neighs = append(f.neighs, *n)
	f.wrote("NeighSet")
	kind := "neigh"
	if n.Family == unix.AF_BRIDGE {
		kind = "fdb"
	}
	f.log("neigh", op, "%s %s lladdr %s dev %s", kind, n.IP, n.HardwareAddr, f.linkName(n.LinkIndex))
	return nil
}

// DelNeighs is a test hook (drift): removes all entries of a family on a link.
func (f *FakeNetlink) DelNeighs(linkName string, family int) {
	f.lock()
	defer f.unlock()
	_, l := f.find(linkName)
	f.neighs = slices.DeleteFunc(f.neighs, func(x netlink.Neigh) bool { return l != nil && x.LinkIndex == l.Attrs().Index && x.Family == family })
}

// RouteGet implements Netlink, per family like the kernel: the longest
// prefix of the destination's family in the main table that carries a
// source, else Src (Src6) if it is of that family. An IPv6 destination is
// never answered with an IPv4 route, nor the other way round.
func (f *FakeNetlink) RouteGet(dst net.IP) ([]netlink.Route, error) {
	f.lock()
	defer f.unlock()
	if err := f.check("RouteGet"); err != nil {
		return nil, err
	}
	a, ok := netip.AddrFromSlice(dst)
	if !ok {
		return nil, unix.EINVAL
	}
	a = a.Unmap()
	fam := netlink.FAMILY_V4
	if a.Is6() {
		fam = netlink.FAMILY_V6
	}
	host := &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
	best := -1
	var src net.IP
	var dev int
	for _, r := range f.routes {
		if routeFamily(r) != fam || (r.Table != 0 && r.Table != unix.RT_TABLE_MAIN) || r.Src == nil {
			continue
		}
		bits := 0
		if r.Dst != nil {
			if !r.Dst.Contains(host.IP) {
				continue
			}
			bits, _ = r.Dst.Mask.Size()
		}
		if bits > best {
			best, src, dev = bits, r.Src, r.LinkIndex
		}
	}
	if src == nil {
		for _, s := range []netip.Addr{f.Src, f.Src6} {
			if s.IsValid() && s.Is6() == a.Is6() {
				src = net.IP(s.AsSlice())
				break
			}
		}
	}
	if src == nil {
		return nil, unix.ENETUNREACH
	}
	return []netlink.Route{{Family: fam, Dst: host, Src: src, LinkIndex: dev, Table: unix.RT_TABLE_MAIN}}, nil
}

// validRoute refuses what the kernel refuses: addresses of another family
// than the route's, and a device that does not exist.
func (f *FakeNetlink) validRoute(r *netlink.Route) error {
	fam := routeFamily(*r)
	for _, ip := range []net.IP{r.Gw, r.Src} {
		if ip != nil && ipFamily(ip) != fam {
			return fmt.Errorf("route %s: %s is not of its family: %w", routeKey(*r), ip, unix.EINVAL)
		}
	}
	if r.Dst != nil && ipFamily(r.Dst.IP) != fam {
		return fmt.Errorf("route %s: destination of another family: %w", routeKey(*r), unix.EINVAL)
	}
	if r.LinkIndex != 0 {
		if l, _ := f.byIndex(r.LinkIndex); l == nil {
			return fmt.Errorf("route %s: no link #%d: %w", routeKey(*r), r.LinkIndex, unix.ENODEV)
		}
	}
	return nil
}

func (f *FakeNetlink) byIndex(idx int) (netlink.Link, int) {
	for i, l := range f.links {
		if l.Attrs().Index == idx {
			return l, i
		}
	}
	return nil, -1
}

// Links are the names of the fake's links (sysctls check theirs).
func (f *FakeNetlink) Links() []string {
	f.lock()
	defer f.unlock()
	var out []string
	for _, l := range f.links {
		out = append(out, l.Attrs().Name)
	}
	return out
}

// RemoveLink is a test hook: a link vanishes as when its pod's netns goes
// (the kernel takes its addresses, neighbours and routes with it). It is
// not a write of ours, so it is not journalled.
func (f *FakeNetlink) RemoveLink(name string) {
	f.lock()
	defer f.unlock()
	i, l := f.find(name)
	if l == nil {
		return
	}
	idx := l.Attrs().Index
	f.links = slices.Delete(f.links, i, i+1)
	delete(f.addrs, idx)
	f.neighs = slices.DeleteFunc(f.neighs, func(n netlink.Neigh) bool { return n.LinkIndex == idx })
	f.routes = slices.DeleteFunc(f.routes, func(r netlink.Route) bool { return r.LinkIndex == idx })
}

// RouteListFiltered implements Netlink (table and protocol filters).
func (f *FakeNetlink) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	f.lock()
	defer f.unlock()
	if err := f.check("RouteListFiltered"); err != nil {
		return nil, err
	}
	var out []netlink.Route
	for _, r := range f.routes {
		if family != netlink.FAMILY_ALL && routeFamily(r) != family {
			continue
		}
		if mask&netlink.RT_FILTER_TABLE != 0 && filter.Table != 0 && r.Table != filter.Table {
			continue
		}
		if mask&netlink.RT_FILTER_PROTOCOL != 0 && r.Protocol != filter.Protocol {
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

// RouteReplace implements Netlink.
func (f *FakeNetlink) RouteReplace(r *netlink.Route) error {
	f.lock()
	defer f.unlock()
	if err := f.check("RouteReplace"); err != nil {
		return err
	}
	if err := f.validRoute(r); err != nil {
		return err
	}
	n := len(f.routes)
	f.routes = slices.DeleteFunc(f.routes, func(x netlink.Route) bool { return routeKey(x) == routeKey(*r) })
	op := OpAdd
	if len(f.routes) < n {
		op = OpReplace
	}
	f.routes = append(f.routes, *r)
	f.wrote("RouteReplace")
	f.log("route", op, "%s", routeText(*r))
	return nil
}

// RouteDel implements Netlink.
func (f *FakeNetlink) RouteDel(r *netlink.Route) error {
	f.lock()
	defer f.unlock()
	if err := f.check("RouteDel"); err != nil {
		return err
	}
	i := slices.IndexFunc(f.routes, func(x netlink.Route) bool { return routeKey(x) == routeKey(*r) })
	if i < 0 {
		return unix.ESRCH
	}
	gone := f.routes[i]
	f.routes = slices.Delete(f.routes, i, i+1)
	f.wrote("RouteDel")
	f.log("route", OpDelete, "%s", routeText(gone))
	return nil
}

// RuleList implements Netlink.
func (f *FakeNetlink) RuleList(family int) ([]netlink.Rule, error) {
	f.lock()
	defer f.unlock()
	if err := f.check("RuleList"); err != nil {
		return nil, err
	}
	var out []netlink.Rule
	for _, r := range f.rules {
		if family == netlink.FAMILY_ALL || r.Family == family {
			out = append(out, r)
		}
	}
	slices.SortStableFunc(out, func(a, b netlink.Rule) int { return a.Priority - b.Priority })
	return out, nil
}

// RuleAdd implements Netlink.
func (f *FakeNetlink) RuleAdd(r *netlink.Rule) error {
	f.lock()
	defer f.unlock()
	if err := f.check("RuleAdd"); err != nil {
		return err
	}
	for _, x := range f.rules {
		if ruleKey(x) == ruleKey(*r) {
			return unix.EEXIST
		}
	}
	f.rules = append(f.rules, *r)
	f.wrote("RuleAdd")
	f.log("rule", OpAdd, "%s", ruleKey(*r))
	return nil
}

// RuleDel implements Netlink, matching like the kernel: unset request fields match anything.
func (f *FakeNetlink) RuleDel(r *netlink.Rule) error {
	f.lock()
	defer f.unlock()
	if err := f.check("RuleDel"); err != nil {
		return err
	}
	for i, x := range f.rules {
		if x.Family != r.Family || x.Priority != r.Priority || (r.Table > 0 && x.Table != r.Table) || (r.Protocol != 0 && x.Protocol != r.Protocol) {
			continue
		}
		if r.Mask != nil && (x.Mask == nil || *x.Mask != *r.Mask || x.Mark != r.Mark) {
			continue
		}
		f.rules = slices.Delete(f.rules, i, i+1)
		f.wrote("RuleDel")
		f.log("rule", OpDelete, "%s", ruleKey(x))
		return nil
	}
	return unix.ENOENT
}

// IpsetList implements Netlink.
func (f *FakeNetlink) IpsetList(name string) (*netlink.IPSetResult, error) {
	f.lock()
	defer f.unlock()
	if err := f.check("IpsetList"); err != nil {
		return nil, err
	}
	s, ok := f.ipsets[name]
	if !ok {
		return nil, unix.ENOENT
	}
	c := *s
	c.Entries = slices.Clone(s.Entries)
	return &c, nil
}

// IpsetCreate implements Netlink.
func (f *FakeNetlink) IpsetCreate(name, typ string, o netlink.IpsetCreateOptions) error {
	f.lock()
	defer f.unlock()
	if err := f.check("IpsetCreate"); err != nil {
		return err
	}
	if _, ok := f.ipsets[name]; ok {
		return unix.EEXIST
	}
	f.ipsets[name] = &netlink.IPSetResult{SetName: name, TypeName: typ, Family: o.Family}
	f.wrote("IpsetCreate")
	f.log("ipset", OpAdd, "%s %s family %d", name, typ, o.Family)
	return nil
}

// IpsetAdd implements Netlink.
func (f *FakeNetlink) IpsetAdd(name string, e *netlink.IPSetEntry) error {
	f.lock()
	defer f.unlock()
	if err := f.check("IpsetAdd"); err != nil {
		return err
	}
	s, ok := f.ipsets[name]
	if !ok {
		return unix.ENOENT
	}
	for i, x := range s.Entries {
		if x.IP.Equal(e.IP) {
			if !e.Replace {
				return unix.EEXIST
			}
			s.Entries[i] = *e
			f.wrote("IpsetAdd")
			f.log("ipset", OpReplace, "%s %s %s", name, e.IP, e.Comment)
			return nil
		}
	}
	s.Entries = append(s.Entries, *e)
	f.wrote("IpsetAdd")
	f.log("ipset", OpAdd, "%s %s %s", name, e.IP, e.Comment)
	return nil
}

// IpsetDel implements Netlink.
func (f *FakeNetlink) IpsetDel(name string, e *netlink.IPSetEntry) error {
	f.lock()
	defer f.unlock()
	if err := f.check("IpsetDel"); err != nil {
		return err
	}
	s, ok := f.ipsets[name]
	if !ok {
		return unix.ENOENT
	}
	s.Entries = slices.DeleteFunc(s.Entries, func(x netlink.IPSetEntry) bool { return x.IP.Equal(e.IP) })
	f.wrote("IpsetDel")
	f.log("ipset", OpDelete, "%s %s", name, e.IP)
	return nil
}

// IpsetDestroy implements Netlink.
func (f *FakeNetlink) IpsetDestroy(name string) error {
	f.lock()
	defer f.unlock()
	if _, ok := f.ipsets[name]; !ok {
		return unix.ENOENT
	}
	delete(f.ipsets, name)
	f.wrote("IpsetDestroy")
	f.log("ipset", OpDelete, "%s (destroy)", name)
	return nil
}

// GetNetNsIdByFd implements Netlink (no peers in the fake).
func (f *FakeNetlink) GetNetNsIdByFd(int) (int, error) { return -1, nil }

// Dump renders the fake's state canonically (sorted), for golden tests.
func (f *FakeNetlink) Dump() string {
	f.lock()
	defer f.unlock()
	var lines []string
	for _, l := range f.links {
		a := l.Attrs()
		s := fmt.Sprintf("link %s #%d mtu %d up=%v", a.Name, a.Index, a.MTU, a.Flags&net.FlagUp != 0)
		switch v := l.(type) {
		case *netlink.Vxlan:
			s += fmt.Sprintf(" vxlan vni %d port %d remote %v learning=%v mac %s", v.VxlanId, v.Port, v.Group, v.Learning, a.HardwareAddr)
		case *netlink.Geneve:
			s += fmt.Sprintf(" geneve vni %d port %d remote %v mac %s", v.ID, v.Dport, v.Remote, a.HardwareAddr)
		}
		lines = append(lines, s)
		for _, ad := range f.addrs[a.Index] {
			lines = append(lines, fmt.Sprintf("addr %s dev %s", ad.IPNet, a.Name))
		}
	}
	for _, n := range f.neighs {
		kind := "neigh"
		if n.Family == unix.AF_BRIDGE {
			kind = "fdb"
		}
		lines = append(lines, fmt.Sprintf("%s %s lladdr %s dev#%d", kind, n.IP, n.HardwareAddr, n.LinkIndex))
	}
	var rs []string
	for _, r := range f.rules {
		rs = append(rs, "rule "+ruleKey(r))
	}
	slices.Sort(rs)
	lines = append(lines, rs...)
	rs = nil
	for _, r := range f.routes {
		rs = append(rs, "route "+routeText(r))
	}
	slices.Sort(rs)
	lines = append(lines, rs...)
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for k := range f.ipsets {
			if !yield(k) {
				return
			}
		}
	}) {
		s := f.ipsets[name]
		var m []string
		for _, e := range s.Entries {
			m = append(m, e.IP.String()+" "+e.Comment)
		}
		slices.Sort(m)
		lines = append(lines, fmt.Sprintf("ipset %s %s family %d: %s", name, s.TypeName, s.Family, strings.Join(m, ", ")))
	}
	return strings.Join(lines, "\n") + "\n"
}

// FakeSysctl is an in-memory Sysctl that knows which keys exist, like
// /proc/sys: a key set before (Values) or an interface key
// net.ipv4.conf.<dev>.<name> (net.ipv6.conf... when the netns has IPv6, i.e.
// some net.ipv6 key is in Values) of a known name, for all, default or a
// link of NL. Anything else is ENOENT, as is a value whose link is gone.
type FakeSysctl struct {
	mu     sync.Mutex
	Values map[string]string
	Writes int
	// NL, when set, holds the links whose interface keys exist
	// (NewFakeKernel sets it); nil accepts any interface name.
	NL *FakeNetlink
	// Journal, when set, records every write, as NS.
	Journal *Journal
	NS      string
}

// ifSysctlDefaults are the interface keys the fake knows and the value a
// new interface starts with.
var ifSysctlDefaults = map[string]string{
	"rp_filter":    "1",
	"accept_local": "0",
	"forwarding":   "0",
	"accept_dad":   "1",
	"disable_ipv6": "0",
}

// NewFakeSysctl returns sysctls with ip_forward on and rp_filter strict.
func NewFakeSysctl() *FakeSysctl {
	return &FakeSysctl{Values: map[string]string{"net.ipv4.ip_forward": "1"}}
}

func errNoSysctl(k string) error { return fmt.Errorf("sysctl %s: %w", k, unix.ENOENT) }

// ifKey splits net.ipv{4,6}.conf.<dev>.<name>.
func ifKey(k string) (v6 bool, dev, name string, ok bool) {
	rest, ok4 := strings.CutPrefix(k, "net.ipv4.conf.")
	if !ok4 {
		var ok6 bool
		if rest, ok6 = strings.CutPrefix(k, "net.ipv6.conf."); !ok6 {
			return false, "", "", false
		}
		v6 = true
	}
	i := strings.LastIndexByte(rest, '.')
	if i <= 0 {
		return false, "", "", false
	}
	return v6, rest[:i], rest[i+1:], true
}

// exists reports whether key exists now, and its value when first read.
func (s *FakeSysctl) exists(k string) (def string, ok bool) {
	v6, dev, name, isIf := ifKey(k)
	if !isIf {
		_, ok := s.Values[k]
		return "", ok
	}
	if v6 && !s.hasIPv6() {
		return "", false
	}
	def, known := ifSysctlDefaults[name]
	if _, set := s.Values[k]; !known && !set {
		return "", false
	}
	if dev == "all" || dev == "default" || s.NL == nil {
		return def, true
	}
	return def, slices.Contains(s.NL.Links(), dev)
}

func (s *FakeSysctl) hasIPv6() bool {
	for k := range s.Values {
		if strings.HasPrefix(k, "net.ipv6.") {
			return true
		}
	}
	return false
}

// Get implements Sysctl.
func (s *FakeSysctl) Get(k string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	def, ok := s.exists(k)
	if !ok {
		return "", errNoSysctl(k)
	}
	if v, set := s.Values[k]; set {
		return v, nil
	}
	return def, nil
}

// Set implements Sysctl.
func (s *FakeSysctl) Set(k, v string) error {
	s.mu.Lock()
	if _, ok := s.exists(k); !ok {
		s.mu.Unlock()
		return errNoSysctl(k)
	}
	s.Values[k] = v
	s.Writes++
	s.mu.Unlock()
	// A key that exists always has a value: a write replaces it.
	s.Journal.record(Entry{NS: s.NS, Kind: "sysctl", Op: OpReplace, Object: k + "=" + v})
	return nil
}

// NewFakeKernel bundles fakes into a Kernel; one iptables fake per family
// serves every backend. It ties sys to nl's links, and journals the
// iptables restores into nl's Journal (as nl's NS).
func NewFakeKernel(nl *FakeNetlink, sys *FakeSysctl, ipt, ipt6 *iptables.Fake) *kernel.Kernel {
	if sys.NL == nil {
		sys.NL = nl
	}
	j := func() *Journal { return nl.Journal }
	ns := func() string { return nl.NS }
	r4 := journalRunner{Fake: ipt, j: j, ns: ns, kind: "iptables"}
	r6 := journalRunner{Fake: ipt6, j: j, ns: ns, kind: "ip6tables"}
	return kernel.New(nl, sys, func(_ string, family int) (iptables.Runner, error) {
		if family == 6 {
			return r6, nil
		}
		return r4, nil
	}, iptables.Here, nil)
}

// ipFamily is the family of an address.
func ipFamily(ip net.IP) int {
	if ip.To4() != nil {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// routeFamily is a route's family as the kernel would file it: its own
// field, else that of its destination, gateway or source.
func routeFamily(r netlink.Route) int {
	switch {
	case r.Family != 0:
		return r.Family
	case r.Dst != nil:
		return ipFamily(r.Dst.IP)
	case r.Gw != nil:
		return ipFamily(r.Gw)
	case r.Src != nil:
		return ipFamily(r.Src)
	}
	return netlink.FAMILY_V4
}

// routeKey is what makes two routes the same to the kernel (for replace
// and delete): family, table, destination (and TOS and priority, which the
// dataplane leaves at 0).
func routeKey(r netlink.Route) string {
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	s := fmt.Sprintf("%s table %d %s", familyName(routeFamily(r)), r.Table, dst)
	if r.Tos != 0 || r.Priority != 0 {
		s += fmt.Sprintf(" tos %d metric %d", r.Tos, r.Priority)
	}
	return s
}

// routeText renders a route with every attribute the dataplane sets.
func routeText(r netlink.Route) string {
	s := routeKey(r)
	switch r.Type {
	case unix.RTN_LOCAL:
		s += " local"
	case unix.RTN_UNREACHABLE:
		s += " unreachable"
	}
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	if r.LinkIndex != 0 {
		s += fmt.Sprintf(" dev#%d", r.LinkIndex)
	}
	if r.Src != nil {
		s += " src " + r.Src.String()
	}
	if r.Scope != 0 {
		s += " scope " + r.Scope.String()
	}
	if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		s += " onlink"
	}
	return s + fmt.Sprintf(" proto %d", r.Protocol)
}

// ruleKey is what makes two rules the same to the kernel (EEXIST).
func ruleKey(r netlink.Rule) string {
	s := fmt.Sprintf("%s %d:", familyName(r.Family), r.Priority)
	if r.Src != nil {
		s += " from " + r.Src.String()
	}
	if r.Dst != nil {
		s += " to " + r.Dst.String()
	}
	if r.IifName != "" {
		s += " iif " + r.IifName
	}
	if r.OifName != "" {
		s += " oif " + r.OifName
	}
	if r.Mask != nil {
		s += fmt.Sprintf(" fwmark %#x/%#x", r.Mark, *r.Mask)
	}
	if r.Invert {
		s += " not"
	}
	if r.Goto > 0 {
		s += fmt.Sprintf(" goto %d", r.Goto)
	} else {
		s += fmt.Sprintf(" lookup %d", r.Table)
	}
	return s + fmt.Sprintf(" proto %d", r.Protocol)
}

func familyName(f int) string {
	if f == netlink.FAMILY_V6 {
		return "inet6"
	}
	return "inet"
}
