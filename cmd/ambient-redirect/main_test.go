package main

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/coexist"
)

func TestBadFlagsAreOneLineExit2(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"run", "--node-name", "n", "--tunnel", "gre"}, "tunnel"},
		{[]string{"run", "--node-name", "n", "--fail-mode", "maybe"}, "fail-mode"},
		{[]string{"run", "--node-name", "n", "--iptables-mode", "ebpf"}, "iptables-mode"},
		{[]string{"run", "--node-name", "n", "--resync-period", "soon"}, "resync-period"},
		{[]string{"run", "--node-name", "n", "--resync-period", "10ms"}, "resync-period"},
		{[]string{"run", "--node-name", "n", "--debug-addr", "nowhere"}, "debug-addr"},
		{[]string{"run", "--node-name", "n", "--ztunnel-selector", "a in (("}, "ztunnel-selector"},
		{[]string{"run", "--node-name", "n", "--kubeconfig", "/does/not/exist"}, "kubeconfig"},
		{[]string{"run", "--node-name", "n", "--netns-dir", "/does/not/exist"}, "netns-dir"},
		{[]string{"run", "--node-name", "n", "--tunnel-port", "70000"}, "tunnel-port"},
		{[]string{"run", "--node-name", ""}, "node-name"},
		{[]string{"run", "--no-such-flag"}, "no-such-flag"},
		{[]string{"cleanup", "--iptables-mode", "x"}, "iptables-mode"},
		{[]string{"status", "--debug-addr", "x"}, "debug-addr"},
		{[]string{"run", "--node-name", "Bad_Name"}, "node-name"},
		{[]string{"run", "--node-name", "n", "--ztunnel-namespace", "a b"}, "a b"},
		{[]string{"run", "--node-name", "n", "--exclude-namespaces", "ok,Not_OK"}, "Not_OK"},
		{[]string{"run", "--node-name", "n", "--kube-api-qps", "NaN"}, "kube-api-qps"},
		{[]string{"run", "--node-name", "n", "--kube-api-burst", "0"}, "kube-api-burst"},
		{[]string{"cleanup", "--netns-dir", "/does/not/exist"}, "netns-dir"},
		{[]string{"status", "--timeout", "0s"}, "timeout"},
		{[]string{"frobnicate"}, "frobnicate"},
		{[]string{"run", "--node-name", "n", "--mark-outbound", "0x300"}, "mark-outbound"},
		{[]string{"run", "--node-name", "n", "--mark-skip", "zz"}, "mark-skip"},
		{[]string{"run", "--node-name", "n", "--mark-slot", "0x100"}, "mark-slot"},
		{[]string{"run", "--node-name", "n", "--rule-priority-skip", "105"}, "rule-priority-skip"},
		{[]string{"run", "--node-name", "n", "--route-table-outbound", "100"}, "route-table-outbound"},
		{[]string{"run", "--node-name", "n", "--mark-slot", "0x100", "--rule-priority-skip", "105", "--route-table-outbound", "100"}, "route-table-outbound"},
		{[]string{"cleanup", "--rule-priority-inbound", "0"}, "rule-priority"},
		{[]string{"run", "--node-name", "n", "--service-cidr", "10.96.0.0/12,10.97.0.0/33"}, "service-cidr"},
		{[]string{"run", "--node-name", "n", "--service-cidr", "10.96.0.0/12", "--service-cidr", "10.96.0.1"}, `"10.96.0.1" is not a CIDR`},
	}
	for _, c := range cases {
		t.Setenv("NODE_NAME", "")
		var out, errb bytes.Buffer
		code := run(c.args, &out, &errb)
		msg := errb.String()
		if code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", c.args, code, msg)
		}
		if !strings.Contains(msg, c.want) {
			t.Errorf("%v: error %q does not name %q", c.args, msg, c.want)
		}
		if c.args[0] != "frobnicate" && strings.Count(strings.TrimSpace(msg), "\n") != 0 {
			t.Errorf("%v: error is not one line: %q", c.args, msg)
		}
	}
}

