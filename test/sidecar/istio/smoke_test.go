//go:build linux

package istio

import (
	"strings"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/sidecartest"
)

// TestSmoke builds istio-iptables and runs it with the injector's default
// arguments, dual-stack, in a fresh netns: the ISTIO_* chains exist in both
// families, ::6 is on lo, and a second run (pinned to nft) changes nothing. Structure only;
// behaviour is compared elsewhere, with real sockets.
func TestSmoke(t *testing.T) {
	netnstest.RequireRoot(t)
	Build(t) // skip before making anything when it cannot be built
	ns := sidecartest.NewNetns(t)
	// istio-iptables refuses a netns without a non-loopback address.
	netnstest.Exec(t, ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1") // no dummy module here
	netnstest.Exec(t, ns, "ip", "addr", "add", "10.99.0.2/24", "dev", "eth0")
	netnstest.Exec(t, ns, "ip", "addr", "add", "fd99::2/64", "dev", "eth0", "nodad")
	netnstest.Exec(t, ns, "ip", "link", "set", "eth0", "up")

	env := []string{"ISTIO_DUAL_STACK=true"}
	if out, err := RunEnv(t, netnstest.NsPath(ns), env, ArgsFor(nil)...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := []string{":ISTIO_INBOUND", ":ISTIO_IN_REDIRECT", ":ISTIO_OUTPUT", ":ISTIO_REDIRECT",
		"-A PREROUTING -p tcp -j ISTIO_INBOUND", "-A OUTPUT -j ISTIO_OUTPUT",
		"--to-ports 15001", "--to-ports 15006", "--uid-owner 1337", "--gid-owner 1337"}
	saves := map[string]string{}
	for _, save := range []string{"iptables-nft-save", "ip6tables-nft-save"} {
		out := netnstest.Exec(t, ns, save, "-t", "nat")
		saves[save] = out
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s lacks %q:\n%s", save, w, out)
			}
		}
	}
	if !strings.Contains(saves["iptables-nft-save"], "-s 127.0.0.6/32") || !strings.Contains(saves["ip6tables-nft-save"], "-s ::6/128") {
		t.Errorf("no inbound passthrough exemption:\n%s\n%s", saves["iptables-nft-save"], saves["ip6tables-nft-save"])
	}
	if out := netnstest.Exec(t, ns, "ip", "-6", "addr", "show", "dev", "lo"); !strings.Contains(out, "::6/128") {
		t.Errorf("::6 not on lo:\n%s", out)
	}
	if out := netnstest.Exec(t, ns, "iptables-legacy-save"); strings.Contains(out, "ISTIO") {
		t.Errorf("legacy rules written:\n%s", out)
	}

	// Its probe of iptables-legacy (add and delete a rule in filter) left
	// an empty legacy filter table, which a second run without
	// --force-iptables-binary takes for "legacy rules exist": it would
	// write a second rule set with iptables-legacy.
	before := netnstest.Dump(t, ns)
	if out, err := RunEnv(t, netnstest.NsPath(ns), env, append(ArgsFor(nil), "--force-iptables-binary", "nft")...); err != nil {
		t.Fatalf("second run: %v\n%s", err, out)
	}
	if after := netnstest.Dump(t, ns); after != before {
		t.Errorf("second run changed the netns:\n%s", netnstest.LineDiff(before, after))
	}
}
