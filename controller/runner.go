package controller

import (
	"context"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/util/workqueue"
)

// syncRunner is the kernel loop, on client-go's rate-limited workqueue with
// one key: one sync at a time, any number of kicks coalesced (a kick during
// a sync makes one more after it); a failed sync is retried with the
// queue's doubling backoff (100ms up to maxBackoff), reset by a success;
// every resyncPeriod the dataplane is asked to read all its state back and
// the sync is a resync; when the kernel drifted under us (the dataplane
// queued the read-back of what drifted) the sync at once is a resync too.
// Start-up is a resync.
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

// syncKey is the queue's one key: the node.
const syncKey = "node"

// run syncs until ctx ends, and returns nil then.
func (r *syncRunner) run(ctx context.Context) error {
	q := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, r.maxBackoff),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "ambient-redirect-sync"})
	// resync says the next sync is one; the queue holds the key only.
	var resync atomic.Bool
	r.queueResync()
	resync.Store(true) // start-up is a full resync
	q.Add(syncKey)
	go r.feed(ctx, q, &resync)
	for {
		key, shutdown := q.Get()
		if shutdown {
			return nil
		}
		err := r.sync(ctx, resync.Swap(false))
		switch {
		case ctx.Err() != nil:
		case err != nil:
			r.log.Error("sync failed; will retry", zap.Error(err), zap.Int("retries", q.NumRequeues(key)))
			q.AddRateLimited(key)
		default:
			q.Forget(key)
		}
		q.Done(key)
	}
}

// feed turns kicks, drift and the resync period into queue adds, and shuts
// the queue down when ctx ends.
func (r *syncRunner) feed(ctx context.Context, q workqueue.TypedRateLimitingInterface[string], resync *atomic.Bool) {
	defer q.ShutDown()
	tick := time.NewTicker(r.resyncPeriod)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		case <-tick.C:
			r.queueResync()
			resync.Store(true)
		case <-r.driftKick:
			// The dataplane queued the read-back of what drifted itself;
			// the rest stays unread.
			resync.Store(true)
		}
		q.Add(syncKey)
	}
}