func TestNodeNameFromEnv(t *testing.T) {
	t.Setenv("NODE_NAME", "from-env")
	if o := defaultOptions(); o.NodeName != "from-env" {
		t.Fatalf("NodeName %q", o.NodeName)
	}
}

func TestVersionAndHelp(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "ambient-redirect ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"run", "-h"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "--fail-mode") && !strings.Contains(out.String(), "-fail-mode") {
		t.Fatalf("run -h: %d %q", code, out.String())
	}
}

// runArgs is an argument list for run with every flag set, as a DaemonSet
// would pass it.
func runArgs(t *testing.T) []string {
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kc, []byte("apiVersion: v1\nkind: Config\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--node-name", "node-1", "--kubeconfig", kc, "--netns-dir", t.TempDir(),
		"--resync-period", "2s", "--debug-addr", "127.0.0.1:15099", "--fail-mode", "closed",
		"--ztunnel-namespace", "istio-system", "--ztunnel-selector", "app=ztunnel", "--exclude-namespaces", "kube-system,other",
		"--tunnel", "vxlan", "--tunnel-port", "4789", "--iptables-mode", "auto", "--dns-capture",
		"--kube-api-qps", "5", "--kube-api-burst", "10", "--log-level", "debug", "--service-cidr", "10.96.0.0/16"}
}

func TestCleanupTakesRunArgs(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	args := runArgs(t)
	var out, errb bytes.Buffer
	if _, _, code, ok := parseOptions("run", args, &out, &errb); !ok {
		t.Fatalf("run: exit %d: %s", code, errb.String())
	}
	o, _, code, ok := parseOptions("cleanup", args, &out, &errb)
	if !ok {
		t.Fatalf("cleanup: exit %d: %s", code, errb.String())
	}
	if o.NodeName != "node-1" || o.Kubeconfig != args[3] || o.NetNSDir != args[5] || o.LogLevel != "debug" {
		t.Fatalf("cleanup options %+v", o)
	}
	// Without a node name cleanup still runs (the annotations are then left).
	if o, _, code, ok := parseOptions("cleanup", args[2:], &out, &errb); !ok || o.NodeName != "" {
		t.Fatalf("cleanup without --node-name: exit %d: %s", code, errb.String())
	}
}

func TestCleanupNodeNameFromEnv(t *testing.T) {
	t.Setenv("NODE_NAME", "from-env")
	var out, errb bytes.Buffer
	o, _, code, ok := parseOptions("cleanup", []string{"--netns-dir", t.TempDir()}, &out, &errb)
	if !ok || o.NodeName != "from-env" {
		t.Fatalf("exit %d, options %+v: %s", code, o, errb.String())
	}
	// A bad one is refused before anything is touched.
	t.Setenv("NODE_NAME", "Bad_Name")
	errb.Reset()
	if code := run([]string{"cleanup", "--netns-dir", t.TempDir()}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "node-name") {
		t.Fatalf("exit %d: %q", code, errb.String())
	}
}

// TestCleanupBadValues: cleanup given run's whole argument list with one bad
// value exits 2 with one line naming the flag, before touching the kernel
// (the full list also proves no flag of run is "not defined" for cleanup).
func TestCleanupBadValues(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	for flagName, bad := range map[string]string{
		"node-name": "Bad_Name", "kubeconfig": "/does/not/exist", "netns-dir": "/does/not/exist",
		"resync-period": "10ms", "debug-addr": "nowhere", "fail-mode": "maybe", "tunnel": "gre",
		"tunnel-port": "70000", "ztunnel-selector": "a in ((", "kube-api-qps": "NaN", "iptables-mode": "ebpf",
		"service-cidr": "10.96.0.0/33",
	} {
		args := append([]string{"cleanup"}, runArgs(t)...)
		for i := range args {
			if args[i] == "--"+flagName {
				args[i+1] = bad
			}
		}
		var out, errb bytes.Buffer
		code := run(args, &out, &errb)
		msg := strings.TrimSpace(errb.String())
		if code != 2 || !strings.Contains(msg, flagName) || strings.Contains(msg, "\n") || out.Len() != 0 {
			t.Errorf("--%s %s: exit %d, stderr %q, stdout %q", flagName, bad, code, msg, out.String())
		}
	}
}

