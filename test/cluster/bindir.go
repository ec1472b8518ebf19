//go:build linux

package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

// Versions of the control plane built by hack/build-control-plane.sh. They
// must match the script: they name the cache directory.
const (
	KubernetesVersion = "v1.34.2"
	EtcdVersion       = "v3.6.5"
)

// Binary names inside BinDir.
const (
	EtcdBinary      = "etcd"
	APIServerBinary = "kube-apiserver"
	KubeProxyBinary = "kube-proxy"
	// The real cluster's (test/realcluster) node and controller binaries.
	KubeletBinary           = "kubelet"
	ControllerManagerBinary = "kube-controller-manager"
	SchedulerBinary         = "kube-scheduler"
	KubectlBinary           = "kubectl"
)

// binaries are what BinDir guarantees; a cache built before one of them was
// added lacks it and is completed by the build script.
var binaries = []string{EtcdBinary, APIServerBinary, KubeProxyBinary,
	KubeletBinary, ControllerManagerBinary, SchedulerBinary, KubectlBinary}

// BuildScript is the repository-relative path of the build script.
const BuildScript = "hack/build-control-plane.sh"

// DirEnv overrides the cache directory (same variable as the script).
const DirEnv = "AR_CONTROL_PLANE_DIR"

var binDirMu sync.Mutex

// CacheDir returns where hack/build-control-plane.sh puts the binaries:
// $AR_CONTROL_PLANE_DIR, else
// ${XDG_CACHE_HOME:-$HOME/.cache}/ambient-redirect/control-plane/k8s-<v>-etcd-<v>.
// It does not check that they exist.
func CacheDir() (string, error) {
	if d := os.Getenv(DirEnv); d != "" {
		return d, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home := os.Getenv("HOME")
		if home == "" {
			return "", errors.New("cluster: neither XDG_CACHE_HOME nor HOME is set")
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "ambient-redirect", "control-plane",
		"k8s-"+KubernetesVersion+"-etcd-"+EtcdVersion), nil
}

// BinDir returns the directory holding the etcd, kube-apiserver,
// kube-proxy, kubelet, kube-controller-manager, kube-scheduler and kubectl
// binaries. When any is missing it runs
// hack/build-control-plane.sh, which builds them from the Go module proxy
// (about 10 minutes cold on 2 cores) under a lock, so concurrent test
// binaries build only once.
func BinDir() (string, error) {
	binDirMu.Lock()
	defer binDirMu.Unlock()
	dir, err := CacheDir()
	if err != nil {
		return "", err
	}
	if binariesPresent(dir) {
		return dir, nil
	}
	script, err := findBuildScript()
	if err != nil {
		return "", fmt.Errorf("cluster: binaries missing in %s and %w", dir, err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("bash", script)
	cmd.Stdout = &stdout
	// The build is long: stream its progress so a waiting `go test -v`
	// shows why, and keep a copy for the error.
	cmd.Stderr = io.MultiWriter(&stderr, os.Stderr)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("cluster: %s failed: %w\n%s", script, err, tail(stderr.String(), 40))
	}
	out := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(out, '\n'); i >= 0 {
		out = out[i+1:]
	}
	if out != "" {
		dir = out
	}
	if !binariesPresent(dir) {
		return "", fmt.Errorf("cluster: %s succeeded but %s lacks one of %v", script, dir, binaries)
	}
	return dir, nil
}

func binariesPresent(dir string) bool {
	for _, b := range binaries {
		fi, err := os.Stat(filepath.Join(dir, b))
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}

// findBuildScript locates hack/build-control-plane.sh: next to this source
// file when it is known (no -trimpath), else in the first ancestor of the
// working directory holding go.mod (go test runs in the package directory).
func findBuildScript() (string, error) {
	var candidates []string
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		candidates = append(candidates, filepath.Join(filepath.Dir(file), "..", "..", BuildScript))
	}
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				candidates = append(candidates, filepath.Join(d, BuildScript))
				break
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return filepath.Clean(c), nil
		}
	}
	return "", fmt.Errorf("%s not found (looked at %v)", BuildScript, candidates)
}
