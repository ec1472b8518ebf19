// Package istio runs Istio's own sidecar rules engine, istio-iptables, in a
// test pod's network namespace, to compare our agent's sidecar-mode capture
// with the real thing by behaviour (never by rule text).
//
//	bin := istio.Build(t)                       // skips the test if it cannot be built
//	out := istio.Run(t, netnstest.NsPath(ns), istio.ArgsFor(annotations)...)
//	out, err := istio.RunEnv(t, path, []string{"ISTIO_DUAL_STACK=true"}, args...)
//
// # The binary
//
// hack/build-istio-iptables.sh builds it from the Go module proxy (module
// istio.io/istio at the pseudo-version pinned there — the proxy serves only
// untagged snapshots — in a scratch module, like hack/build-control-plane.sh)
// and caches it under ${XDG_CACHE_HOME:-~/.cache}/ambient-redirect/
// istio-iptables-<version>/. Recent Istio has no tools/istio-iptables main
// package any more (it is `pilot-agent istio-iptables`); the scratch module
// has the few-line main around tools/istio-iptables/pkg/cmd.GetCommand that
// pilot-agent registers, with pilot-agent's --log_* flags. About 30 s cold
// on 2 cores, 6 MB.
//
// # Pod annotations → flags (what Istio's injection template passes)
//
// ArgsFor reproduces the istio-init container's arguments
// (manifests/charts/istio-control/istio-discovery/files/injection-template.yaml
// of the pinned version) for a pod's annotations, with the chart's defaults:
//
//	-p 15001                     Envoy outbound port (mesh proxyListenPort)
//	-z 15006                     inbound capture port (mesh proxyInboundListenPort)
//	-u 1337                      proxy uid (the sidecar's runAsUser; always 1337 for TPROXY);
//	                             -g (gid) is not passed and defaults to -u
//	-m MODE                      sidecar.istio.io/interceptionMode [REDIRECT]: REDIRECT | TPROXY
//	                             (NONE: the injector writes no init container at all)
//	-i CIDRS                     traffic.sidecar.istio.io/includeOutboundIPRanges ["*"]; "" = no outbound capture
//	-x CIDRS                     traffic.sidecar.istio.io/excludeOutboundIPRanges [""]
//	-b PORTS                     traffic.sidecar.istio.io/includeInboundPorts ["*"]; "" = no inbound capture
//	-d 15090,15021,PORTS,15020   traffic.sidecar.istio.io/excludeInboundPorts, between the
//	                             always-excluded 15090,15021 and the status port 15020
//	                             (status.sidecar.istio.io/port); 15008 (-e, the inbound tunnel
//	                             port) is excluded by istio-iptables itself, in REDIRECT mode only
//	-q PORTS                     traffic.sidecar.istio.io/includeOutboundPorts (only when set)
//	-o PORTS                     traffic.sidecar.istio.io/excludeOutboundPorts (only when set)
//	-k IFACES                    istio.io/reroute-virtual-interfaces, else the old
//	                             traffic.sidecar.istio.io/kubevirtInterfaces (only when set)
//	-c IFACES                    traffic.sidecar.istio.io/excludeInterfaces (only when set)
//
// The binary's own defaults differ from the injector's: -b and -i default
// to empty (no capture at all), -m to REDIRECT, -u to the uid of user
// ENVOY_USER (istio-proxy) or 1337, -g to -u. Pass them explicitly.
//
// # Environment (the sidecar's proxyMetadata, set on the init container)
//
// Every flag also reads the environment variable of its long name in upper
// case with "-" as "_" (e.g. ISTIO_INBOUND_PORTS); RunEnv passes only PATH
// and what it is given, so the host's environment never leaks in. Further:
//
//	ISTIO_META_DNS_CAPTURE=true  = --redirect-dns: UDP/TCP 53 → 15053 for the app (not
//	                               for uid/gid 1337), to the DNS servers of /etc/resolv.conf —
//	                               of the host, since Run switches only the netns — unless
//	                               --capture-all-dns (all port-53 traffic; use it in tests)
//	ISTIO_DUAL_STACK=true        = --dual-stack: IPv6 rules too when the netns has a global
//	                               IPv6 address (without it, IPv6 rules only when the first
//	                               non-loopback address is IPv6)
//	INVALID_DROP=true            = --drop-invalid: drop conntrack-INVALID packets
//	ISTIO_OUTBOUND_OWNER_GROUPS, ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: outbound capture by gid
//	ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR [127.0.0.1/32]
//
// # What it needs in the netns, and what it writes besides iptables
//
//   - a non-loopback, non-link-local address (it refuses to run with "no
//     valid local IP address found");
//   - iptables binaries in PATH: it uses iptables-legacy if the netns already
//     has legacy tables, else iptables-nft (--force-iptables-binary nft|legacy
//     pins it; see Reruns); with nft it takes no lock, with legacy the host's
//     /run/xtables.lock with --wait=30 (outside --cni-mode). Nothing else: no
//     probe flag is needed (--iptables-probe-port and --run-validation only
//     check an existing set-up);
//   - when it writes IPv6 rules it adds ::6/128 to lo (Envoy's IPv6 inbound
//     passthrough source); in TPROXY mode it adds `ip rule fwmark 1337 lookup
//     133` and `ip route add local default dev lo table 133` (both families
//     when IPv6; -t and -r change mark and table).
//
// Reruns: its probe of iptables-legacy (add and delete a no-op rule in
// filter) leaves an empty legacy filter table behind, which the next run
// takes for "legacy rules exist": a second run without
// --force-iptables-binary nft writes a second rule set with iptables-legacy.
// Pinned to nft, a second run over its own rules changes nothing.
package istio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// buildTimeout bounds the first build (downloads included).
const buildTimeout = 15 * time.Minute

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Build returns the path of the istio-iptables binary, building it the first
// time (once per process, and once per machine: the script caches it). It
// skips the test, with the build's output, if it cannot be built (no
// network, no module proxy, no Go).
func Build(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() { binPath, buildErr = build() })
	if buildErr != nil {
		t.Skipf("istio-iptables cannot be built, skipping: %v", buildErr)
	}
	return binPath
}

