package netnstest

import (
	"bufio"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

// LineStream is one long-lived connection that sends a line every 100 ms
// and expects each echoed within 2 s.
type LineStream struct {
	conn  net.Conn
	stop  chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	err   error
	lines int
}

func StartLineStream(t testing.TB, ns, dst string) *LineStream {
	t.Helper()
	c, err := Dial(ns, "tcp", dst, 2*time.Second)
	if err != nil {
		t.Fatalf("stream %s -> %s: %v", ns, dst, err)
	}
	s := &LineStream{conn: c, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		r := bufio.NewReader(c)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			line := fmt.Sprintf("line %d\n", i)
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte(line)); err != nil {
				s.fail(fmt.Errorf("write %d: %w", i, err))
				return
			}
			got, err := r.ReadString('\n')
			if err != nil || got != line {
				s.fail(fmt.Errorf("echo of line %d: %q: %w", i, got, err))
				return
			}
			s.mu.Lock()
			s.lines++
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() { s.close() })
	return s
}

func (s *LineStream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

// Failed returns the stream's error, nil while it is healthy.
func (s *LineStream) Failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *LineStream) close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	_ = s.conn.Close()
}

// Check requires the stream to be healthy and to have moved since last.
func (s *LineStream) Check(t testing.TB, what string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		t.Fatalf("%s: stream broke: %v", what, s.err)
	}
	t.Logf("%s: stream healthy, %d lines echoed", what, s.lines)
}
