package sidecar_test

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/controller/desired"
	"github.com/ambient-redirect/ambient-redirect/dataplane"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/istio"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/sidecartest"
)

// The pod and its peer (a client, and the upstream the app calls) on one
// veth, and the ports the probes use.
const (
	podIP, peerIP            = "10.77.0.2", "10.77.0.1"
	podIP6, peerIP6          = "fd77::2", "fd77::1"
	appPort, exclOut, exclIn = 8080, 9901, 9902
	healthPort               = 15021
)

var proxyBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		if os.Geteuid() != 0 {
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "ar-sidecar-cmp")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if proxyBin, err = sidecartest.BuildProxy(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return m.Run()
	}())
}

// engine writes a sidecar pod's rules into the netns at path; dual and
// dns say the proxy's environment has ISTIO_DUAL_STACK=true and
// ISTIO_META_DNS_CAPTURE=true.
type engine func(t *testing.T, path string, annos map[string]string, dual, dns bool)

func ours(t *testing.T, path string, annos map[string]string, dual, dns bool) {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", Annotations: annos}}
	ips := []netip.Addr{netip.MustParseAddr(podIP)}
	proxy := corev1.Container{Name: desired.ProxyContainer}
	if dual {
		proxy.Env = append(proxy.Env, corev1.EnvVar{Name: desired.EnvDualStack, Value: "true"})
		ips = append(ips, netip.MustParseAddr(podIP6))
	}
	if dns {
		proxy.Env = append(proxy.Env, corev1.EnvVar{Name: desired.EnvDNSCapture, Value: "true"})
	}
	p.Spec.Containers = []corev1.Container{proxy}
	c, err := desired.SidecarCaptureOf(p)
	if err != nil {
		t.Fatal(err)
	}
	s := dataplane.Sidecar{UID: "uid", Name: "apps/web", IPs: ips, Capture: c}
	if _, err := dataplane.ProgramSidecar(context.Background(), dataplane.DefaultConfig(), path, s); err != nil {
		t.Fatal(err)
	}
}

func istioEngine(t *testing.T, path string, annos map[string]string, dual, dns bool) {
	var env []string
	if dual {
		env = []string{"ISTIO_DUAL_STACK=true"}
	}
	args := istio.ArgsFor(annos)
	if dns {
		// What istio-agent asks for with DNS capture on, for every server
		// (we capture all UDP/TCP 53 of the app).
		args = append(args, "--redirect-dns", "--capture-all-dns")
	}
	if out, err := istio.RunEnv(t, path, env, args...); err != nil {
		t.Fatalf("istio-iptables: %v\n%s", err, out)
	}
}

// probe is one connection and where it went: through the proxy (at which
// listener, to which original destination, seen from which peer) or not.
type probe struct {
	name     string
	fromPod  bool // the app's connection; else the peer's
	asProxy  bool // from the pod, as the proxy's uid/gid (1337)
	udp      bool
	dst      string
	outcome  string
	recorded string
}