func build() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "hack", "build-istio-iptables.sh"))
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("hack/build-istio-iptables.sh: %v\n%s", err, tail(stderr.String(), 40))
	}
	path := strings.TrimSpace(stdout.String())
	if fi, err := os.Stat(path); err != nil || fi.IsDir() {
		return "", fmt.Errorf("hack/build-istio-iptables.sh printed %q, not a binary (%v)", path, err)
	}
	return path, nil
}

// repoRoot walks up from the working directory (a test's is its package's)
// to the directory holding go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// basePath is the PATH istio-iptables runs with (it execs iptables-nft,
// iptables-legacy, ip6tables-*, and their -save/-restore).
const basePath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Run runs istio-iptables (built by Build, which may skip the test) with
// args in the network namespace at netnsPath (e.g. netnstest.NsPath(name)),
// through nsenter --net, with only PATH in its environment, and returns its
// combined output; it fails the test if it fails.
func Run(t testing.TB, netnsPath string, args ...string) string {
	t.Helper()
	out, err := RunEnv(t, netnsPath, nil, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// RunEnv is Run with env (KEY=VALUE, e.g. "ISTIO_DUAL_STACK=true") added to
// the environment, returning the error instead of failing the test (for
// checking that invalid input is refused).
func RunEnv(t testing.TB, netnsPath string, env []string, args ...string) (string, error) {
	t.Helper()
	bin := Build(t)
	if netnsPath == "" || filepath.Clean(netnsPath) == "/proc/1/ns/net" || filepath.Clean(netnsPath) == "/proc/self/ns/net" {
		t.Fatalf("istio: refusing to run in netns %q (the root namespace is never touched)", netnsPath)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath, "--", bin}, args...)...)
	cmd.Env = append([]string{basePath}, env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("nsenter --net=%s istio-iptables %s: %w", netnsPath, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// Istio's annotation names (see the package comment for what they become).
const (
	AnnotationInterceptionMode         = "sidecar.istio.io/interceptionMode"
	AnnotationIncludeOutboundIPRanges  = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges  = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	AnnotationIncludeInboundPorts      = "traffic.sidecar.istio.io/includeInboundPorts"
	AnnotationExcludeInboundPorts      = "traffic.sidecar.istio.io/excludeInboundPorts"
	AnnotationIncludeOutboundPorts     = "traffic.sidecar.istio.io/includeOutboundPorts"
	AnnotationExcludeOutboundPorts     = "traffic.sidecar.istio.io/excludeOutboundPorts"
	AnnotationRerouteVirtualInterfaces = "istio.io/reroute-virtual-interfaces"
	AnnotationKubevirtInterfaces       = "traffic.sidecar.istio.io/kubevirtInterfaces"
	AnnotationExcludeInterfaces        = "traffic.sidecar.istio.io/excludeInterfaces"
	AnnotationStatusPort               = "status.sidecar.istio.io/port"
)

// ArgsFor returns the istio-init arguments Istio's injection template
// writes for a pod with these annotations and the chart's defaults (proxy
// uid 1337, status port 15020, no global include/exclude of outbound
// ports), as in the package comment. It does not validate: invalid values
// reach istio-iptables as they would in a cluster.
func ArgsFor(annotations map[string]string) []string {
	get := func(k, def string) string {
		if v, ok := annotations[k]; ok {
			return v
		}
		return def
	}
	mode := get(AnnotationInterceptionMode, "REDIRECT")
	args := []string{
		"-p", "15001",
		"-z", "15006",
		"-u", "1337",
		"-m", mode,
		"-i", get(AnnotationIncludeOutboundIPRanges, "*"),
		"-x", get(AnnotationExcludeOutboundIPRanges, ""),
		"-b", get(AnnotationIncludeInboundPorts, "*"),
		"-d", "15090,15021",
	}
	if ex := excludeInboundPort(get(AnnotationStatusPort, "15020"), get(AnnotationExcludeInboundPorts, "")); ex != "" {
		args[len(args)-1] += "," + ex
	}
	if v, ok := annotations[AnnotationIncludeOutboundPorts]; ok {
		args = append(args, "-q", v)
	}
	if v, ok := annotations[AnnotationExcludeOutboundPorts]; ok {
		args = append(args, "-o", v)
	}
	if v, ok := annotations[AnnotationRerouteVirtualInterfaces]; ok {
		args = append(args, "-k", v)
	} else if v, ok := annotations[AnnotationKubevirtInterfaces]; ok {
		args = append(args, "-k", v)
	}
	if v, ok := annotations[AnnotationExcludeInterfaces]; ok {
		args = append(args, "-c", v)
	}
	return args
}

// excludeInboundPort is the template function of that name
// (pkg/kube/inject/template.go): the excluded ports with the status port
// appended unless already there or 0/empty.
func excludeInboundPort(port, excluded string) string {
	port = strings.TrimSpace(port)
	if port == "" || port == "0" {
		return excluded
	}
	var out []string
	for _, p := range strings.Split(excluded, ",") {
		if p == port {
			return excluded
		}
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(append(out, port), ",")
}

// Validate runs what Istio's istio-validation init container runs in a
// CNI-mode pod (`istio-iptables --run-validation --skip-rule-apply` with
// the pod's arguments, as uid/gid 1337): it passes only when the netns's
// rules redirect as the sidecar needs. The binary is copied where uid 1337
// can run it.
func Validate(t testing.TB, netnsPath string, annotations map[string]string) (string, error) {
	t.Helper()
	bin := Build(t)
	dir, err := os.MkdirTemp("", "ar-istio-validation-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "istio-iptables")
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := append([]string{"--net=" + netnsPath, "--setuid=1337", "--setgid=1337", "--", exe}, ArgsFor(annotations)...)
	cmd := exec.CommandContext(ctx, "nsenter", append(args, "--run-validation", "--skip-rule-apply")...)
	cmd.Env = []string{basePath}
	out, err := cmd.CombinedOutput()
	return string(out), err
}
