package dataplane

// The journal test: every transition of the stress matrix
// (test/integration/transitions_test.go) replayed on the fake kernel, with
// a small packet-path oracle evaluated after every single write.
//
// The oracle answers, from the fakes' state only, what becomes of two
// connection openings per ambient pod and family: the pod's SYN to an
// address off the node (outbound) and a SYN from off the node to the pod
// (inbound). The answer is captured by a named ztunnel, blocked (REJECT),
// direct (it escaped capture), or lost (it stalls: no route, a tunnel to
// nowhere, a ztunnel netns that cannot take it, a ztunnel that is gone).
//
// Its assumptions, kept deliberately small:
//   - Only the first packet is modelled (a pure SYN, conntrack NEW, no
//     marks); replies, proxy-return and slots are not.
//   - mangle PREROUTING (with its jumps) is interpreted rule by rule with
//     the matches the dataplane writes; an unknown match or target fails
//     the test instead of guessing. nat is not modelled (no kube-proxy).
//   - Routing walks the ip rules of the family by priority (fwmark
//     selectors, goto, lookup). Table local holds nothing the probes are
//     addressed to; table main always has a route (the node's default
//     route and pods' host routes, which the fake does not hold): a packet
//     that reaches main is forwarded out of the node, through filter
//     FORWARD, which may REJECT it.
//   - A route into istioin/istioout delivers only if the tunnel is up, has
//     a neighbour entry for the gateway whose MAC an FDB entry sends to a
//     ztunnel IP, the outer packet (same mark) routes to that ztunnel's
//     veth (or main), the ztunnel is not gone, and in its netns the peer
//     tunnel (same VNI and port, that MAC, the gateway address) exists and
//     mangle PREROUTING TPROXYs the packet to a mark whose ip rule leads to
//     a table with a local default route.
//
// After each write a probe may show what it showed before the transition,
// what it shows after, or blocked (a connection opened mid-transition may
// be reset); never direct or lost unless one side of the transition is,
// and never a ztunnel that is neither side's.

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kernel"
	"github.com/ambient-redirect/ambient-redirect/dataplane/kerneltest"
)

// jzt is one ztunnel pod of the journal node.
type jzt struct {
	name, path, veth string
	ips              []netip.Addr
	nl               *kerneltest.FakeNetlink
	sys              *kerneltest.FakeSysctl
	ipt, ipt6        *iptables.Fake
	nft              *kerneltest.FakeNFT
	k                *kernel.Kernel
	gone             bool
}

func (z *jzt) spec() *Ztunnel {
	return &Ztunnel{Pod: "istio-system/" + z.name, IPs: slices.Clone(z.ips), HostVeth: z.veth, NetNS: z.path}
}

// jnode is a node of fakes sharing one journal.
type jnode struct {
	t         *testing.T
	j         *kerneltest.Journal
	nl        *kerneltest.FakeNetlink
	sys       *kerneltest.FakeSysctl
	ipt, ipt6 *iptables.Fake
	nft       *kerneltest.FakeNFT
	backend   Backend
	zts       []*jzt
	v4, v6    bool
	swap      [2]string
}

func newJNode(t *testing.T, v4, v6 bool) *jnode {
	j := kerneltest.NewJournal()
	n := &jnode{t: t, j: j, nl: kerneltest.NewFakeNetlink(), sys: kerneltest.NewFakeSysctl(), ipt: iptables.NewFake(), ipt6: iptables.NewFake(),
		nft: kerneltest.NewFakeNFT(), backend: BackendIPTables, v4: v4, v6: v6}
	n.nl.Journal, n.nl.NS, n.sys.Journal, n.sys.NS = j, "node", j, "node"
	n.nft.Journal, n.nft.NS = j, "node"
	n.nl.Src, n.nl.Src6 = netip.MustParseAddr("10.244.1.1"), netip.MustParseAddr("fd00:10:244:1::1")
	if v6 {
		n.sys.Values["net.ipv6.conf.all.forwarding"] = "1"
	}
	return n
}

