package controller

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// runnerCall is one sync the runner made, and the resync requests queued
// before it.
type runnerCall struct {
	resync bool
	queued int
	at     time.Time
}

// scriptedRunner is a syncRunner over a sync function that records its
// calls and fails while failing is set.
type scriptedRunner struct {
	r             *syncRunner
	kick, drift   chan struct{}
	calls         chan runnerCall
	mu            sync.Mutex
	queued, fails int
}

func newScriptedRunner(period, maxBackoff time.Duration, fails int) *scriptedRunner {
	s := &scriptedRunner{kick: make(chan struct{}, 1), drift: make(chan struct{}, 1), calls: make(chan runnerCall, 100), fails: fails}
	s.r = &syncRunner{
		sync: func(_ context.Context, resync bool) error {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.calls <- runnerCall{resync: resync, queued: s.queued, at: time.Now()}
			s.queued = 0
			if s.fails > 0 {
				s.fails--
				return errors.New("scripted failure")
			}
			return nil
		},
		queueResync: func() { s.mu.Lock(); s.queued++; s.mu.Unlock() },
		kick:        s.kick, driftKick: s.drift,
		resyncPeriod: period, maxBackoff: maxBackoff, log: zap.NewNop(),
	}
	return s
}

func (s *scriptedRunner) next(t *testing.T, what string) runnerCall {
	t.Helper()
	select {
	case c := <-s.calls:
		return c
	case <-time.After(5 * time.Second):
		t.Fatalf("no sync: %s", what)
	}
	return runnerCall{}
}

func (s *scriptedRunner) none(t *testing.T, what string, d time.Duration) {
	t.Helper()
	select {
	case c := <-s.calls:
		t.Fatalf("%s: unexpected sync %+v", what, c)
	case <-time.After(d):
	}
}

// TestSyncRunnerKicksAndResyncs: start-up is a resync with a full read-back
// queued; a kick is a plain sync; a drift kick is a resync whose read-back
// the dataplane queued (of what drifted); the runner returns nil when ctx
// ends.
func TestSyncRunnerKicksAndResyncs(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s := newScriptedRunner(time.Hour, time.Second, 0)
	done := make(chan error, 1)
	go func() { done <- s.r.run(ctx) }()
	for _, step := range []struct {
		name           string
		do             func()
		resync, queued bool
	}{
		{"start-up", func() {}, true, true},
		{"kick", func() { s.kick <- struct{}{} }, false, false},
		// The dataplane queues the read-back of what drifted itself.
		{"drift", func() { s.drift <- struct{}{} }, true, false},
		{"kick again", func() { s.kick <- struct{}{} }, false, false},
	} {
		step.do()
		c := s.next(t, step.name)
		if c.resync != step.resync || (c.queued == 1) != step.queued || c.queued > 1 {
			t.Fatalf("%s: sync %+v, want resync=%v, a full read-back queued=%v", step.name, c, step.resync, step.queued)
		}
		s.none(t, step.name+": a second sync", 20*time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return when ctx ended")
	}
}

// TestSyncRunnerPeriodicResync: every period the sync is a resync.
func TestSyncRunnerPeriodicResync(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScriptedRunner(30*time.Millisecond, time.Second, 0)
	go func() { _ = s.r.run(ctx) }()
	s.next(t, "start-up")
	for i := range 2 {
		if c := s.next(t, "period"); !c.resync || c.queued != 1 {
			t.Fatalf("periodic sync %d: %+v", i, c)
		}
	}
}

// TestSyncRunnerBackoff: a failed sync is retried without a kick after
// 100ms, then after double that up to maxBackoff; a success resets it.
func TestSyncRunnerBackoff(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScriptedRunner(time.Hour, 150*time.Millisecond, 3)
	go func() { _ = s.r.run(ctx) }()
	first := s.next(t, "start-up (fails)")
	second := s.next(t, "first retry (fails)")
	third := s.next(t, "second retry (fails)")
	fourth := s.next(t, "third retry (works)")
	for i, tc := range []struct {
		from, to runnerCall
		min      time.Duration
		max      time.Duration
	}{
		{first, second, 100 * time.Millisecond, 190 * time.Millisecond},
		{second, third, 150 * time.Millisecond, 290 * time.Millisecond}, // 200ms bounded by maxBackoff
		{third, fourth, 150 * time.Millisecond, 290 * time.Millisecond},
	} {
		if d := tc.to.at.Sub(tc.from.at); d < tc.min || d > tc.max {
			t.Errorf("retry %d after %v, want %v..%v", i+1, d, tc.min, tc.max)
		}
		if tc.to.resync {
			t.Errorf("retry %d is a resync", i+1)
		}
	}
	s.none(t, "after a success, no retry", 250*time.Millisecond)
}
