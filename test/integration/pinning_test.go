package integration

import (
	"bufio"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// lineStream is one long-lived connection that sends a line every 100 ms
// and expects each echoed within 2 s.
type lineStream struct {
	conn  net.Conn
	stop  chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	err   error
	lines int
}

func startLineStream(t *testing.T, ns, dst string) *lineStream {
	t.Helper()
	c, err := netnstest.Dial(ns, "tcp", dst, 2*time.Second)
	if err != nil {
		t.Fatalf("stream %s -> %s: %v", ns, dst, err)
	}
	s := &lineStream{conn: c, stop: make(chan struct{}), done: make(chan struct{})}
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
				s.fail(fmt.Errorf("echo of line %d: %q, %v", i, got, err))
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

func (s *lineStream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

func (s *lineStream) close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	_ = s.conn.Close()
}

// check requires the stream to be healthy and to have moved since last.
func (s *lineStream) check(t *testing.T, what string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		t.Fatalf("%s: stream broke: %v", what, s.err)
	}
	t.Logf("%s: stream healthy, %d lines echoed", what, s.lines)
}

// TestEnrolmentKeepsOpenConnections: connections open before a pod is
// enrolled keep flowing directly, both ways, while its new connections are
// captured; released, its captured connections keep their ztunnel.
func TestEnrolmentKeepsOpenConnections(t *testing.T) {
	n, z := oneNode(t, nil)
	a1, a2, p1 := n.ambient[0], n.ambient[1], n.plain[0]
	n.ambient = []*netnstest.Pod{a2} // a1 is not enrolled yet
	apply(t, n, n.state(true))

	out := startLineStream(t, a1.NS, ipPort(p1.IP, echoPort)) // a1 the client
	in := startLineStream(t, p1.NS, ipPort(a1.IP, echoPort))  // a1 the server
	time.Sleep(300 * time.Millisecond)
	out.check(t, "before enrolment")
	in.check(t, "before enrolment")

	n.ambient = []*netnstest.Pod{a1, a2}
	apply(t, n, n.state(true))
	// New connections are captured at once.
	before := len(z.all(t))
	roundTrip(t, a1.NS, ipPort(p1.IP, echoPort))
	if _, ok := z.find(t, func(r record.Record) bool {
		return r.Listener == 15001 && hostOf(r.Client) == a1.IP.String()
	}); !ok || len(z.all(t)) == before {
		t.Fatal("a new connection of the enrolled pod was not captured")
	}
	time.Sleep(5 * time.Second)
	out.check(t, "5s after enrolment")
	in.check(t, "5s after enrolment")

	// Captured before release, kept through its ztunnel after it.
	captured := startLineStream(t, a1.NS, ipPort(p1.IP, echoPort))
	time.Sleep(300 * time.Millisecond)
	n.ambient = []*netnstest.Pod{a2}
	apply(t, n, n.state(true))
	before = len(z.all(t))
	roundTrip(t, a1.NS, ipPort(p1.IP, echoPort))
	if got := z.all(t); len(got) != before {
		t.Fatalf("a released pod's new connection was captured: %+v", got[before:])
	}
	time.Sleep(5 * time.Second)
	captured.check(t, "5s after release")
	out.check(t, "5s after release")
	in.check(t, "5s after release")
}