// addZtunnel starts ztunnel pod number i: its netns and its veth.
func (n *jnode) addZtunnel(i int) *jzt {
	z := &jzt{name: fmt.Sprintf("zt%d", i), path: fmt.Sprintf("/run/netns/zt%d", i), veth: fmt.Sprintf("vethzt%d", i),
		nl: kerneltest.NewFakeNetlink(), sys: kerneltest.NewFakeSysctl(), ipt: iptables.NewFake(), ipt6: iptables.NewFake(), nft: kerneltest.NewFakeNFT()}
	z.nl.Journal, z.nl.NS, z.sys.Journal, z.sys.NS = n.j, z.name, n.j, z.name
	z.nft.Journal, z.nft.NS = n.j, z.name
	if n.v4 {
		z.ips = append(z.ips, netip.AddrFrom4([4]byte{10, 244, 1, byte(100 + i)}))
	}
	if n.v6 {
		z.ips = append(z.ips, netip.MustParseAddr(fmt.Sprintf("fd00:10:244:1::%x", 0x100+i)))
		z.sys.Values["net.ipv6.conf.all.forwarding"] = "1"
	}
	eth := z.nl.AddVeth("eth0", 1500, 0)
	n.nl.AddVeth(z.veth, 1500, eth)
	z.k = kerneltest.NewFakeKernel(z.nl, z.sys, z.ipt, z.ipt6)
	z.k.NFT = z.nft
	n.zts = append(n.zts, z)
	return z
}

// kill: the ztunnel pod is gone, veth and netns with it (not our write).
func (n *jnode) kill(z *jzt) {
	z.gone = true
	n.nl.RemoveLink(z.veth)
}

func (n *jnode) open(path string) (*kernel.Kernel, error) {
	for _, z := range n.zts {
		if z.path == path && !z.gone {
			return z.k, nil
		}
	}
	return nil, fmt.Errorf("netns %s: %w", path, os.ErrNotExist)
}

func (n *jnode) dataplane(mode FailMode, onEnroll OnEnroll) *Dataplane {
	n.t.Helper()
	cfg := DefaultConfig()
	cfg.IPTablesMode = IPTablesNFT
	cfg.NetNSDir = n.t.TempDir()
	cfg.FailMode, cfg.OnEnroll, cfg.Backend = mode, onEnroll, n.backend
	k := kerneltest.NewFakeKernel(n.nl, n.sys, n.ipt, n.ipt6)
	k.NFT = n.nft
	d, err := New(context.Background(), cfg, Options{Node: k, OpenNS: n.open})
	if err != nil {
		n.t.Fatal(err)
	}
	d.order.swap = n.swap
	return d
}

// jpod is ambient pod number i.
func (n *jnode) jpod(i int) Pod {
	p := Pod{UID: fmt.Sprintf("uid-%d", i), Name: fmt.Sprintf("default/a%d", i)}
	if n.v4 {
		p.IPs = append(p.IPs, netip.AddrFrom4([4]byte{10, 244, 1, byte(10 + i)}))
	}
	if n.v6 {
		p.IPs = append(p.IPs, netip.MustParseAddr(fmt.Sprintf("fd00:10:244:1::%x", 0x10+i)))
	}
	return p
}

// ---- the oracle ----

// fate is what becomes of a probe: kind captured (by zt), blocked, direct
// or lost (why says how).
type fate struct {
	kind, zt, why string
}

func (f fate) String() string {
	switch {
	case f.zt != "":
		return f.kind + " by " + f.zt
	case f.why != "":
		return f.kind + " (" + f.why + ")"
	}
	return f.kind
}

func (f fate) same(o fate) bool { return f.kind == o.kind && f.zt == o.zt }

// pkt is a packet as far as the rules look at it.
type pkt struct {
	iif            string
	src, dst       netip.Addr
	dport          int
	mark, connmark uint32
}

// oracleError is a rule or route the oracle does not understand.
type oracleError string

// chains parses an iptables fake's table into chains.
func chains(f *iptables.Fake, table string) map[string][]string {
	s, err := f.Save(context.Background(), table)
	if err != nil {
		panic(oracleError(err.Error()))
	}
	out := map[string][]string{}
	for _, l := range strings.Split(s, "\n") {
		if rest, ok := strings.CutPrefix(l, "-A "); ok {
			c, r, _ := strings.Cut(rest, " ")
			out[c] = append(out[c], r)
		}
	}
	return out
}

