package main

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
)

// choice is a flag limited to fixed values, so a bad value fails at parse
// time with the flag's name.
type choice struct {
	value   *string
	allowed []string
}

func (c choice) String() string {
	if c.value == nil {
		return ""
	}
	return *c.value
}

func (c choice) Set(v string) error {
	for _, a := range c.allowed {
		if v == a {
			*c.value = v
			return nil
		}
	}
	return fmt.Errorf("must be one of %s", strings.Join(c.allowed, ", "))
}

// Options are the flags of run and cleanup (cleanup ignores most).
type Options struct {
	NodeName          string
	Kubeconfig        string
	ZtunnelNamespace  string
	ZtunnelSelector   string
	ExcludeNamespaces string
	Tunnel            string
	TunnelPort        int
	FailMode          string
	OnEnroll          string
	IPTablesMode      string
	Backend           string
	NetNSDir          string
	ResyncPeriod      time.Duration
	DebugAddr         string
	DNSCapture        bool
	// SidecarCapture writes sidecar pods' capture rules; RemoveSidecarRules
	// makes cleanup remove them too.
	SidecarCapture     bool
	RemoveSidecarRules bool
	LogLevel           string
	KubeAPIQPS         float64
	KubeAPIBurst       int
	CNISocket          string
	CNIInstall         bool
	CNIBinDir          string
	CNIConfDir         string
	CNIHostConfDir     string
	CNIPluginBinary    string
	// ServiceCIDRs (--service-cidr) are added to the cluster's ServiceCIDR
	// objects' ranges, or are all there is where those are not served.
	ServiceCIDRs prefixList
	// Marks, Priorities and Tables move ours out of other agents' way.
	Marks      dataplane.Marks
	Priorities dataplane.Priorities
	Tables     dataplane.Tables
}

// markFlag is a packet mark, hex (0x...) or decimal.
type markFlag struct{ v *uint32 }

func (m markFlag) String() string {
	if m.v == nil {
		return ""
	}
	return fmt.Sprintf("%#x", *m.v)
}

func (m markFlag) Set(s string) error {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return fmt.Errorf("%q is not a 32-bit mark (hex 0x... or decimal)", s)
	}
	*m.v = uint32(v)
	return nil
}

// prefixList is a list of CIDRs, comma-separated and/or repeated, each
// masked (10.96.0.1/12 is 10.96.0.0/12); a bad one fails at parse time
// with the flag's name and the value.
type prefixList []netip.Prefix

