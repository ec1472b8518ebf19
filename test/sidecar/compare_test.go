package sidecar_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
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

// engine writes a sidecar pod's rules into the netns at path.
type engine func(t *testing.T, path string, annos map[string]string)

func ours(t *testing.T, path string, annos map[string]string) {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", Annotations: annos}}
	c, err := desired.SidecarCaptureOf(p)
	if err != nil {
		t.Fatal(err)
	}
	s := dataplane.Sidecar{UID: "uid", Name: "apps/web", IPs: []netip.Addr{netip.MustParseAddr(podIP)}, Capture: c}
	if _, err := dataplane.ProgramSidecar(context.Background(), dataplane.DefaultConfig(), path, s); err != nil {
		t.Fatal(err)
	}
}

func istioEngine(t *testing.T, path string, annos map[string]string) {
	istio.Run(t, path, istio.ArgsFor(annos)...)
}

// probe is one connection and where it went: through the proxy (at which
// listener, to which original destination, seen from which peer) or not.
type probe struct {
	name     string
	fromPod  bool // the app's connection; else the peer's
	dst      string
	outcome  string
	recorded string
}

// run sets up the pod and its peer, has e write the rules, starts the
// proxy and sends every probe; it returns each probe's outcome.
func run(t *testing.T, e engine, annos map[string]string, tproxy bool) []string {
	pod, peer := sidecartest.NewNetns(t), sidecartest.NewNetns(t)
	vp, vq := "arsc-p"+pod[4:8], "arsc-q"+pod[4:8]
	netnstest.Exec(t, pod, "ip", "link", "add", vp, "type", "veth", "peer", "name", vq, "netns", peer)
	netnstest.Exec(t, pod, "ip", "addr", "add", podIP+"/24", "dev", vp)
	netnstest.Exec(t, pod, "ip", "link", "set", vp, "up")
	netnstest.Exec(t, peer, "ip", "addr", "add", peerIP+"/24", "dev", vq)
	netnstest.Exec(t, peer, "ip", "link", "set", vq, "up")
	for _, port := range []int{appPort, exclIn, healthPort} {
		netnstest.EchoServer(t, pod, fmt.Sprintf("%s:%d", podIP, port))
	}
	netnstest.EchoServer(t, pod, fmt.Sprintf("127.0.0.1:%d", appPort))
	for _, port := range []int{appPort, exclOut} {
		netnstest.EchoServer(t, peer, fmt.Sprintf("%s:%d", peerIP, port))
	}
	e(t, netnstest.NsPath(pod), annos)
	px := sidecartest.StartProxy(t, pod, proxyBin, sidecartest.ProxyOptions{TPROXY: tproxy})
	probes := []probe{
		{name: "outbound", fromPod: true, dst: fmt.Sprintf("%s:%d", peerIP, appPort)},
		{name: "outbound, excluded port", fromPod: true, dst: fmt.Sprintf("%s:%d", peerIP, exclOut)},
		{name: "inbound", dst: fmt.Sprintf("%s:%d", podIP, appPort)},
		{name: "inbound, excluded port", dst: fmt.Sprintf("%s:%d", podIP, exclIn)},
		{name: "inbound, health port", dst: fmt.Sprintf("%s:%d", podIP, healthPort)},
		{name: "app to its own address", fromPod: true, dst: fmt.Sprintf("%s:%d", podIP, appPort)},
		{name: "app to 127.0.0.1", fromPod: true, dst: fmt.Sprintf("127.0.0.1:%d", appPort)},
	}
	var out []string
	payload := []byte(strings.Repeat("sidecar ", 64))
	for _, p := range probes {
		ns := peer
		if p.fromPod {
			ns = pod
		}
		before := len(px.Records(t))
		got, err := netnstest.RoundTrip(ns, p.dst, payload, 2*time.Second)
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
			peerHost := r.Peer[:strings.LastIndex(r.Peer, ":")]
			if peerHost != peerIP {
				peerHost = "the pod"
			}
			p.recorded = fmt.Sprintf("via %d to %s from %s (%d records)", r.Listener, r.OrigDst, peerHost, len(recs)-before)
		}
		out = append(out, fmt.Sprintf("%-26s %-9s %s", p.name, p.outcome, p.recorded))
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
	for _, c := range []struct {
		name   string
		annos  map[string]string
		tproxy bool
	}{
		{"redirect", map[string]string{desired.AnnoExcludeOutboundPorts: fmt.Sprint(exclOut), desired.AnnoExcludeInboundPorts: fmt.Sprint(exclIn)}, false},
		{"tproxy", map[string]string{"sidecar.istio.io/interceptionMode": "TPROXY",
			desired.AnnoExcludeOutboundPorts: fmt.Sprint(exclOut), desired.AnnoExcludeInboundPorts: fmt.Sprint(exclIn)}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			want := run(t, istioEngine, c.annos, c.tproxy)
			got := run(t, ours, c.annos, c.tproxy)
			t.Logf("istio-iptables:\n  %s", strings.Join(want, "\n  "))
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("behaviour differs from Istio's:\nours:\n  %s\nistio:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
		})
	}
}