func parseMark(s string) (v, m uint32) {
	a, b, ok := strings.Cut(s, "/")
	x, err := strconv.ParseUint(a, 0, 32)
	if err != nil {
		panic(oracleError("mark " + s))
	}
	y := uint64(0xffffffff)
	if ok {
		if y, err = strconv.ParseUint(b, 0, 32); err != nil {
			panic(oracleError("mark " + s))
		}
	}
	return uint32(x), uint32(y)
}

// inSet reports whether a is a member of the ipset name in nl.
func inSet(nl *kerneltest.FakeNetlink, name string, a netip.Addr) bool {
	s, err := nl.IpsetList(name)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(s.Entries, func(e netlink.IPSetEntry) bool { return e.IP.Equal(net.IP(a.AsSlice())) })
}

// evalChain runs p through a chain: "" (fell off or RETURN), ACCEPT,
// REJECT or TPROXY.
func evalChain(cs map[string][]string, chain string, p *pkt, nl *kerneltest.FakeNetlink) string {
	for _, r := range cs[chain] {
		v, target := evalRule(r, p, nl)
		if !v {
			continue
		}
		switch target {
		case "", "MARK", "CONNMARK":
		case "RETURN":
			return ""
		case "ACCEPT", "REJECT", "TPROXY", "DNAT":
			return target
		default:
			if _, ok := cs[target]; !ok {
				panic(oracleError("jump to unknown chain " + target))
			}
			if v := evalChain(cs, target, p, nl); v != "" {
				return v
			}
		}
	}
	return ""
}

// evalRule matches one rule and, if it matches, applies its mark targets.
func evalRule(rule string, p *pkt, nl *kerneltest.FakeNetlink) (bool, string) {
	tok := strings.Fields(rule)
	neg, module := false, ""
	next := func(i *int) string {
		*i++
		if *i >= len(tok) {
			panic(oracleError("short rule " + rule))
		}
		return tok[*i]
	}
	for i := 0; i < len(tok); i++ {
		ok := true
		switch t := tok[i]; t {
		case "!":
			neg = true
			continue
		case "-m":
			module = next(&i)
			continue
		case "-i":
			ok = p.iif == next(&i)
		case "-s", "-d":
			pre, err := netip.ParsePrefix(next(&i))
			if err != nil {
				panic(oracleError(rule))
			}
			a := p.src
			if t == "-d" {
				a = p.dst
			}
			ok = pre.Contains(a)
		case "-p":
			ok = next(&i) == "tcp"
		case "--tcp-flags":
			mask, comp := next(&i), next(&i)
			// A pure SYN: of the flags in mask, exactly SYN is set.
			has := slices.Contains(strings.Split(mask, ","), "SYN")
			ok = (has && comp == "SYN") || (!has && comp == "NONE")
		case "--dport":
			ok = next(&i) == strconv.Itoa(p.dport)
		case "--match-set":
			name, dir := next(&i), next(&i)
			a := p.src
			if dir == "dst" {
				a = p.dst
			}
			ok = inSet(nl, name, a)
		case "--mark":
			v, m := parseMark(next(&i))
			switch module {
			case "mark":
				ok = p.mark&m == v
			case "connmark":
				ok = p.connmark&m == v
			default:
				panic(oracleError(rule))
			}
		case "--ctstate":
			ok = strings.Contains(next(&i), "NEW") // a SYN opens a NEW connection
		case "--comment":
			next(&i)
		case "-j":
			return true, applyTarget(tok[i+1:], p, rule)
		default:
			panic(oracleError(fmt.Sprintf("unknown match %q in %q", t, rule)))
		}
		if ok == neg {
			return false, ""
		}
		neg = false
	}
	return true, ""
}