func (l *prefixList) String() string {
	if l == nil {
		return ""
	}
	s := make([]string, len(*l))
	for i, p := range *l {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func (l *prefixList) Set(v string) error {
	for _, item := range strings.Split(v, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		p, err := netip.ParsePrefix(item)
		if err != nil {
			return fmt.Errorf("%q is not a CIDR (address/bits, e.g. 10.96.0.0/12 or fd00:10:96::/112)", item)
		}
		*l = append(*l, p.Masked())
	}
	return nil
}

func defaultOptions() *Options {
	def := dataplane.DefaultConfig()
	return &Options{
		NodeName:          os.Getenv("NODE_NAME"),
		ZtunnelNamespace:  "istio-system",
		ZtunnelSelector:   "app=ztunnel",
		ExcludeNamespaces: "kube-system",
		SidecarCapture:    true,
		Tunnel:            string(dataplane.TunnelAuto),
		FailMode:          string(dataplane.FailClosed),
		OnEnroll:          string(dataplane.OnEnrollKeep),
		IPTablesMode:      string(dataplane.IPTablesAuto),
		Backend:           string(dataplane.BackendAuto),
		NetNSDir:          "/var/run/netns",
		ResyncPeriod:      30 * time.Second,
		DebugAddr:         "127.0.0.1:15099",
		LogLevel:          "info",
		KubeAPIQPS:        20,
		KubeAPIBurst:      50,
		CNIBinDir:         "/opt/cni/bin",
		CNIConfDir:        "/etc/cni/net.d",
		CNIPluginBinary:   pluginBinary(),
		Marks:             def.Marks,
		Priorities:        def.Priorities,
		Tables:            def.Tables,
	}
}

// AddFlags adds the flags of run and cleanup: one argument list serves the
// DaemonSet and an uninstall Job.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.NodeName, "node-name", o.NodeName, "name of this node (env NODE_NAME)")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", o.Kubeconfig, "kubeconfig path; in-cluster config when empty")
	fs.StringVar(&o.ZtunnelNamespace, "ztunnel-namespace", o.ZtunnelNamespace, "namespace of the ztunnel pods")
	fs.StringVar(&o.ZtunnelSelector, "ztunnel-selector", o.ZtunnelSelector, "label selector of the ztunnel pods")
	fs.StringVar(&o.ExcludeNamespaces, "exclude-namespaces", o.ExcludeNamespaces, "comma-separated namespaces never enrolled")
	fs.Var(&o.ServiceCIDRs, "service-cidr", "the cluster's Service CIDRs, comma-separated or repeated: added to the ServiceCIDR objects' (networking.k8s.io/v1), or all there is where the API server does not serve them to the agent")
	fs.Var(choice{&o.Tunnel, []string{"auto", "geneve", "vxlan"}}, "tunnel", "tunnel type: auto (geneve if the kernel has it, else vxlan), geneve or vxlan")
	fs.IntVar(&o.TunnelPort, "tunnel-port", o.TunnelPort, "tunnel UDP port; 0 = 6081 for geneve, 4789 for vxlan (the next free port is used if a foreign device holds it)")
	fs.Var(choice{&o.FailMode, []string{"closed", "open"}}, "fail-mode", "with no ztunnel: closed (ambient TCP fails fast) or open (flows directly)")
	fs.Var(choice{&o.OnEnroll, []string{"keep", "reset"}}, "on-enroll", "connections a pod opened before it was captured: keep (they flow directly until they close) or reset (TCP reset at once, so nothing unmeshed remains)")
	fs.DurationVar(&o.ResyncPeriod, "resync-period", o.ResyncPeriod, "full resync (drift repair) period")
	fs.StringVar(&o.DebugAddr, "debug-addr", o.DebugAddr, "address of the debug/health/metrics server; empty disables it")
	fs.BoolVar(&o.DNSCapture, "dns-capture", o.DNSCapture, "DNAT ambient pods' UDP/53 to ztunnel's DNS proxy (port 15053)")
	fs.BoolVar(&o.SidecarCapture, "sidecar-capture", o.SidecarCapture, "write the capture rules of pods with an Istio sidecar and no istio-init init container in their own netns at CNI ADD (false: leave them to Istio)")
	fs.BoolVar(&o.RemoveSidecarRules, "remove-sidecar-rules", o.RemoveSidecarRules, "cleanup only: also remove running sidecar pods' capture rules (takes them out of their mesh)")
	fs.Float64Var(&o.KubeAPIQPS, "kube-api-qps", o.KubeAPIQPS, "client-side QPS limit towards the API server (annotation patches)")
	fs.IntVar(&o.KubeAPIBurst, "kube-api-burst", o.KubeAPIBurst, "client-side burst towards the API server")
	fs.Var(choice{&o.IPTablesMode, []string{"auto", "nft", "legacy"}}, "iptables-mode", "iptables flavour for the iptables backend: auto (detect kubelet's), nft or legacy")
	fs.Var(choice{&o.Backend, []string{"auto", "iptables", "nftables"}}, "backend", "how our rules are written: iptables, nftables (our own inet table, native sets), or auto (nftables where kube-proxy runs in nftables mode or no iptables works)")
	fs.StringVar(&o.NetNSDir, "netns-dir", o.NetNSDir, "directory of named network namespaces (where the CRI puts pod netns)")
	fs.StringVar(&o.CNISocket, "cni-socket", o.CNISocket, "unix socket the ambient-redirect CNI plugin hands pods over on (default with --cni-install: "+cni.DefaultSocket+"); empty and no --cni-install: no plugin")
	fs.BoolVar(&o.CNIInstall, "cni-install", o.CNIInstall, "install the CNI plugin (binary into --cni-bin-dir, entry at the end of the primary conflist in --cni-conf-dir); cleanup uninstalls it")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", o.CNIBinDir, "the host's CNI plugin directory (with --cni-install)")
	fs.StringVar(&o.CNIConfDir, "cni-conf-dir", o.CNIConfDir, "the host's CNI config directory (with --cni-install)")
	fs.StringVar(&o.CNIHostConfDir, "cni-host-conf-dir", o.CNIHostConfDir, "--cni-conf-dir as the host sees it, when mounted elsewhere (the plugin reads its kubeconfig there); default --cni-conf-dir")
	fs.StringVar(&o.CNIPluginBinary, "cni-plugin-binary", o.CNIPluginBinary, "the plugin binary to install (with --cni-install)")
	fs.Var(choice{&o.LogLevel, []string{"debug", "info", "warn", "error"}}, "log-level", "log level")
	o.addCoexistFlags(fs)
}

// addCoexistFlags adds a flag for every mark bit, rule priority and route
// table the agent uses, so it can keep out of other agents' way (see the
// README's tested settings for Cilium, Calico and the AWS VPC CNI).
func (o *Options) addCoexistFlags(fs *flag.FlagSet) {
	m, p, t := &o.Marks, &o.Priorities, &o.Tables
	for _, f := range []struct {
		name string
		v    *uint32
		help string
	}{
		{dataplane.FlagMarkOutbound, &m.Outbound, "mark bit of ambient pods' TCP, routed to ztunnel"},
		{dataplane.FlagMarkSkip, &m.Skip, "mark bit of traffic that bypasses capture (main table)"},
		{dataplane.FlagMarkConnSkip, &m.ConnSkip, "skip mark saved to the connection mark (the skip bit plus one of its own)"},
		{dataplane.FlagMarkProxy, &m.Proxy, "mark of ztunnel's spoofed-source traffic (the skip bit plus one of its own)"},
		{dataplane.FlagMarkProxyReturn, &m.ProxyReturn, "mark bit of replies to ztunnel's spoofed connections, routed back to ztunnel"},
		{dataplane.FlagMarkSlot, &m.Slot, "connection mark bit pinning connections to a surge rollout's second ztunnel"},
		{dataplane.FlagMarkZtunnelTProxy, &m.TProxy, "TPROXY mark inside the ztunnel netns"},
		{dataplane.FlagMarkZtunnelOrigSrc, &m.OrigSrc, "original-source reply mark inside the ztunnel netns"},
		{dataplane.FlagMarkZtunnelMask, &m.ZtunnelMask, "mask of the two ztunnel netns marks"},
	} {
		fs.Var(markFlag{f.v}, f.name, f.help+" (hex or decimal)")
	}
	for _, f := range []struct {
		name string
		v    *int
		help string
	}{
		{dataplane.FlagPriorityProxyReturnSlot1, &p.ProxyReturn2, "ip rule priority: slot-1 proxy-return (before --rule-priority-proxy-return)"},
		{dataplane.FlagPrioritySkip, &p.Skip, "ip rule priority: skip marks go to main"},
		{dataplane.FlagPriorityOutbound, &p.Outbound, "ip rule priority: outbound capture"},
		{dataplane.FlagPriorityProxyReturn, &p.ProxyReturn, "ip rule priority: proxy return"},
		{dataplane.FlagPriorityInbound, &p.Inbound, "ip rule priority: inbound capture (after all the others)"},
		{dataplane.FlagPriorityZtunnelTProxy, &p.ZtunnelTProxy, "ip rule priority inside the ztunnel netns: TPROXY"},
		{dataplane.FlagPriorityZtunnelOrigSrc, &p.ZtunnelOrigSrc, "ip rule priority inside the ztunnel netns: original-source replies"},
		{dataplane.FlagTableInbound, &t.Inbound, "route table: inbound (per-pod routes)"},
		{dataplane.FlagTableOutbound, &t.Outbound, "route table: outbound"},
		{dataplane.FlagTableProxyReturn, &t.ProxyReturn, "route table: proxy return"},
		{dataplane.FlagTableProxyReturnSlot1, &t.ProxyReturn2, "route table: slot-1 proxy return"},
		{dataplane.FlagTableZtunnelLocal, &t.ZtunnelLocal, "route table inside the ztunnel netns"},
	} {
		fs.IntVar(f.v, f.name, *f.v, f.help)
	}
}

// Validate checks the options; every problem is reported. The node name is
// required by run only (cleanup needs it for the annotations alone), but a
// given one must be valid either way.
func (o *Options) Validate(requireNode bool) error {
	var errs []error
	o.NodeName = strings.TrimSpace(o.NodeName)
	if o.NodeName == "" {
		if requireNode {
			errs = append(errs, errors.New("--node-name (or env NODE_NAME) is required"))
		}
	} else if msgs := validation.IsDNS1123Subdomain(o.NodeName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--node-name %q is not a valid node name: %s", o.NodeName, strings.Join(msgs, "; ")))
	}
	for _, ns := range append([]string{o.ZtunnelNamespace}, o.excluded()...) {
		if msgs := validation.IsDNS1123Label(ns); ns != "" && len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("namespace %q (--ztunnel-namespace/--exclude-namespaces) is not valid: %s", ns, strings.Join(msgs, "; ")))
		}
	}
	if _, err := selection.ParseSelector(o.ZtunnelSelector); err != nil || strings.TrimSpace(o.ZtunnelSelector) == "" {
		errs = append(errs, fmt.Errorf("--ztunnel-selector %q is not a non-empty label selector: %v", o.ZtunnelSelector, err))
	}
	if o.ZtunnelNamespace == "" {
		errs = append(errs, errors.New("--ztunnel-namespace must not be empty"))
	}
	if o.ResyncPeriod < time.Second {
		errs = append(errs, fmt.Errorf("--resync-period %s must be at least 1s", o.ResyncPeriod))
	}
	if !(o.KubeAPIQPS > 0) || math.IsInf(o.KubeAPIQPS, 0) || o.KubeAPIBurst <= 0 {
		errs = append(errs, fmt.Errorf("--kube-api-qps %g and --kube-api-burst %d must be positive", o.KubeAPIQPS, o.KubeAPIBurst))
	}
	if o.TunnelPort < 0 || o.TunnelPort > 65535 {
		errs = append(errs, fmt.Errorf("--tunnel-port %d out of range", o.TunnelPort))
	}
	if o.CNISocket != "" && !filepath.IsAbs(o.CNISocket) {
		errs = append(errs, fmt.Errorf("--cni-socket %q must be an absolute path", o.CNISocket))
	}
	if o.CNIInstall {
		if o.CNISocket == "" {
			o.CNISocket = cni.DefaultSocket
		}
		for _, d := range []string{o.CNIBinDir, o.CNIConfDir, o.CNIPluginBinary} {
			if !filepath.IsAbs(d) {
				errs = append(errs, fmt.Errorf("--cni-bin-dir, --cni-conf-dir and --cni-plugin-binary must be absolute paths (%q)", d))
			}
		}
	}
	if o.DebugAddr != "" {
		if err := validHostPort(o.DebugAddr); err != nil {
			errs = append(errs, fmt.Errorf("--debug-addr %q: %v", o.DebugAddr, err))
		}
	}
	if o.Kubeconfig != "" {
		if _, err := os.Stat(o.Kubeconfig); err != nil {
			errs = append(errs, fmt.Errorf("--kubeconfig: %v", err))
		}
	}
	if err := o.checkNetNSDir(); err != nil {
		errs = append(errs, err)
	}
	if _, err := o.dataplaneConfig(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (o *Options) checkNetNSDir() error {
	if st, err := os.Stat(o.NetNSDir); err != nil || !st.IsDir() {
		return fmt.Errorf("--netns-dir %q is not a directory", o.NetNSDir)
	}
	return nil
}

func validHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return fmt.Errorf("host %q is not an IP address", host)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("port %q is not a number in 0..65535", port)
	}
	return nil
}

func (o *Options) excluded() []string {
	var out []string
	for _, n := range strings.Split(o.ExcludeNamespaces, ",") {
		if n = strings.TrimSpace(n); n != "" {
			out = append(out, n)
		}
	}
	return out
}

func (o *Options) dataplaneConfig() (dataplane.Config, error) {
	c := dataplane.DefaultConfig()
	c.Tunnel = dataplane.TunnelType(o.Tunnel)
	c.TunnelPort = o.TunnelPort
	c.FailMode = dataplane.FailMode(o.FailMode)
	c.OnEnroll = dataplane.OnEnroll(o.OnEnroll)
	c.IPTablesMode = dataplane.IPTablesMode(o.IPTablesMode)
	c.Backend = dataplane.Backend(o.Backend)
	c.NetNSDir = o.NetNSDir
	c.DNSCapture = o.DNSCapture
	c.Marks, c.Priorities, c.Tables = o.Marks, o.Priorities, o.Tables
	return c, c.Validate()
}
