// Command ambient-redirect is the node agent: it steers the TCP traffic of
// this node's ambient pods through the node's ztunnel.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/zapr"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/ambient-redirect/ambient-redirect/controller"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/selection"
)

const usage = `usage: ambient-redirect <command> [flags]

commands:
  run       run the node agent (see: ambient-redirect run -h)
  cleanup   remove everything the agent owns on this node and in the ztunnel netns, then the
            redirection annotation of this node's pods (takes run's flags), then exit
  status    summarise a running agent's /debug/state (exit 1 when not converged)
  version   print the version
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "cleanup":
		return cmdCleanup(args[1:], stdout, stderr)
	case "status":
		return cmdStatus(args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "ambient-redirect", version())
		return 0
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "ambient-redirect: unknown command %q\n%s", args[0], usage)
	return 2
}

// version is the module version and VCS revision from the build info.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	return versionOf(bi)
}

func versionOf(bi *debug.BuildInfo) string {
	var rev, dirty string
	for _, s := range bi.Settings {
		switch {
		case s.Key == "vcs.revision":
			rev = s.Value
		case s.Key == "vcs.modified" && s.Value == "true":
			dirty = "+dirty"
		}
	}
	if rev == "" {
		return bi.Main.Version // built without VCS stamping (-buildvcs=false)
	}
	v := rev + dirty
	// A tagged release says so too; "(devel)" and the pseudo-version Go
	// derives from the revision itself would only repeat it.
	if m := bi.Main.Version; m != "" && m != "(devel)" && !strings.Contains(m, rev[:min(12, len(rev))]) {
		v = m + " " + v
	}
	return v
}

// parse parses flags; a bad flag is one line naming it, exit code 2.
func parse(fs *flag.FlagSet, args []string, stdout, stderr io.Writer) (int, bool) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fmt.Fprintf(stdout, "usage: ambient-redirect %s [flags]\n", fs.Name())
			fs.PrintDefaults()
			return 0, false
		}
		fmt.Fprintf(stderr, "ambient-redirect %s: %v\n", fs.Name(), err)
		return 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "ambient-redirect %s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2, false
	}
	return 0, true
}

// parseOptions parses and validates the flags of run or cleanup (cmd); a bad
// one is one line naming it, exit code 2.
func parseOptions(cmd string, args []string, stdout, stderr io.Writer) (*Options, *flag.FlagSet, int, bool) {
	o := defaultOptions()
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	o.AddFlags(fs)
	if code, ok := parse(fs, args, stdout, stderr); !ok {
		return nil, nil, code, false
	}
	if err := o.Validate(cmd == "run"); err != nil {
		fmt.Fprintf(stderr, "ambient-redirect %s: %s\n", cmd, oneLine(err))
		return nil, nil, 2, false
	}
	return o, fs, 0, true
}

func newLogger(level string) *zap.Logger {
	lvl := zapcore.InfoLevel
	_ = lvl.Set(level)
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	cfg.Sampling = nil
	log, err := cfg.Build()
	if err != nil {
		return zap.NewNop()
	}
	klog.SetLogger(zapr.NewLogger(log.Named("client-go")))
	return log
}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	if os.Getenv("GOGC") == "" {
		// A node agent's heap is small and steady: trade a little GC CPU for
		// a smaller footprint on every node (measured ~1.5 MiB RSS less at
		// 250 pods). GOGC in the environment still wins.
		debug.SetGCPercent(50)
	}
	o, fs, code, ok := parseOptions("run", args, stdout, stderr)
	if !ok {
		return code
	}
	dpCfg, _ := o.dataplaneConfig()
	sel, _ := selection.ParseSelector(o.ZtunnelSelector)
	log := newLogger(o.LogLevel).With(zap.String("node", o.NodeName))
	defer func() { _ = log.Sync() }()
	fields := []zap.Field{zap.String("version", version())}
	fs.VisitAll(func(f *flag.Flag) { fields = append(fields, zap.String(f.Name, f.Value.String())) })
	log.Info("starting", fields...)

	restCfg, err := restConfig(o.Kubeconfig)
	if err != nil {
		log.Error("kubernetes client config", zap.Error(err))
		return 1
	}
	restCfg.UserAgent = "ambient-redirect/" + o.NodeName
	restCfg.QPS, restCfg.Burst = float32(o.KubeAPIQPS), o.KubeAPIBurst
	client, err := controller.NewAPI(restCfg)
	if err != nil {
		log.Error("kubernetes client", zap.Error(err))
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	metrics := controller.NewMetrics()
	// Other agents in our way (see dataplane.WatchConflicts): not ready,
	// counted, logged; what works stays.
	conflicts := dataplane.NewConflictReport(log.Named("conflicts"))
	metrics.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ambient_redirect_conflicts",
		Help: "Rules, routes and firewall rules of other agents in the way of ours (priorities, tables, mark bits).",
	}, func() float64 { return float64(len(conflicts.Get())) }))
	// Set by the sync loop once the caches synced, read by the debug server.
	var dp atomic.Pointer[dataplane.Dataplane]
	for _, state := range []string{"programmed", "failed"} {
		metrics.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ambient_redirect_sidecar_pods", Help: "Sidecar pods whose capture rules are ours, by state (programmed: in place).",
			ConstLabels: prometheus.Labels{"state": state},
		}, func() float64 {
			d := dp.Load()
			if d == nil {
				return 0
			}
			n := 0
			for _, s := range d.Sidecars() {
				if s.InPlace == (state == "programmed") {
					n++
				}
			}
			return float64(n)
		}))
	}
	newDP := func(ctx context.Context) (controller.Dataplane, error) {
		d, err := dataplane.New(ctx, dpCfg, dataplane.Options{Logger: log.Named("dataplane")})
		if err != nil {
			return nil, err
		}
		dp.Store(d)
		go func() {
			if err := d.WatchConflicts(ctx, o.ResyncPeriod, conflicts.Set); err != nil {
				log.Warn("not watching for conflicts with other agents; the resync still refuses them", zap.Error(err))
			}
		}()
		return d, nil
	}
	ctl := controller.New(client, controller.Config{
		Selection: selection.Options{
			NodeName: o.NodeName, ExcludeNamespaces: o.excluded(),
			ZtunnelNamespace: o.ZtunnelNamespace, ZtunnelSelector: sel, SidecarCapture: o.SidecarCapture,
		},
		ResyncPeriod:   o.ResyncPeriod,
		WaitForZtunnel: o.FailMode == string(dataplane.FailClosed),
		ServiceCIDRs:   o.ServiceCIDRs,
	}, newDP, log.Named("controller"), metrics.Hooks())

	var srv *controller.DebugServer
	if o.DebugAddr != "" {
		srv = controller.NewDebugServer(o.DebugAddr, ctl, func() controller.DataplaneInfo {
			if d := dp.Load(); d != nil {
				return d
			}
			return nil
		}, metrics, configView(o), log.Named("debug"))
		if err := srv.Start(ctx); err != nil {
			log.Error("debug server", zap.Error(err))
			return 1
		}
	}
	pluginHealthy, err := serveCNI(ctx, o, ctl, restCfg, log.Named("cni"))
	if err != nil {
		log.Error("CNI plugin", zap.Error(err))
		return 1
	}
	if pluginHealthy != nil && srv != nil {
		srv.AddReadyCheck("cniPlugin", pluginHealthy)
	}
	if srv != nil {
		srv.AddReadyCheck("conflicts", conflicts.Err)
	}
	if err := ctl.Run(ctx); err != nil {
		log.Error("agent stopped", zap.Error(err))
		return 1
	}
	// On SIGTERM the kernel state stays: ambient pods keep flowing through
	// ztunnel across agent restarts and upgrades; the next agent adopts it
	// without writes. `ambient-redirect cleanup` removes it.
	log.Info("stopping: dataplane left in place, traffic keeps flowing through ztunnel")
	return 0
}

func configView(o *Options) map[string]any {
	m, p, t := o.Marks, o.Priorities, o.Tables
	hex := func(v uint32) string { return fmt.Sprintf("%#x", v) }
	return map[string]any{
		"marks": map[string]string{"outbound": hex(m.Outbound), "skip": hex(m.Skip), "connSkip": hex(m.ConnSkip), "proxy": hex(m.Proxy),
			"proxyReturn": hex(m.ProxyReturn), "slot": hex(m.Slot), "ztunnelTProxy": hex(m.TProxy), "ztunnelOrigSrc": hex(m.OrigSrc), "ztunnelMask": hex(m.ZtunnelMask)},
		"rulePriorities": map[string]int{"proxyReturnSlot1": p.ProxyReturn2, "skip": p.Skip, "outbound": p.Outbound, "proxyReturn": p.ProxyReturn,
			"inbound": p.Inbound, "ztunnelTProxy": p.ZtunnelTProxy, "ztunnelOrigSrc": p.ZtunnelOrigSrc},
		"routeTables": map[string]int{"inbound": t.Inbound, "outbound": t.Outbound, "proxyReturn": t.ProxyReturn, "proxyReturnSlot1": t.ProxyReturn2,
			"ztunnelLocal": t.ZtunnelLocal},
		"nodeName": o.NodeName, "ztunnelNamespace": o.ZtunnelNamespace, "ztunnelSelector": o.ZtunnelSelector,
		"excludeNamespaces": o.excluded(), "tunnel": o.Tunnel, "tunnelPort": o.TunnelPort, "failMode": o.FailMode,
		"iptablesMode": o.IPTablesMode, "backend": o.Backend, "netnsDir": o.NetNSDir, "resyncPeriod": o.ResyncPeriod.String(),
		"debugAddr": o.DebugAddr, "dnsCapture": o.DNSCapture, "onEnroll": o.OnEnroll,
		"cniSocket": o.CNISocket, "cniInstall": o.CNIInstall, "cniBinDir": o.CNIBinDir, "cniConfDir": o.CNIConfDir,
		"serviceCIDR": []netip.Prefix(o.ServiceCIDRs),
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		return rest.InClusterConfig()
	}
	return clientcmd.BuildConfigFromFlags("", kubeconfig)
}

func cmdCleanup(args []string, stdout, stderr io.Writer) int {
	// run's flags, so one argument list serves both; most are ignored here.
	o, _, code, ok := parseOptions("cleanup", args, stdout, stderr)
	if !ok {
		return code
	}
	cfg, _ := o.dataplaneConfig()
	// The tunnel type does not matter for removal; vxlan avoids the probe.
	cfg.Tunnel = dataplane.TunnelVXLAN
	log := newLogger(o.LogLevel)
	defer func() { _ = log.Sync() }()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dp, err := dataplane.New(ctx, cfg, dataplane.Options{Logger: log.Named("dataplane"), SkipConflictCheck: true})
	if err != nil {
		log.Error("cleanup", zap.Error(err))
		return 1
	}
	defer dp.Close()
	// The plugin first: no new sandbox may wait for an agent that is going.
	if err := uninstallCNI(o, log); err != nil {
		log.Error("uninstall the CNI plugin", zap.Error(err))
		return 1
	}
	res, err := dp.Cleanup(ctx)
	if err != nil {
		// Pods keep the annotation while the kernel may still redirect them.
		log.Error("cleanup incomplete", zap.Error(err), zap.Any("writes", res.Writes))
		return 1
	}
	sidecars, scRes, err := dp.CleanupSidecars(ctx, o.RemoveSidecarRules)
	switch {
	case err != nil:
		log.Error("cleanup of sidecar pods' rules incomplete", zap.Error(err), zap.Any("writes", scRes.Writes))
		return 1
	case o.RemoveSidecarRules:
		fmt.Fprintf(stdout, "removed the capture rules of %d sidecar pods (%d kernel writes)\n", sidecars, scRes.TotalWrites())
	case sidecars > 0:
		fmt.Fprintf(stdout, "left the capture rules of %d running sidecar pods in place: removing them takes those pods out of their mesh (--remove-sidecar-rules removes them)\n", sidecars)
	}
	// Annotations go only after the kernel no longer redirects, and their
	// failure does not fail the cleanup: the node is what must be clean.
	removed, err := removeAnnotations(o)
	if err != nil {
		fmt.Fprintf(stderr, "ambient-redirect cleanup: warning: the %s=%s annotations were left on this node's pods: %s\n",
			selection.RedirectionAnno, selection.RedirectionEnabled, oneLine(err))
		fmt.Fprintf(stdout, "cleanup done: %d kernel writes\n", res.TotalWrites())
		return 0
	}
	fmt.Fprintf(stdout, "cleanup done: %d kernel writes; removed the redirection annotation from %d pods\n", res.TotalWrites(), removed)
	return 0
}

// removeAnnotations removes the redirection annotation from this node's
// pods, bounded in time so an unreachable API server cannot hold up an
// uninstall.
func removeAnnotations(o *Options) (int, error) {
	if o.NodeName == "" {
		return 0, errors.New("no --node-name (or env NODE_NAME)")
	}
	restCfg, err := restConfig(o.Kubeconfig)
	if errors.Is(err, rest.ErrNotInCluster) {
		return 0, errors.New("no API access (no --kubeconfig and not in a cluster)")
	}
	if err != nil {
		return 0, fmt.Errorf("kubernetes client config: %w", err)
	}
	restCfg.UserAgent = "ambient-redirect-cleanup/" + o.NodeName
	restCfg.QPS, restCfg.Burst = float32(o.KubeAPIQPS), o.KubeAPIBurst
	restCfg.Timeout = 5 * time.Second // per request
	client, err := controller.NewAPI(restCfg)
	if err != nil {
		return 0, fmt.Errorf("kubernetes client: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := controller.RemoveAnnotations(ctx, client, o.NodeName)
	if err != nil && n > 0 {
		err = fmt.Errorf("removed from %d pods only: %w", n, err)
	}
	return n, err
}

// oneLine joins a multi-error into one line.
func oneLine(err error) string {
	s := err.Error()
	out := []rune{}
	for _, r := range s {
		if r == '\n' {
			out = append(out, ';', ' ')
			continue
		}
		out = append(out, r)
	}
	return string(out)
}