func applyTarget(tok []string, p *pkt, rule string) string {
	target := tok[0]
	opt := map[string]string{}
	for i := 1; i < len(tok); i++ {
		if strings.HasPrefix(tok[i], "--") {
			if i+1 < len(tok) && !strings.HasPrefix(tok[i+1], "--") {
				opt[tok[i]] = tok[i+1]
				i++
			} else {
				opt[tok[i]] = ""
			}
		}
	}
	switch target {
	case "MARK":
		v, m := parseMark(opt["--set-xmark"])
		p.mark = p.mark&^m ^ v
	case "CONNMARK":
		if x, ok := opt["--set-xmark"]; ok {
			v, m := parseMark(x)
			p.connmark = p.connmark&^m ^ v
		} else if _, ok := opt["--save-mark"]; ok {
			nf, _ := parseMark(opt["--nfmask"])
			ct, _ := parseMark(opt["--ctmask"])
			p.connmark = p.connmark&^ct | p.mark&nf
		} else {
			panic(oracleError(rule))
		}
	case "TPROXY":
		v, m := parseMark(opt["--tproxy-mark"])
		p.mark = p.mark&^m ^ v
	case "RETURN", "ACCEPT", "REJECT", "DNAT":
	default:
		if strings.ToUpper(target) == target {
			panic(oracleError("unknown target in " + rule))
		}
	}
	return target
}

// lookup walks the ip rules of a's family with mark: the route found, or
// main (true) when the packet reaches the main table, or neither (no route).
func lookup(nl *kerneltest.FakeNetlink, a netip.Addr, mark uint32) (*netlink.Route, bool) {
	fam := netlink.FAMILY_V4
	if a.Is6() {
		fam = netlink.FAMILY_V6
	}
	rules, err := nl.RuleList(fam)
	if err != nil {
		panic(oracleError(err.Error()))
	}
	routes, _ := nl.RouteListFiltered(fam, &netlink.Route{}, 0)
	skipTo := -1
	for _, r := range rules {
		if r.Priority < skipTo {
			continue
		}
		if r.Src != nil || r.Dst != nil || r.IifName != "" || r.OifName != "" {
			panic(oracleError("rule selector the oracle does not model"))
		}
		match := r.Mask == nil || mark&*r.Mask == r.Mark
		if match == r.Invert {
			continue
		}
		if r.Goto > 0 {
			skipTo = r.Goto
			continue
		}
		switch r.Table {
		case unix.RT_TABLE_MAIN:
			return nil, true
		case unix.RT_TABLE_LOCAL, unix.RT_TABLE_DEFAULT:
			continue // nothing the probes are addressed to
		}
		var best *netlink.Route
		bits := -1
		for i, rt := range routes {
			if rt.Table != r.Table {
				continue
			}
			b := 0
			if rt.Dst != nil {
				if !rt.Dst.Contains(net.IP(a.AsSlice())) {
					continue
				}
				b, _ = rt.Dst.Mask.Size()
			}
			if b > bits {
				best, bits = &routes[i], b
			}
		}
		if best != nil {
			return best, false
		}
	}
	return nil, false
}

// probe runs a SYN from src to dst entering the node on iif.
func (n *jnode) probe(iif string, src, dst netip.Addr, dport int) (f fate) {
	defer func() {
		if r := recover(); r != nil {
			if e, ok := r.(oracleError); ok {
				n.t.Fatalf("oracle: %s", e)
			}
			panic(r)
		}
	}()
	ipt := n.ipt
	if dst.Is6() {
		ipt = n.ipt6
	}
	p := &pkt{iif: iif, src: src, dst: dst, dport: dport}
	prerouting := func() string { return evalChain(chains(ipt, "mangle"), "PREROUTING", p, n.nl) }
	forward := func() string { return evalChain(chains(ipt, "filter"), "FORWARD", p, n.nl) }
	if n.backend == BackendNFTables {
		f := FamilyOf(dst)
		prerouting = func() string {
			return evalNFTChains(n.nft, p, nftChainName("raw-prerouting", f), nftChainName("prerouting", f))
		}
		forward = func() string {
			return evalNFTChains(n.nft, p, nftChainName("forward", f), nftChainName("filter-forward", f))
		}
	}
	if prerouting() == "REJECT" {
		return fate{kind: "blocked"}
	}
	rt, main := lookup(n.nl, dst, p.mark)
	if rt == nil && !main {
		return fate{kind: "lost", why: "no route"}
	}
	if forward() == "REJECT" {
		return fate{kind: "blocked"}
	}
	if main {
		return fate{kind: "direct"}
	}
	return n.tunnel(rt, p)
}

