package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/cni/cnitest"
	"github.com/ambient-redirect/ambient-redirect/selection"
)

// pluginBin is the plugin, built once: the tests run it as the runtime does.
var pluginBin string

func TestMain(m *testing.M) {
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "arcni-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		pluginBin = filepath.Join(dir, "ambient-redirect-cni")
		if out, err := exec.Command("go", "build", "-o", pluginBin, ".").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building the plugin: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}())
}

// prevResult is what ptp returns: the host veth (no sandbox, here with a
// link-local address that is not the pod's) and eth0 in the pod, dual-stack.
func prevResult(cniVersion string) map[string]any {
	ip := func(addr, ver string, iface int) map[string]any {
		m := map[string]any{"address": addr, "interface": iface}
		if cniVersion != "1.0.0" {
			m["version"] = ver
		}
		return m
	}
	return map[string]any{
		"cniVersion": cniVersion,
		"interfaces": []any{
			map[string]any{"name": "veth1a2b3c", "mac": "aa:bb:cc:00:00:01"},
			map[string]any{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/cni-1234"},
		},
		"ips": []any{
			ip("169.254.1.1/32", "4", 0),
			ip("10.244.1.5/24", "4", 1),
			ip("fd00:10:244:1::5/64", "6", 1),
		},
		"routes": []any{map[string]any{"dst": "0.0.0.0/0"}, map[string]any{"dst": "::/0"}},
		"dns":    map[string]any{},
	}
}

var wantIPs = []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5")}

// run is one run of the plugin binary.
type run struct {
	command    string
	cniVersion string
	conf       map[string]any // merged into the network config
	noPrev     bool           // leave prevResult out
	podNS      string         // "" with podName "": not a pod
	podName    string
}

type result struct {
	code    int // exit code
	stdout  []byte
	stderr  string
	elapsed time.Duration
}

func (r run) exec(t *testing.T) result {
	t.Helper()
	conf := map[string]any{"cniVersion": r.cniVersion, "name": "kindnet", "type": cni.PluginType}
	if !r.noPrev {
		conf["prevResult"] = prevResult(r.cniVersion)
	}
	for k, v := range r.conf {
		conf[k] = v
	}
	stdin, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	args := "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=c0ffee"
	if r.podName != "" {
		args += ";K8S_POD_NAMESPACE=" + r.podNS + ";K8S_POD_NAME=" + r.podName + ";K8S_POD_UID=uid-" + r.podName
	}
	cmd := exec.Command(pluginBin)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"CNI_COMMAND=" + r.command,
		"CNI_CONTAINERID=c0ffee",
		// Never a real netns: skel only checks that it is not the plugin's own.
		"CNI_NETNS=/var/run/netns/arcni-test-does-not-exist",
		"CNI_IFNAME=eth0",
		"CNI_PATH=/opt/cni/bin",
		"CNI_ARGS=" + args,
	}
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err = cmd.Run()
	res := result{stdout: stdout.Bytes(), stderr: stderr.String(), elapsed: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		res.code = ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return res
}

// cniError is the error the plugin printed, or nil when it succeeded.
func (r result) cniError(t *testing.T) *types.Error {
	t.Helper()
	if r.code == 0 {
		return nil
	}
	var e types.Error
	if err := json.Unmarshal(r.stdout, &e); err != nil {
		t.Fatalf("exit %d without a CNI error on stdout: %q (stderr %q)", r.code, r.stdout, r.stderr)
	}
	return &e
}

// assertPassed checks that ADD succeeded and printed prevResult, unchanged,
// in the config's version.
func (r result) assertPassed(t *testing.T, cniVersion string) {
	t.Helper()
	if e := r.cniError(t); e != nil {
		t.Fatalf("plugin failed: code %d: %s (stderr %q)", e.Code, e.Msg, r.stderr)
	}
	got, err := version.NewResult(cniVersion, r.stdout)
	if err != nil {
		t.Fatalf("stdout is not a %s result: %v\n%s", cniVersion, err, r.stdout)
	}
	if got.Version() != cniVersion {
		t.Errorf("result version %s, want %s", got.Version(), cniVersion)
	}
	prev, _ := json.Marshal(prevResult(cniVersion))
	want, err := version.NewResult(cniVersion, prev)
	if err != nil {
		t.Fatal(err)
	}
	g100, _ := types100.NewResultFromResult(got)
	w100, _ := types100.NewResultFromResult(want)
	if !reflect.DeepEqual(g100, w100) {
		t.Errorf("result is not prevResult:\n got %s\nwant %s", r.stdout, prev)
	}
}

func (r result) assertFailed(t *testing.T, code uint, msgParts ...string) {
	t.Helper()
	e := r.cniError(t)
	if e == nil {
		t.Fatalf("plugin succeeded (stdout %s); want error code %d", r.stdout, code)
	}
	if e.Code != code {
		t.Errorf("error code %d (%s), want %d", e.Code, e.Msg, code)
	}
	for _, p := range msgParts {
		if !strings.Contains(e.Msg, p) {
			t.Errorf("error message %q does not say %q", e.Msg, p)
		}
	}
}

// cluster is a fake API server with an ambient namespace "mesh" (pod a)
// and a plain namespace "plain" (pod b).
func cluster(t *testing.T) *cnitest.API {
	ambient := map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient}
	return cnitest.NewAPI(t,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mesh", Labels: ambient}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "plain"}},
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "mesh", Name: "a"}},
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "plain", Name: "b"}},
	)
}