// TestRemoveAnnotationsWithoutAPI: each way of lacking API access is an
// error saying why (cleanup turns it into a warning), and an unreachable
// server does not hold cleanup up.
func TestRemoveAnnotationsWithoutAPI(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	unreachable := filepath.Join(t.TempDir(), "kubeconfig")
	kc := "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n" +
		"users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
	if err := os.WriteFile(unreachable, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		node, kubeconfig, want string
	}{
		{"", unreachable, "node-name"},
		{"n1", "", "no API access"},
		{"n1", unreachable, "127.0.0.1:1"},
	} {
		o := defaultOptions()
		o.NodeName, o.Kubeconfig = c.node, c.kubeconfig
		start := time.Now()
		n, err := removeAnnotations(o)
		if err == nil || n != 0 || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %d, %v", c, n, err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("%+v: took %s", c, d)
		}
	}
}

func TestVersionShowsRevision(t *testing.T) {
	const rev = "96aa559c781e4501591ce0b4a3b8cbb144a963c3"
	for _, c := range []struct{ main, modified, want string }{
		{"(devel)", "true", rev + "+dirty"},
		{"(devel)", "false", rev},
		{"v0.0.0-20261122140942-96aa559c781e+dirty", "true", rev + "+dirty"},
		{"v1.2.0", "false", "v1.2.0 " + rev},
	} {
		bi := &debug.BuildInfo{Main: debug.Module{Version: c.main}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: c.modified}}}
		if v := versionOf(bi); v != c.want {
			t.Errorf("version of %s (modified %s): %q, want %q", c.main, c.modified, v, c.want)
		}
	}
}

// The README's documented settings parse to the ones the coexistence
// tests run with.
func TestCoexistArgs(t *testing.T) {
	o := defaultOptions()
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse(coexist.Args); err != nil {
		t.Fatal(err)
	}
	got, err := o.dataplaneConfig()
	if err != nil {
		t.Fatal(err)
	}
	want := dataplane.DefaultConfig()
	coexist.Settings(&want)
	if got.Marks != want.Marks || got.Priorities != want.Priorities || got.Tables != want.Tables {
		t.Fatalf("flags give %+v %+v %+v, want %+v %+v %+v", got.Marks, got.Priorities, got.Tables, want.Marks, want.Priorities, want.Tables)
	}
	if v := configView(o)["marks"].(map[string]string)["outbound"]; v != "0x10" {
		t.Fatalf("debug config shows outbound mark %q", v)
	}
}

// TestServiceCIDRFlag: --service-cidr takes comma-separated lists and
// repeats, masks each prefix, and names the flag and the value it refuses.
func TestServiceCIDRFlag(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	args := append(runArgs(t), "--service-cidr", " 10.96.0.1/12, fd00:10:96::1/112,", "--service-cidr", "192.168.0.0/24")
	var out, errb bytes.Buffer
	o, _, code, ok := parseOptions("run", args, &out, &errb)
	if !ok {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var got []string
	for _, p := range o.ServiceCIDRs {
		got = append(got, p.String())
	}
	// runArgs gives 10.96.0.0/16 first.
	want := []string{"10.96.0.0/16", "10.96.0.0/12", "fd00:10:96::/112", "192.168.0.0/24"}
	if !slices.Equal(got, want) {
		t.Fatalf("--service-cidr gives %v, want %v", got, want)
	}
	if v := configView(o)["serviceCIDR"].([]netip.Prefix); len(v) != len(want) {
		t.Fatalf("debug config shows %v", v)
	}
	if o := defaultOptions(); len(o.ServiceCIDRs) != 0 {
		t.Fatalf("default %v, want none", o.ServiceCIDRs)
	}
	errb.Reset()
	code = run(append([]string{"run"}, append(runArgs(t), "--service-cidr", "10.96.0.0/12,10.0.0.0/40")...), &out, &errb)
	if msg := errb.String(); code != 2 || !strings.Contains(msg, "-service-cidr") || !strings.Contains(msg, `"10.0.0.0/40"`) {
		t.Fatalf("exit %d: %q", code, msg)
	}
}