// tunnel follows a route into istioin/istioout to the ztunnel behind it.
func (n *jnode) tunnel(rt *netlink.Route, p *pkt) fate {
	lost := func(format string, a ...any) fate { return fate{kind: "lost", why: fmt.Sprintf(format, a...)} }
	l, err := n.nl.LinkByIndex(rt.LinkIndex)
	if err != nil {
		return lost("route via a missing link")
	}
	vx, ok := l.(*netlink.Vxlan)
	if !ok || l.Attrs().Flags&net.FlagUp == 0 {
		return lost("route via %s, not an up tunnel", l.Attrs().Name)
	}
	peer := map[string]string{NodeInLink: ZtunnelInLink, NodeOutLink: ZtunnelOutLink}[vx.Name]
	if peer == "" || rt.Gw == nil {
		return lost("route via %s", vx.Name)
	}
	gw, _ := netip.AddrFromSlice(rt.Gw)
	gw = gw.Unmap()
	fam := netlink.FAMILY_V4
	if gw.Is6() {
		fam = netlink.FAMILY_V6
	}
	neighs, _ := n.nl.NeighList(vx.Index, fam)
	var mac net.HardwareAddr
	for _, nb := range neighs {
		if nb.IP.Equal(rt.Gw) {
			mac = nb.HardwareAddr
		}
	}
	if mac == nil {
		return lost("no neighbour for %s on %s", gw, vx.Name)
	}
	fdb, _ := n.nl.NeighList(vx.Index, unix.AF_BRIDGE)
	var remote netip.Addr
	for _, e := range fdb {
		if e.HardwareAddr.String() == mac.String() {
			remote, _ = netip.AddrFromSlice(e.IP)
			remote = remote.Unmap()
		}
	}
	if !remote.IsValid() {
		return lost("no FDB entry for %s on %s", mac, vx.Name)
	}
	var z *jzt
	for _, c := range n.zts {
		if slices.Contains(c.ips, remote) {
			z = c
		}
	}
	if z == nil {
		return lost("%s sends to %s, no ztunnel", vx.Name, remote)
	}
	if z.gone {
		return lost("%s sends to %s, which is gone", vx.Name, z.name)
	}
	// The outer packet carries the inner mark.
	ort, main := lookup(n.nl, remote, p.mark)
	if !main {
		if ort == nil {
			return lost("outer packet to %s: no route", z.name)
		}
		if ol, err := n.nl.LinkByIndex(ort.LinkIndex); err != nil || ol.Attrs().Name != z.veth {
			return lost("outer packet to %s is not routed to its veth", z.name)
		}
	}
	// The ztunnel's netns: the peer tunnel, then TPROXY and its rule.
	pl, err := z.nl.LinkByName(peer)
	pvx, ok := pl.(*netlink.Vxlan)
	if err != nil || !ok || pl.Attrs().Flags&net.FlagUp == 0 || pvx.VxlanId != vx.VxlanId || pvx.Port != vx.Port || pl.Attrs().HardwareAddr.String() != mac.String() {
		return lost("%s has no matching %s", z.name, peer)
	}
	addrs, _ := z.nl.AddrList(pl, fam)
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.Equal(rt.Gw) }) {
		return lost("%s's %s lacks %s", z.name, peer, gw)
	}
	ipt := z.ipt
	if p.dst.Is6() {
		ipt = z.ipt6
	}
	in := &pkt{iif: peer, src: p.src, dst: p.dst, dport: p.dport, mark: p.mark}
	tproxy := func() string { return evalChain(chains(ipt, "mangle"), "PREROUTING", in, z.nl) }
	if n.backend == BackendNFTables {
		tproxy = func() string { return evalNFTChains(z.nft, in, nftChainName("prerouting", FamilyOf(p.dst))) }
	}
	if tproxy() != "TPROXY" {
		return lost("%s does not TPROXY from %s", z.name, peer)
	}
	if r, _ := lookup(z.nl, p.dst, in.mark); r == nil || r.Type != unix.RTN_LOCAL {
		return lost("%s routes the TPROXYed packet on", z.name)
	}
	return fate{kind: "captured", zt: z.name}
}