func answer(resp cni.Response, err error) *cnitest.Agent {
	return &cnitest.Agent{Answer: func(context.Context, cni.Request) (cni.Response, error) { return resp, err }}
}

var versions = []string{"0.4.0", "1.0.0"}

func TestAddAgentAnswers(t *testing.T) {
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			t.Run("programmed", func(t *testing.T) {
				agent := answer(cni.Response{Ambient: true, Programmed: true, Reason: "enrolled"}, nil)
				sock := cnitest.Serve(t, agent)
				run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock}, podNS: "mesh", podName: "a"}.exec(t).assertPassed(t, v)
				want := cni.Request{
					Command: "ADD", ContainerID: "c0ffee", NetNS: "/var/run/netns/arcni-test-does-not-exist", IfName: "eth0",
					PodNamespace: "mesh", PodName: "a", PodUID: "uid-a", IPs: wantIPs,
				}
				if got := agent.Requests(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
					t.Errorf("agent got %+v\nwant %+v", got, want)
				}
			})
			t.Run("not ambient", func(t *testing.T) {
				sock := cnitest.Serve(t, answer(cni.Response{Reason: selection.ReasonNotAmbient}, nil))
				run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock}, podNS: "plain", podName: "b"}.exec(t).assertPassed(t, v)
			})
			t.Run("agent error", func(t *testing.T) {
				sock := cnitest.Serve(t, answer(cni.Response{}, errors.New("no ztunnel on this node")))
				// failMode open covers an agent it cannot reach, not one that refused.
				run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock, "failMode": "open"}, podNS: "mesh", podName: "a"}.
					exec(t).assertFailed(t, errAgent, "mesh/a", "no ztunnel on this node")
			})
			t.Run("ambient, not programmed", func(t *testing.T) {
				sock := cnitest.Serve(t, answer(cni.Response{Ambient: true, Reason: "ztunnel not ready"}, nil))
				run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock}, podNS: "mesh", podName: "a"}.
					exec(t).assertFailed(t, errNotProgrammed, "mesh/a", "ztunnel not ready")
			})
		})
	}
}

