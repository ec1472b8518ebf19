package controller

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// syncRunner is the kernel loop: one sync at a time, coalescing any number
// of kicks; a failed sync is retried with a doubling backoff (100ms up to
// maxBackoff); every resyncPeriod the dataplane is asked to read all its
// state back and the sync is a resync; when the kernel drifted under us
// (the dataplane queued the read-back of what drifted) the sync at once is
// a resync too. Start-up is a resync.
type syncRunner struct {
	// sync makes one sync; resync says the dataplane reads back first.
	sync func(ctx context.Context, resync bool) error
	// queueResync asks the dataplane to read its state back at its next
	// apply.
	queueResync func()
	// kick asks for a sync; driftKick for a resync at once.
	kick, driftKick <-chan struct{}
	resyncPeriod    time.Duration
	maxBackoff      time.Duration
	log             *zap.Logger
}

// run syncs until ctx ends, and returns nil then.
func (r *syncRunner) run(ctx context.Context) error {
	resync := time.NewTicker(r.resyncPeriod)
	defer resync.Stop()
	var retry <-chan time.Time
	backoff := 100 * time.Millisecond
	isResync := true // startup is a full resync
	r.queueResync()
	for {
		err := r.sync(ctx, isResync)
		isResync = false
		if err != nil {
			r.log.Error("sync failed; will retry", zap.Error(err), zap.Duration("backoff", backoff))
			retry = time.After(backoff)
			backoff = min(backoff*2, r.maxBackoff)
		} else {
			retry, backoff = nil, 100*time.Millisecond
		}
		select {
		case <-ctx.Done():
			return nil
		case <-r.kick:
		case <-retry:
		case <-resync.C:
			r.queueResync()
			isResync = true
		case <-r.driftKick:
			// The dataplane queued the read-back of what drifted (its
			// netlink objects) itself; the iptables chains stay unread.
			isResync = true
		}
	}
}