// probes are the oracle's answers for every pod of pods, both ways, per
// family; keyed "pod family direction".
func (n *jnode) probes(ps []Pod) map[string]fate {
	out := map[string]fate{}
	for _, p := range ps {
		for _, a := range p.IPs {
			remote, client := netip.MustParseAddr("10.244.2.50"), netip.MustParseAddr("10.244.2.60")
			if a.Is6() {
				remote, client = netip.MustParseAddr("fd00:10:244:2::50"), netip.MustParseAddr("fd00:10:244:2::60")
			}
			out[a.String()+" outbound"] = n.probe("vethpod", a, remote, 80)
			out[a.String()+" inbound"] = n.probe("eth0", client, a, 8080)
		}
	}
	return out
}

// ---- the matrix ----

// step is one transition of the matrix.
type step struct {
	name string
	// event is what happens to the node before the agent reacts (a
	// ztunnel dies); the transition starts from its result.
	event func()
	do    func() error
	// want is the steady outcome afterwards: captured by this ztunnel,
	// blocked, or direct, for the pods (others are direct).
	want func(fam int) fate
	pods []Pod
}

type matrixRun struct {
	n          *jnode
	violations []string
	entries    int
}

// run replays steps, checking every write against the oracle.
func (m *matrixRun) run(t *testing.T, steps []step) {
	n := m.n
	var all []Pod
	for i := range 4 {
		all = append(all, n.jpod(i))
	}
	var cur string
	var start, end map[string]fate
	n.j.Observe(func(e kerneltest.Entry) {
		m.entries++
		for k, f := range n.probes(all) {
			if f.same(start[k]) || f.same(end[k]) || f.kind == "blocked" {
				continue
			}
			m.violations = append(m.violations, fmt.Sprintf("%s: after %s: %s: %s (before %s, after %s)", cur, e, k, f, start[k], end[k]))
		}
	})
	for _, s := range steps {
		if s.event != nil {
			s.event()
		}
		// What the transition ends in is known from the state it asks
		// for; the oracle must agree with it once the writes are done.
		cur, start = s.name, n.probes(all)
		end = map[string]fate{}
		for _, p := range all {
			enrolled := slices.ContainsFunc(s.pods, func(q Pod) bool { return q.UID == p.UID })
			for _, a := range p.IPs {
				fam := 4
				if a.Is6() {
					fam = 6
				}
				f := fate{kind: "direct"}
				if enrolled {
					f = s.want(fam)
				}
				end[a.String()+" outbound"], end[a.String()+" inbound"] = f, f
			}
		}
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		for k, f := range n.probes(all) {
			if !f.same(end[k]) {
				m.violations = append(m.violations, fmt.Sprintf("%s: steady state: %s: %s, want %s", s.name, k, f, end[k]))
			}
		}
	}
}

