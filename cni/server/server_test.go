package server_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/cni/cnitest"
	"github.com/ambient-redirect/ambient-redirect/cni/server"
)

func TestCallRoundTrip(t *testing.T) {
	agent := &cnitest.Agent{Answer: func(_ context.Context, req cni.Request) (cni.Response, error) {
		return cni.Response{Ambient: true, Programmed: true, Reason: "enrolled " + req.PodName}, nil
	}}
	sock := cnitest.Serve(t, agent)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	if fi, err := os.Stat(filepath.Dir(sock)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket dir mode = %v (%v), want 0700", fi.Mode().Perm(), err)
	}
	req := cni.Request{
		Command: cni.CommandAdd, ContainerID: "c1", NetNS: "/var/run/netns/x", IfName: "eth0",
		PodNamespace: "ns", PodName: "p", PodUID: "u",
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")},
	}
	resp, err := cni.Call(context.Background(), sock, req)
	if err != nil {
		t.Fatal(err)
	}
	if want := (cni.Response{Ambient: true, Programmed: true, Reason: "enrolled p"}); resp != want {
		t.Errorf("response = %+v, want %+v", resp, want)
	}
	if got := agent.Requests(); len(got) != 1 || !reflect.DeepEqual(got[0], req) {
		t.Errorf("agent got %+v, want %+v", got, req)
	}
}

func TestCallAgentError(t *testing.T) {
	sock := cnitest.Serve(t, &cnitest.Agent{Answer: func(context.Context, cni.Request) (cni.Response, error) {
		return cni.Response{}, errors.New("ztunnel not ready")
	}})
	_, err := cni.Call(context.Background(), sock, cni.Request{Command: cni.CommandAdd, PodNamespace: "ns", PodName: "p"})
	var ae *cni.AgentError
	if !errors.As(err, &ae) || ae.Message != "ztunnel not ready" || ae.StatusCode != 500 {
		t.Fatalf("Call() error = %v; want an AgentError with the handler's text", err)
	}
	if cni.IsUnreachable(err) {
		t.Error("an agent that answered is unreachable")
	}
	_, err = cni.Call(context.Background(), sock, cni.Request{Command: "GC"})
	if !errors.As(err, &ae) || ae.StatusCode != 400 || !strings.Contains(ae.Message, "GC") {
		t.Errorf("unknown command: %v; want HTTP 400 naming it", err)
	}
}

func TestIsUnreachable(t *testing.T) {
	dir := filepath.Dir(cnitest.SocketPath(t))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.sock")
	_, err := cni.Call(context.Background(), missing, cni.Request{Command: cni.CommandAdd})
	if !cni.IsUnreachable(err) {
		t.Errorf("missing socket: IsUnreachable(%v) = false", err)
	}
	// A socket file nobody listens on: what a crashed agent leaves.
	dead := filepath.Join(dir, "dead.sock")
	ln, err := net.Listen("unix", dead)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	_, err = cni.Call(context.Background(), dead, cni.Request{Command: cni.CommandAdd})
	if !cni.IsUnreachable(err) {
		t.Errorf("socket without listener: IsUnreachable(%v) = false", err)
	}
	if cni.IsUnreachable(nil) {
		t.Error("IsUnreachable(nil)")
	}
}

// A slow agent times out, and that is not "unreachable"; the handler sees
// the plugin give up.
func TestCallTimeout(t *testing.T) {
	gaveUp := make(chan struct{})
	sock := cnitest.Serve(t, &cnitest.Agent{Answer: func(ctx context.Context, _ cni.Request) (cni.Response, error) {
		<-ctx.Done()
		close(gaveUp)
		return cni.Response{}, ctx.Err()
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := cni.Call(ctx, sock, cni.Request{Command: cni.CommandAdd})
	if !errors.Is(err, context.DeadlineExceeded) || cni.IsUnreachable(err) {
		t.Errorf("Call() error = %v; want a deadline, not unreachable", err)
	}
	select {
	case <-gaveUp:
	case <-time.After(5 * time.Second):
		t.Error("the handler's context was not cancelled when the client went away")
	}
}

func TestListenStaleSocket(t *testing.T) {
	path := cnitest.SocketPath(t)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	// A live listener is not stale.
	if _, err := server.Listen(path); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Errorf("Listen() over a live socket = %v", err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	srv, err := server.Listen(path)
	if err != nil {
		t.Fatalf("Listen() over a stale socket: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, &cnitest.Agent{}, nil) }()
	if _, err := cni.Call(context.Background(), path, cni.Request{Command: cni.CommandDel}); err != nil {
		t.Errorf("Call() to the new server: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve() = %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after Serve returned: %v", err)
	}
	// A regular file is not ours to delete.
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Listen(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen() over a regular file = %v", err)
	}
}