func TestAddAgentUnreachable(t *testing.T) {
	api := cluster(t)
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "no-agent.sock")
			conf := func(failMode string, kubeconfig bool) map[string]any {
				c := map[string]any{"socket": sock, "failMode": failMode}
				if kubeconfig {
					c["kubeconfig"] = api.Kubeconfig
				}
				return c
			}
			t.Run("ambient pod, fail closed", func(t *testing.T) {
				run{command: "ADD", cniVersion: v, conf: conf("closed", true), podNS: "mesh", podName: "a"}.exec(t).
					assertFailed(t, types.ErrTryAgainLater, "the node agent is not reachable at "+sock, "no such file or directory",
						"pod mesh/a is ambient", "failMode is closed", "must not start uncaptured", "the kubelet will retry")
			})
			t.Run("non-ambient pod, fail closed", func(t *testing.T) {
				res := run{command: "ADD", cniVersion: v, conf: conf("closed", true), podNS: "plain", podName: "b"}.exec(t)
				res.assertPassed(t, v)
				if res.elapsed > 500*time.Millisecond {
					t.Errorf("a non-ambient pod waited %v", res.elapsed)
				}
				if res.stderr != "" {
					t.Errorf("stderr %q for a pod that needs nothing", res.stderr)
				}
			})
			t.Run("no kubeconfig, fail closed", func(t *testing.T) {
				run{command: "ADD", cniVersion: v, conf: conf("closed", false), podNS: "plain", podName: "b"}.exec(t).
					assertFailed(t, types.ErrTryAgainLater, "pod plain/b may be ambient", "no kubeconfig")
			})
			t.Run("pod not found, fail closed", func(t *testing.T) {
				run{command: "ADD", cniVersion: v, conf: conf("closed", true), podNS: "mesh", podName: "gone"}.exec(t).
					assertFailed(t, types.ErrTryAgainLater, "pod mesh/gone may be ambient", "404")
			})
			t.Run("ambient pod, fail open", func(t *testing.T) {
				res := run{command: "ADD", cniVersion: v, conf: conf("open", true), podNS: "mesh", podName: "a"}.exec(t)
				res.assertPassed(t, v)
				if !strings.Contains(res.stderr, "failMode is open") || !strings.Contains(res.stderr, "mesh/a") {
					t.Errorf("no warning on stderr: %q", res.stderr)
				}
			})
			t.Run("socket without listener", func(t *testing.T) {
				// What a crashed agent leaves: the socket file, nobody listening.
				dead := filepath.Join(t.TempDir(), "dead.sock")
				ln, err := net.Listen("unix", dead)
				if err != nil {
					t.Fatal(err)
				}
				ln.(*net.UnixListener).SetUnlinkOnClose(false)
				ln.Close()
				c := conf("closed", true)
				c["socket"] = dead
				run{command: "ADD", cniVersion: v, conf: c, podNS: "mesh", podName: "a"}.exec(t).
					assertFailed(t, types.ErrTryAgainLater, "not reachable", "connection refused")
			})
		})
	}
}

// A slow agent is running: not "unreachable". The API server still lets a
// non-ambient pod through; an ambient one fails closed, or passes open.
func TestAddAgentTimeout(t *testing.T) {
	api := cluster(t)
	sock := cnitest.Serve(t, &cnitest.Agent{Answer: func(ctx context.Context, _ cni.Request) (cni.Response, error) {
		<-ctx.Done()
		return cni.Response{}, ctx.Err()
	}})
	conf := func(failMode string) map[string]any {
		return map[string]any{"socket": sock, "failMode": failMode, "timeout": "200ms", "kubeconfig": api.Kubeconfig}
	}
	v := "1.0.0"
	run{command: "ADD", cniVersion: v, conf: conf("closed"), podNS: "mesh", podName: "a"}.exec(t).
		assertFailed(t, types.ErrTryAgainLater, "did not answer within 200ms", "pod mesh/a is ambient", "failMode is closed")
	run{command: "ADD", cniVersion: v, conf: conf("closed"), podNS: "plain", podName: "b"}.exec(t).assertPassed(t, v)
	res := run{command: "ADD", cniVersion: v, conf: conf("open"), podNS: "mesh", podName: "a"}.exec(t)
	res.assertPassed(t, v)
	if !strings.Contains(res.stderr, "did not answer within 200ms") {
		t.Errorf("stderr %q", res.stderr)
	}
}

func TestAddNotChainedOrNotAPod(t *testing.T) {
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			agent := &cnitest.Agent{}
			sock := cnitest.Serve(t, agent)
			run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock}, noPrev: true, podNS: "mesh", podName: "a"}.exec(t).
				assertFailed(t, types.ErrInvalidNetworkConfig, "no prevResult", "chained")
			run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock}}.exec(t).assertPassed(t, v)
			if n := len(agent.Requests()); n != 0 {
				t.Errorf("agent asked %d times", n)
			}
			run{command: "ADD", cniVersion: v, conf: map[string]any{"socket": sock, "failMode": "maybe"}, podNS: "mesh", podName: "a"}.exec(t).
				assertFailed(t, types.ErrInvalidNetworkConfig, `failMode "maybe"`)
		})
	}
}