// matrix is the stress matrix of TestTransitionsNeverLeak on n, plus what
// only a fake can stage cheaply: three ztunnels at once, a pod event on
// the incremental path, a ztunnel replaced without a surge.
func matrix(n *jnode, onEnroll OnEnroll) []step {
	ctx := context.Background()
	dp := n.dataplane(FailClosed, onEnroll)
	restart := func(mode FailMode) { dp = n.dataplane(mode, onEnroll) }
	a := func(is ...int) []Pod {
		var ps []Pod
		for _, i := range is {
			ps = append(ps, n.jpod(i))
		}
		return ps
	}
	has := func(z *jzt, fam int) bool {
		return slices.ContainsFunc(z.ips, func(x netip.Addr) bool { return x.Is6() == (fam == 6) })
	}
	by := func(z *jzt, closed bool) func(int) fate {
		return func(fam int) fate {
			switch {
			case has(z, fam):
				return fate{kind: "captured", zt: z.name}
			case closed:
				return fate{kind: "blocked"}
			}
			return fate{kind: "direct"}
		}
	}
	blocked := func(int) fate { return fate{kind: "blocked"} }
	direct := func(int) fate { return fate{kind: "direct"} }
	apply := func(st State) func() error {
		return func() error { _, err := dp.Apply(ctx, st); return err }
	}
	st := func(z *jzt, pods []Pod, draining ...*jzt) State {
		s := State{Pods: pods}
		if z != nil {
			s.Ztunnel = z.spec()
		}
		for _, d := range draining {
			s.Draining = append(s.Draining, d.spec())
		}
		return s
	}
	var steps []step
	add := func(name string, do func() error, want func(int) fate, pods []Pod) {
		steps = append(steps, step{name: name, do: do, want: want, pods: pods})
	}
	// kill makes the last step start with those ztunnels gone.
	kill := func(zs ...*jzt) {
		steps[len(steps)-1].event = func() {
			for _, z := range zs {
				n.kill(z)
			}
		}
	}
	// Every ztunnel pod starts (its netns and veth appear) up front; each
	// is used when its step comes.
	z0 := n.addZtunnel(0)
	z1, z2, z3, z4 := n.addZtunnel(1), n.addZtunnel(2), n.addZtunnel(3), n.addZtunnel(4)
	add("first apply", apply(st(z0, a(0, 1))), by(z0, true), a(0, 1))
	add("ztunnel A -> B (surge)", func() error { return apply(st(z1, a(0, 1), z0))() }, by(z1, true), a(0, 1))
	add("pod joins (surge)", func() error { return apply(st(z1, a(0, 1, 2), z0))() }, by(z1, true), a(0, 1, 2))
	add("pod leaves (incremental)", func() error { _, err := dp.UpdatePods(ctx, nil, []string{"uid-2"}); return err }, by(z1, true), a(0, 1))
	add("pod joins (incremental)", func() error { _, err := dp.UpdatePods(ctx, a(3), nil); return err }, by(z1, true), a(0, 1, 3))
	add("pod leaves (surge)", func() error { return apply(st(z1, a(0, 1), z0))() }, by(z1, true), a(0, 1))
	add("a third ztunnel (two slots)", func() error { return apply(st(z2, a(0, 1), z1, z0))() }, by(z2, true), a(0, 1))
	add("old ztunnels gone", apply(st(z2, a(0, 1))), by(z2, true), a(0, 1))
	kill(z0, z1)
	add("ztunnel -> none (closed, gone)", apply(st(nil, a(0, 1))), blocked, a(0, 1))
	kill(z2)
	add("pod joins, no ztunnel", apply(st(nil, a(0, 1, 2))), blocked, a(0, 1, 2))
	add("pod leaves, no ztunnel", apply(st(nil, a(0, 1))), blocked, a(0, 1))
	add("fail closed -> open", func() error { restart(FailOpen); return apply(st(nil, a(0, 1)))() }, direct, a(0, 1))
	add("fail open -> closed", func() error { restart(FailClosed); return apply(st(nil, a(0, 1)))() }, blocked, a(0, 1))
	add("none -> ztunnel", func() error { return apply(st(z3, a(0, 1)))() }, by(z3, true), a(0, 1))
	add("fail-open agent adopts", func() error { restart(FailOpen); return apply(st(z3, a(0, 1)))() }, by(z3, false), a(0, 1))
	add("ztunnel -> none (open, still running)", apply(st(nil, a(0, 1))), direct, a(0, 1))
	add("none -> ztunnel (open)", func() error { return apply(st(z3, a(0, 1)))() }, by(z3, false), a(0, 1))
	add("fail-closed agent adopts", func() error { restart(FailClosed); return apply(st(z3, a(0, 1)))() }, by(z3, true), a(0, 1))
	add("ztunnel -> none (closed, still running)", apply(st(nil, a(0, 1))), blocked, a(0, 1))
	add("none -> ztunnel again", func() error { return apply(st(z3, a(0, 1)))() }, by(z3, true), a(0, 1))
	add("cleanup", func() error { _, err := dp.Cleanup(ctx); return err }, direct, a(0, 1))
	add("apply after cleanup", func() error { return apply(st(z3, a(0, 1)))() }, by(z3, true), a(0, 1))
	add("ztunnel replaced without a surge", func() error { return apply(st(z4, a(0, 1)))() }, by(z4, true), a(0, 1))
	add("replaced one gone", apply(st(z4, a(0, 1))), by(z4, true), a(0, 1))
	kill(z3)
	return steps
}

