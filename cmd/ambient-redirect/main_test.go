package main

import (
	"bytes"
	"strings"
	"testing"
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
