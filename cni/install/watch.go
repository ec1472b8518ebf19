package install

import (
	"context"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// settle is how long Watch lets a burst of changes in ConfDir go quiet
// before it looks: a plugin writing its file in place is seen once, whole.
const settle = 100 * time.Millisecond

// Watch keeps the plugin installed until ctx ends: the primary plugin may
// rewrite its conflist without our entry (kindnet does when it starts), and
// until the entry is back, new pods start uncaptured. It re-runs the install
// at once, when ConfDir changes (inotify) and every period (in case inotify is
// unavailable or missed something), and logs each re-insert. Errors are
// logged when they first occur and when they clear; Watch keeps going.
// A period <= 0 is one second. Stop Watch (cancel ctx and wait for it to
// return) before Uninstall.
func (in *Installer) Watch(ctx context.Context, period time.Duration) {
	if period <= 0 {
		period = time.Second
	}
	log := in.log().With(zap.String("confDir", in.ConfDir))
	changes := make(chan struct{}, 1)
	if stop, err := notify(in.ConfDir, changes); err != nil {
		log.Warn("not watching the CNI conf dir; checking it by polling only", zap.Error(err), zap.Duration("period", period))
	} else {
		defer stop()
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	wait := time.NewTimer(settle)
	wait.Stop()
	lastErr := ""
	check := func() {
		changed, err := in.install(false)
		in.record(err)
		switch {
		case err != nil && err.Error() != lastErr:
			log.Warn("cannot keep the ambient-redirect CNI plugin installed; retrying", zap.Error(err))
			lastErr = err.Error()
		case err == nil && lastErr != "":
			log.Info("the ambient-redirect CNI plugin is installed again")
			lastErr = ""
		}
		if changed {
			log.Info("re-installed the ambient-redirect CNI plugin after a change on the node")
		}
	}
	// After the watch is set up, so that no change goes unseen.
	check()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changes:
			wait.Reset(settle)
		case <-wait.C:
			check()
		case <-tick.C:
			check()
		}
	}
}

// notify signals changes (non-blocking, coalesced) whenever an entry of dir
// is created, written, renamed or removed, until stop is called.
func notify(dir string, changes chan<- struct{}) (stop func(), err error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	const mask = unix.IN_CREATE | unix.IN_CLOSE_WRITE | unix.IN_MODIFY | unix.IN_MOVED_TO |
		unix.IN_MOVED_FROM | unix.IN_DELETE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ATTRIB
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("inotify_add_watch "+dir, err)
	}
	// A non-blocking fd in an *os.File goes through the runtime poller, so
	// Close wakes the Read below.
	f := os.NewFile(uintptr(fd), "inotify")
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
		for {
			if _, err := f.Read(buf); err != nil {
				// Closed by stop, or broken: the periodic check carries on.
				return
			}
			select {
			case changes <- struct{}{}:
			default:
			}
		}
	}()
	return func() { f.Close(); <-done }, nil
}
