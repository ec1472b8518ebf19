//go:build linux

package cluster

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
)

// NetnsDir is where `ip netns add` creates named network namespaces.
const NetnsDir = "/var/run/netns"

// DialFunc matches rest.Config.Dial and http.Transport.DialContext.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// NetnsDialer returns a DialFunc whose sockets are created inside the named
// network namespace (/var/run/netns/<ns>), so a process living in another
// namespace (the test binary, in the root namespace) can reach addresses that
// exist only there. A socket stays in the namespace it was created in, so the
// returned connection is usable from any goroutine.
//
// Each dial runs on a fresh goroutine locked to its OS thread: the thread
// enters ns, dials, and returns to its original namespace. If returning
// fails, the thread is left locked so the Go runtime discards it instead of
// reusing a thread stuck in the wrong namespace. Addresses should be IP
// literals: name resolution would run on other threads, in the root
// namespace.
func NetnsDialer(ns string) DialFunc {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		type result struct {
			conn net.Conn
			err  error
		}
		ch := make(chan result, 1)
		go func() {
			conn, err := dialInNetns(ctx, ns, network, address)
			ch <- result{conn, err}
		}()
		select {
		case r := <-ch:
			return r.conn, r.err
		case <-ctx.Done():
			// The dial honours ctx too; close whatever it may still yield.
			go func() {
				if r := <-ch; r.conn != nil {
					_ = r.conn.Close()
				}
			}()
			return nil, ctx.Err()
		}
	}
}

// dialInNetns must run on its own goroutine: it may leave that goroutine's
// thread locked (see NetnsDialer).
func dialInNetns(ctx context.Context, ns, network, address string) (net.Conn, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("cluster: dial %s in netns %s: current netns: %w", address, ns, err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(filepath.Join(NetnsDir, ns))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("cluster: dial %s in netns %s: %w", address, ns, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		// setns failed: the thread is still in orig, but be conservative
		// only if we cannot confirm that.
		if cur, gerr := netns.Get(); gerr == nil {
			same := cur.Equal(orig)
			cur.Close()
			if same {
				runtime.UnlockOSThread()
			}
		}
		return nil, fmt.Errorf("cluster: dial %s: enter netns %s: %w", address, ns, err)
	}
	var d net.Dialer
	conn, dialErr := d.DialContext(ctx, network, address)
	if err := netns.Set(orig); err != nil {
		// Keep the thread locked: when this goroutine exits the runtime
		// terminates the thread rather than reuse it in the wrong netns.
		if conn != nil {
			_ = conn.Close()
		}
		return nil, fmt.Errorf("cluster: dial %s: restore netns after dialing in %s: %w", address, ns, err)
	}
	runtime.UnlockOSThread()
	if dialErr != nil {
		return nil, fmt.Errorf("cluster: dial %s %s in netns %s: %w", network, address, ns, dialErr)
	}
	return conn, nil
}