func TestDel(t *testing.T) {
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			// No agent: success, quietly (the pod may be long gone).
			res := run{command: "DEL", cniVersion: v, conf: map[string]any{"socket": filepath.Join(t.TempDir(), "none.sock")}, podNS: "mesh", podName: "a"}.exec(t)
			if res.code != 0 || len(res.stdout) != 0 || res.stderr != "" {
				t.Errorf("DEL without agent: exit %d, stdout %q, stderr %q", res.code, res.stdout, res.stderr)
			}
			// The agent is told, with the pod's addresses.
			agent := &cnitest.Agent{}
			sock := cnitest.Serve(t, agent)
			if res := (run{command: "DEL", cniVersion: v, conf: map[string]any{"socket": sock}, podNS: "mesh", podName: "a"}.exec(t)); res.code != 0 {
				t.Errorf("DEL: exit %d: %s", res.code, res.stdout)
			}
			if got := agent.Requests(); len(got) != 1 || got[0].Command != "DEL" || got[0].PodName != "a" || !slices.Equal(got[0].IPs, wantIPs) {
				t.Errorf("agent got %+v", got)
			}
			// An agent error does not fail DEL either; it is reported on stderr.
			sock = cnitest.Serve(t, answer(cni.Response{}, errors.New("boom")))
			res = run{command: "DEL", cniVersion: v, conf: map[string]any{"socket": sock}, podNS: "mesh", podName: "a"}.exec(t)
			if res.code != 0 || !strings.Contains(res.stderr, "boom") {
				t.Errorf("DEL with agent error: exit %d, stderr %q", res.code, res.stderr)
			}
			// Not even a broken config fails DEL.
			res = run{command: "DEL", cniVersion: v, conf: map[string]any{"failMode": "maybe"}, podNS: "mesh", podName: "a"}.exec(t)
			if res.code != 0 {
				t.Errorf("DEL with a bad config: exit %d: %s", res.code, res.stdout)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	api := cluster(t)
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			check := func(conf map[string]any, pod string) result {
				ns := map[string]string{"a": "mesh", "b": "plain"}[pod]
				return run{command: "CHECK", cniVersion: v, conf: conf, podNS: ns, podName: pod}.exec(t)
			}
			agent := answer(cni.Response{Ambient: true, Programmed: true}, nil)
			sock := cnitest.Serve(t, agent)
			if res := check(map[string]any{"socket": sock}, "a"); res.code != 0 || len(res.stdout) != 0 {
				t.Errorf("CHECK programmed: exit %d, stdout %s", res.code, res.stdout)
			}
			if got := agent.Requests(); len(got) != 1 || got[0].Command != "CHECK" || !slices.Equal(got[0].IPs, wantIPs) {
				t.Errorf("agent got %+v", got)
			}
			sock = cnitest.Serve(t, answer(cni.Response{Ambient: true, Reason: "not in the ipset"}, nil))
			check(map[string]any{"socket": sock}, "a").assertFailed(t, errNotProgrammed, "CHECK", "mesh/a", "not in the ipset")

			gone := filepath.Join(t.TempDir(), "none.sock")
			check(map[string]any{"socket": gone, "kubeconfig": api.Kubeconfig}, "a").assertFailed(t, types.ErrTryAgainLater, "not reachable", "failMode is closed")
			if res := check(map[string]any{"socket": gone, "kubeconfig": api.Kubeconfig, "failMode": "open"}, "a"); res.code != 0 {
				t.Errorf("CHECK unreachable, fail open: exit %d: %s", res.code, res.stdout)
			}
			if res := check(map[string]any{"socket": gone, "kubeconfig": api.Kubeconfig}, "b"); res.code != 0 {
				t.Errorf("CHECK unreachable, non-ambient pod: exit %d: %s", res.code, res.stdout)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	res := run{command: "VERSION", cniVersion: "1.0.0"}.exec(t)
	var got struct {
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(res.stdout, &got); err != nil || !slices.Equal(got.SupportedVersions, cni.SupportedVersions) {
		t.Errorf("VERSION = %s (%v); want %v", res.stdout, err, cni.SupportedVersions)
	}
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0"} {
		if !slices.Contains(got.SupportedVersions, v) {
			t.Errorf("%s not supported", v)
		}
	}
}
