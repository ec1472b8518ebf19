//go:build linux

// Package netnstest builds Kubernetes-node-shaped network namespaces, pods
// wired by the real ptp CNI plugin with host-local IPAM (as kindnet does),
// dual-stack by default, for root-only integration tests of the node
// traffic-redirection agent.
//
// Everything it creates lives in network namespaces it creates itself
// (bind-mounted under /var/run/netns, exactly like `ip netns add`); the root
// network namespace is never modified. All namespaces are deleted in
// t.Cleanup, and CleanupStale removes namespaces left over by crashed runs.
package netnstest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
)

// NetnsDir is where named network namespaces are bind-mounted (ip netns add).
const NetnsDir = "/var/run/netns"

// RequireRoot skips the test unless it runs with euid 0. When the environment
// variable CI is "true" the test fails instead of being skipped.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("netns tests must run as root in CI")
	}
	t.Skip("netns tests must run as root; skipping")
}

// NsPath returns the bind-mount path of the named network namespace.
func NsPath(ns string) string { return filepath.Join(NetnsDir, ns) }

// Exists reports whether the named network namespace exists under NetnsDir.
func Exists(ns string) bool {
	_, err := os.Lstat(NsPath(ns))
	return err == nil
}

func checkNSName(ns string) error {
	if ns == "" || ns == "." || ns == ".." || strings.ContainsRune(ns, '/') {
		return fmt.Errorf("netnstest: invalid namespace name %q (the root namespace cannot be targeted)", ns)
	}
	return nil
}

// PanicError carries a panic raised by the function passed to Do; Do
// re-panics with it in the calling goroutine after restoring the namespace.
type PanicError struct{ Value any }

func (p PanicError) Error() string { return fmt.Sprintf("panic in netns: %v", p.Value) }

// Do runs f on a dedicated, locked OS thread that has been switched into the
// named network namespace, then switches the thread back. Sockets created by
// f keep their namespace after Do returns. f must not rely on other
// goroutines it starts being in the namespace.
//
// If the original namespace cannot be restored the thread is left locked, so
// the Go runtime terminates it when the goroutine exits, rather than reusing
// a thread that sits in the wrong namespace.
func Do(ns string, f func() error) error {
	if err := checkNSName(ns); err != nil {
		return err
	}
	target, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("netnstest: open netns %q: %w", ns, err)
	}
	defer target.Close()

	type result struct {
		err      error
		panicked bool
		pv       any
	}
	resc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			resc <- result{err: fmt.Errorf("netnstest: get current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			// setns failed: the thread is still in its original namespace.
			runtime.UnlockOSThread()
			resc <- result{err: fmt.Errorf("netnstest: enter netns %q: %w", ns, err)}
			return
		}
		var res result
		func() {
			defer func() {
				if r := recover(); r != nil {
					res = result{panicked: true, pv: r}
				}
			}()
			res.err = f()
		}()
		if err := netns.Set(orig); err != nil {
			// Deliberately do NOT unlock: the goroutine exits while locked and
			// the runtime kills the thread.
			resc <- result{err: errors.Join(res.err, fmt.Errorf("netnstest: restore netns after %q: %w", ns, err))}
			return
		}
		runtime.UnlockOSThread()
		resc <- res
	}()
	res := <-resc
	if res.panicked {
		panic(PanicError{Value: res.pv})
	}
	return res.err
}

// SetSysctl writes a sysctl inside the named namespace. key may be dotted
// ("net.ipv4.ip_forward") or a path relative to /proc/sys
// ("net/ipv4/conf/eth0.100/rp_filter").
func SetSysctl(ns, key, value string) error {
	return Do(ns, func() error {
		return os.WriteFile(sysctlPath(key), []byte(value), 0o644)
	})
}

// GetSysctl reads a sysctl inside the named namespace (trimmed).
func GetSysctl(ns, key string) (string, error) {
	var out string
	err := Do(ns, func() error {
		b, err := os.ReadFile(sysctlPath(key))
		out = strings.TrimSpace(string(b))
		return err
	})
	return out, err
}

func sysctlPath(key string) string {
	if !strings.Contains(key, "/") {
		key = strings.ReplaceAll(key, ".", "/")
	}
	return filepath.Join("/proc/sys", key)
}

// checkLiteral refuses host names: resolving them may make the net package
// dial from helper goroutines that are not in the target namespace.
func checkLiteral(addr string) error {
	if addr == "" {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("netnstest: bad address %q: %w", addr, err)
	}
	if host == "" {
		return nil
	}
	if i := strings.IndexByte(host, '%'); i >= 0 {
		host = host[:i]
	}
	if net.ParseIP(host) == nil {
		return fmt.Errorf("netnstest: address %q must use an IP literal, not a host name", addr)
	}
	return nil
}