// roundTripAsProxy sends a line from the pod's netns as uid/gid 1337 (the
// proxy's own connection) and wants it echoed.
func roundTripAsProxy(path, dst string) error {
	host, port, _ := net.SplitHostPort(dst)
	script := fmt.Sprintf("exec 3<>/dev/tcp/%s/%s && echo ping >&3 && timeout 2 head -n1 <&3", host, port)
	out, err := exec.Command("nsenter", "--net="+path, "--setuid=1337", "--setgid=1337", "--", "bash", "-c", script).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ping" {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

// run sets up the pod and its peer, has e write the rules, starts the
// proxy and sends every probe; it returns each probe's outcome.
func run(t *testing.T, e engine, annos map[string]string, tproxy, dual, dns bool) []string {
	pod, peer := sidecartest.NewNetns(t), sidecartest.NewNetns(t)
	vp, vq := "arsc-p"+pod[4:8], "arsc-q"+pod[4:8]
	netnstest.Exec(t, pod, "ip", "link", "add", vp, "type", "veth", "peer", "name", vq, "netns", peer)
	netnstest.Exec(t, pod, "ip", "addr", "add", podIP+"/24", "dev", vp)
	netnstest.Exec(t, pod, "ip", "link", "set", vp, "up")
	netnstest.Exec(t, peer, "ip", "addr", "add", peerIP+"/24", "dev", vq)
	netnstest.Exec(t, peer, "ip", "link", "set", vq, "up")
	if dual {
		netnstest.Exec(t, pod, "ip", "addr", "add", podIP6+"/64", "dev", vp, "nodad")
		netnstest.Exec(t, peer, "ip", "addr", "add", peerIP6+"/64", "dev", vq, "nodad")
	}
	type fam struct{ pod, peer, lo string }
	fams := []fam{{podIP, peerIP, "127.0.0.1"}}
	if dual {
		fams = append(fams, fam{podIP6, peerIP6, "::1"})
	}
	var probes []probe
	for _, f := range fams {
		hp := func(ip string, port int) string { return net.JoinHostPort(ip, fmt.Sprint(port)) }
		for _, port := range []int{appPort, exclIn, healthPort, 15008, 15020, 15090} {
			netnstest.EchoServer(t, pod, hp(f.pod, port))
		}
		netnstest.EchoServer(t, pod, hp(f.lo, appPort))
		for _, port := range []int{appPort, exclOut} {
			netnstest.EchoServer(t, peer, hp(f.peer, port))
		}
		for _, port := range []int{53, 5353} {
			netnstest.UDPEcho(t, peer, hp(f.peer, port))
		}
		probes = append(probes,
			probe{name: "outbound", fromPod: true, dst: hp(f.peer, appPort)},
			probe{name: "outbound, excluded port", fromPod: true, dst: hp(f.peer, exclOut)},
			probe{name: "inbound", dst: hp(f.pod, appPort)},
			probe{name: "inbound, excluded port", dst: hp(f.pod, exclIn)},
			probe{name: "inbound, health port", dst: hp(f.pod, healthPort)},
			probe{name: "app to its own address", fromPod: true, dst: hp(f.pod, appPort)},
			probe{name: "app to loopback", fromPod: true, dst: hp(f.lo, appPort)},
			probe{name: "inbound, 15008", dst: hp(f.pod, 15008)},
			probe{name: "inbound, 15020", dst: hp(f.pod, 15020)},
			probe{name: "inbound, 15090", dst: hp(f.pod, 15090)},
			probe{name: "proxy to the pod's address", asProxy: true, dst: hp(f.pod, appPort)},
			probe{name: "proxy to the peer", asProxy: true, dst: hp(f.peer, appPort)},
			probe{name: "app UDP", fromPod: true, udp: true, dst: hp(f.peer, 5353)},
			probe{name: "app DNS over UDP", fromPod: true, udp: true, dst: hp(f.peer, 53)})
	}
	e(t, netnstest.NsPath(pod), annos, dual, dns)
	o := sidecartest.ProxyOptions{TPROXY: tproxy}
	if dns {
		o.DNSPort = dataplane.SidecarDNSPort
	}
	px := sidecartest.StartProxy(t, pod, proxyBin, o)
	var out []string
	payload := []byte(strings.Repeat("sidecar ", 64))
	for _, p := range probes {
		ns := peer
		if p.fromPod {
			ns = pod
		}
		before := len(px.Records(t))
		var got []byte
		var err error
		switch {
		case p.asProxy:
			if err = roundTripAsProxy(netnstest.NsPath(pod), p.dst); err == nil {
				got = payload
			}
		case p.udp:
			got, err = netnstest.UDPRoundTrip(ns, p.dst, payload, time.Second)
		default:
			got, err = netnstest.RoundTrip(ns, p.dst, payload, 2*time.Second)
		}
		switch {
		case err != nil:
			p.outcome = "failed"
		case string(got) != string(payload):
			p.outcome = "corrupted"
		default:
			p.outcome = "ok"
		}
		time.Sleep(30 * time.Millisecond) // the record trails the round trip
		p.recorded = "direct"
		if recs := px.Records(t); len(recs) > before {
			r := recs[before]
			peerHost, _, _ := net.SplitHostPort(r.Peer)
			if peerHost != peerIP && peerHost != peerIP6 {
				peerHost = "the pod"
			}
			p.recorded = fmt.Sprintf("via %d to %s from %s (%d records)", r.Listener, r.OrigDst, peerHost, len(recs)-before)
		}
		out = append(out, fmt.Sprintf("%-26s %-22s %-9s %s", p.name, p.dst, p.outcome, p.recorded))
	}
	return out
}

// TestSameBehaviourAsIstio runs the same connections through a pod whose
// rules our agent wrote and through one whose rules Istio's istio-iptables
// (built from the module proxy) wrote, with the same annotations, and
// wants the same outcome for each: captured or not, at which listener,
// with which original destination and client address.
func TestSameBehaviourAsIstio(t *testing.T) {
	netnstest.RequireRoot(t)
	istio.Build(t) // skips, saying why, when it cannot be built
	excludes := map[string]string{desired.AnnoExcludeOutboundPorts: fmt.Sprint(exclOut), desired.AnnoExcludeInboundPorts: fmt.Sprint(exclIn)}
	with := func(kv ...string) map[string]string {
		m := maps.Clone(excludes)
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	for _, c := range []struct {
		name              string
		annos             map[string]string
		tproxy, dual, dns bool
	}{
		{"redirect", excludes, false, false, false},
		{"redirect-dualstack", excludes, false, true, false},
		{"tproxy", with("sidecar.istio.io/interceptionMode", "TPROXY"), true, false, false},
		{"includes", with(desired.AnnoIncludeInboundPorts, fmt.Sprint(exclIn), desired.AnnoIncludeOutboundIPRanges, "10.77.0.1/32",
			desired.AnnoExcludeOutboundIPRanges, ""), false, true, false},
		{"dns", excludes, false, false, true},
		{"exclude-range", with(desired.AnnoExcludeOutboundIPRanges, "10.77.0.1/32,fd77::1/128"), false, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			want := run(t, istioEngine, c.annos, c.tproxy, c.dual, c.dns)
			got := run(t, ours, c.annos, c.tproxy, c.dual, c.dns)
			t.Logf("istio-iptables:\n  %s", strings.Join(want, "\n  "))
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("behaviour differs from Istio's:\nours:\n  %s\nistio:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
		})
	}
}

// TestIstioValidationPasses runs Istio's own check of a CNI-mode pod (what
// its istio-validation init container runs) in a pod whose rules we wrote;
// in a pod without them it must fail, or it proves nothing.
func TestIstioValidationPasses(t *testing.T) {
	netnstest.RequireRoot(t)
	istio.Build(t)
	pod, peer := sidecartest.NewNetns(t), sidecartest.NewNetns(t)
	vp, vq := "arsc-p"+pod[4:8], "arsc-q"+pod[4:8]
	netnstest.Exec(t, pod, "ip", "link", "add", vp, "type", "veth", "peer", "name", vq, "netns", peer)
	netnstest.Exec(t, pod, "ip", "addr", "add", podIP+"/24", "dev", vp)
	netnstest.Exec(t, pod, "ip", "link", "set", vp, "up")
	if out, err := istio.Validate(t, netnstest.NsPath(pod), nil); err == nil {
		t.Fatalf("Istio's validation passed in a pod without rules:\n%s", out)
	}
	ours(t, netnstest.NsPath(pod), nil, false, false)
	if out, err := istio.Validate(t, netnstest.NsPath(pod), nil); err != nil {
		t.Fatalf("Istio's validation failed in a pod whose rules we wrote: %v\n%s", err, out)
	}
}