func runMatrix(t *testing.T, v4, v6 bool, onEnroll OnEnroll, backend Backend, swap [2]string) *matrixRun {
	n := newJNode(t, v4, v6)
	n.backend = backend
	n.swap = swap
	m := &matrixRun{n: n}
	m.run(t, matrix(n, onEnroll))
	return m
}

var journalCases = []struct {
	name     string
	v4, v6   bool
	onEnroll OnEnroll
	backend  Backend
}{
	{"ipv4", true, false, OnEnrollKeep, BackendIPTables},
	{"ipv6", false, true, OnEnrollKeep, BackendIPTables},
	{"dual-stack", true, true, OnEnrollKeep, BackendIPTables},
	{"dual-stack on-enroll=reset", true, true, OnEnrollReset, BackendIPTables},
	{"nftables ipv4", true, false, OnEnrollKeep, BackendNFTables},
	{"nftables ipv6", false, true, OnEnrollKeep, BackendNFTables},
	{"nftables dual-stack", true, true, OnEnrollKeep, BackendNFTables},
	{"nftables dual-stack on-enroll=reset", true, true, OnEnrollReset, BackendNFTables},
}

// TestJournalTransitionsNeverLeak replays the transition matrix on the fake
// kernel and checks, after every write it journals, that no ambient pod's
// new connection escapes capture, stalls or reaches a ztunnel that is
// gone, in either direction.
func TestJournalTransitionsNeverLeak(t *testing.T) {
	for _, c := range journalCases {
		t.Run(c.name, func(t *testing.T) {
			m := runMatrix(t, c.v4, c.v6, c.onEnroll, c.backend, [2]string{})
			if len(m.violations) > 0 {
				t.Fatalf("%d violations in %d writes:\n%s", len(m.violations), m.entries, strings.Join(first(m.violations, 30), "\n"))
			}
			if m.entries < 100 {
				t.Fatalf("only %d writes journalled: the matrix did not run", m.entries)
			}
			t.Logf("%d writes, each checked", m.entries)
		})
	}
}

// TestJournalCatchesSwappedPhases: pointing the tunnels at a new ztunnel
// before its netns and routes are ready (a swapped pair of make phases),
// or writing the final rules (REJECTs gone) before the reach routes exist,
// must show up as a stalled or escaping connection.
func TestJournalCatchesSwappedPhases(t *testing.T) {
	for _, c := range []struct {
		swap    [2]string
		backend Backend
	}{
		{[2]string{phaseZtunnelNS, phaseTunnels}, BackendIPTables},
		{[2]string{phaseClassify, phaseFinalRules}, BackendIPTables},
		{[2]string{phaseZtunnelNS, phaseTunnels}, BackendNFTables},
		{[2]string{phaseClassify, phaseFinalRules}, BackendNFTables},
	} {
		swap := c.swap
		t.Run(string(c.backend)+" "+swap[0]+" <-> "+swap[1], func(t *testing.T) {
			m := runMatrix(t, true, true, OnEnrollKeep, c.backend, swap)
			// Caught between two writes, not only once they are all done.
			var mid []string
			for _, v := range m.violations {
				if strings.Contains(v, ": after #") {
					mid = append(mid, v)
				}
			}
			if len(mid) == 0 {
				t.Fatalf("swapping %q and %q went unnoticed in %d writes (%d steady-state violations)", swap[0], swap[1], m.entries, len(m.violations))
			}
			t.Logf("%d violations between writes, e.g.:\n%s", len(mid), strings.Join(first(mid, 4), "\n"))
		})
	}
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... and %d more", len(s)-n))
	}
	return s
}
