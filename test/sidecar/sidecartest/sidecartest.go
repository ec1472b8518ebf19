//go:build linux

// Package sidecartest runs the sidecar test proxy (test/sidecar/proxy) in a
// test pod's network namespace as Istio's sidecar identity, uid/gid 1337,
// and makes bare network namespaces for tests that need no cluster.
//
//	bin, err := sidecartest.BuildProxy(dir)          // once, e.g. in TestMain
//	p := sidecartest.StartProxy(t, ns, bin, sidecartest.ProxyOptions{})
//	... connect from the app ...
//	recs := p.WaitRecords(t, 1, 5*time.Second)      // []record.Record
package sidecartest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/record"
)

// ProxyUID and ProxyGID are Istio's default sidecar identity, the one the
// pod's capture rules exempt.
const (
	ProxyUID = 1337
	ProxyGID = 1337
)

// ProxyPkg is the proxy's import path.
const ProxyPkg = "github.com/ambient-redirect/ambient-redirect/test/sidecar/proxy"

// BuildProxy builds test-sidecar-proxy into dir (which it makes readable
// and searchable by all: the proxy runs as uid 1337, so dir and its parents
// must be searchable by that user; os.MkdirTemp("", ...) under /tmp is) and
// returns the binary's path.
func BuildProxy(dir string) (string, error) {
	bin := filepath.Join(dir, "test-sidecar-proxy")
	if out, err := exec.Command("go", "build", "-o", bin, ProxyPkg).CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %v\n%s", ProxyPkg, err, out)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	return bin, nil
}

// ProxyOptions configure StartProxy.
type ProxyOptions struct {
	// UID and GID the proxy runs as; 0 means 1337 (it never runs as root).
	UID, GID uint32
	// TPROXY passes --tproxy and gives the proxy CAP_NET_ADMIN as an
	// ambient capability (IP_TRANSPARENT needs it; Istio's injector adds
	// NET_ADMIN to the sidecar in TPROXY mode).
	TPROXY bool
	// DNSPort, when not 0, passes --dns-port (15053 is istio-agent's).
	DNSPort int
	// Args are further flags (e.g. --inbound-source=127.0.0.6).
	Args []string
}

// Proxy is a running test proxy.
type Proxy struct {
	// RecordFile holds its records (record.Read); LogPath its stderr.
	RecordFile, LogPath string

	cmd      *exec.Cmd
	done     chan struct{}
	waitErr  error
	stopOnce sync.Once
}

// StartProxy starts bin in the named network namespace as o.UID/o.GID
// (SysProcAttr.Credential; with CAP_NET_ADMIN as an ambient capability when
// o.TPROXY) and waits until its listeners are bound. It is stopped in
// t.Cleanup (its log is printed if the test failed) and killed if the test
// process dies.
func StartProxy(t testing.TB, ns, bin string, o ProxyOptions) *Proxy {
	t.Helper()
	uid, gid := o.UID, o.GID
	if uid == 0 {
		uid = ProxyUID
	}
	if gid == 0 {
		gid = ProxyGID
	}
	// The proxy writes its record and ready files as uid; t.TempDir() is
	// root's 0700, so it gets a directory of its own.
	dir, err := os.MkdirTemp("", "ar-sidecar-proxy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chown(dir, int(uid), int(gid)); err != nil {
		t.Fatal(err)
	}
	p := &Proxy{RecordFile: filepath.Join(dir, "records.jsonl"), LogPath: filepath.Join(dir, "proxy.log"), done: make(chan struct{})}
	ready := filepath.Join(dir, "ready")
	logf, err := os.Create(p.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child has its own copy
	args := []string{"--record-file", p.RecordFile, "--ready-file", ready}
	if o.TPROXY {
		args = append(args, "--tproxy")
	}
	if o.DNSPort != 0 {
		args = append(args, "--dns-port", strconv.Itoa(o.DNSPort))
	}
	args = append(args, o.Args...)
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uid, Gid: gid},
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
	}
	if o.TPROXY {
		cmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_NET_ADMIN}
	}
	// The child inherits the network namespace of the thread that forks it.
	if err := netnstest.Do(ns, cmd.Start); err != nil {
		t.Fatalf("sidecartest: start %s in %s: %v", bin, ns, err)
	}
	p.cmd = cmd
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("log of test-sidecar-proxy (pid %d) in %s:\n%s", cmd.Process.Pid, ns, p.Log())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("sidecartest: proxy exited before ready: %v\n%s", p.waitErr, p.Log())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecartest: proxy not ready after 10s\n%s", p.Log())
		}
	}
}

// Stop sends SIGTERM, waits up to 5s, then SIGKILLs. Idempotent.
func (p *Proxy) Stop() {
	p.stopOnce.Do(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
				_ = p.cmd.Process.Signal(syscall.SIGKILL)
				<-p.done
			}
		}
	})
}

// Log returns the proxy's output so far.
func (p *Proxy) Log() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("<read %s: %v>", p.LogPath, err)
	}
	return string(b)
}

// Records returns the records so far.
func (p *Proxy) Records(t testing.TB) []record.Record {
	t.Helper()
	recs, err := record.Read(p.RecordFile)
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// WaitRecords waits until there are at least n records and returns them all.
func (p *Proxy) WaitRecords(t testing.TB, n int, timeout time.Duration) []record.Record {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		recs := p.Records(t)
		if len(recs) >= n {
			return recs
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecartest: %d records after %v, want %d: %+v", len(recs), timeout, n, recs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// NewNetns creates a bare network namespace ("arsc" + 8 hex digits) with lo
// up and returns its name; it is deleted in t.Cleanup, whatever the outcome
// (cleanups registered later, e.g. processes in it, run first).
func NewNetns(t testing.TB) string {
	t.Helper()
	netnstest.RequireRoot(t)
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	name := "arsc" + hex.EncodeToString(b[:])
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil && netnstest.Exists(name) {
			t.Errorf("ip netns delete %s: %v: %s", name, err, out)
		}
	})
	netnstest.Exec(t, name, "ip", "link", "set", "lo", "up")
	// Without DAD, IPv6 addresses are usable at once.
	for _, k := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := netnstest.SetSysctl(name, k, "0"); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
	return name
}
