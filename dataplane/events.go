package dataplane

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// settleFor is how long a burst of kernel events must pause before we look.
const settleFor = 50 * time.Millisecond

// subscribe signals every netlink message of the groups that match
// selects (and every lost message), from a socket opened in a netns.
// Nothing runs between messages: reads park in the runtime's poller.
func subscribe(ctx context.Context, inNS iptables.InNS, proto int, groups []int, match func(syscall.NetlinkMessage) bool, log *zap.Logger) (<-chan struct{}, error) {
	fd := -1
	err := inNS(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, proto)
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return err
		}
		for _, g := range groups {
			if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, g); err != nil {
				return fmt.Errorf("join group %d: %w", g, err)
			}
		}
		return nil
	})
	if err != nil {
		if fd >= 0 {
			_ = unix.Close(fd)
		}
		return nil, fmt.Errorf("netlink subscription: %w", err)
	}
	f := os.NewFile(uintptr(fd), "netlink-events")
	out := make(chan struct{}, 1)
	signal := func() {
		select {
		case out <- struct{}{}:
		default:
		}
	}
	go func() {
		<-ctx.Done()
		_ = f.Close()
	}()
	go func() {
		defer close(out)
		buf := make([]byte, 1<<16)
		for {
			n, err := f.Read(buf)
			if errors.Is(err, unix.ENOBUFS) {
				signal() // messages were lost: look anyway
				continue
			}
			if err != nil {
				if ctx.Err() == nil {
					log.Info("netlink event socket closed", zap.Error(err))
				}
				return
			}
			msgs, err := syscall.ParseNetlinkMessage(buf[:n])
			if err != nil || slices.ContainsFunc(msgs, match) {
				signal()
			}
		}
	}()
	return out, nil
}

// settle waits until changes stop arriving for settleFor, so that a burst
// of them (an iptables-restore, a pod churn burst) costs one look. It returns false
// when ctx ends or changed closes.
func settle(ctx context.Context, changed <-chan struct{}) bool {
	select {
	case <-ctx.Done():
		return false
	case _, ok := <-changed:
		if !ok {
			return false
		}
	}
	t := time.NewTimer(settleFor)
	defer t.Stop()
	for {
		select {
		case <-changed:
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
}
