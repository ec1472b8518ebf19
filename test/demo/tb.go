package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// demoT lets a main package drive the e2e harness, which takes testing.TB.
// testing.TB has a private method, so it is embedded (nil) and every method
// is overridden. Cleanups run LIFO in runCleanups; Fatal, Skip and an
// interrupt unwind the caller with a panic(abort) that run and runCleanups
// recover.
type demoT struct {
	testing.TB // nil; only satisfies the interface's private method

	base    string // parent of every TempDir; removed by the caller at exit
	verbose bool

	mu       sync.Mutex
	cleanups []func()
	cleaning bool
	failed   bool
	logs     []string
	ndir     int

	interrupted atomic.Bool
	ctx         context.Context
	cancel      context.CancelFunc
}

// abort is the panic value that ends a step (Fatal, Skip, interrupt).
type abort struct{}

func newDemoT(base string, verbose bool) *demoT {
	ctx, cancel := context.WithCancel(context.Background())
	return &demoT{base: base, verbose: verbose, ctx: ctx, cancel: cancel}
}

// interrupt makes the next harness call (they all start with Helper) unwind.
func (t *demoT) interrupt() { t.interrupted.Store(true) }

func (t *demoT) isCleaning() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cleaning
}

func (t *demoT) Helper() {
	if t.interrupted.Load() && !t.isCleaning() {
		panic(abort{})
	}
}

func (t *demoT) Log(args ...any) { t.log(fmt.Sprintln(args...)) }
func (t *demoT) Logf(format string, args ...any) {
	t.log(fmt.Sprintf(format, args...))
}

// log keeps every line for a failure report; -v prints them as they come.
func (t *demoT) log(s string) {
	s = strings.TrimRight(s, "\n")
	t.mu.Lock()
	t.logs = append(t.logs, s)
	t.mu.Unlock()
	if t.verbose {
		fmt.Fprintf(os.Stderr, "    | %s\n", strings.ReplaceAll(s, "\n", "\n    | "))
	}
}

func (t *demoT) Error(args ...any) { t.fail(fmt.Sprint(args...)) }
func (t *demoT) Errorf(format string, args ...any) {
	t.fail(fmt.Sprintf(format, args...))
}
func (t *demoT) Fail() { t.fail("") }
func (t *demoT) FailNow() {
	t.fail("")
	panic(abort{})
}
func (t *demoT) Fatal(args ...any) {
	t.fail(fmt.Sprint(args...))
	panic(abort{})
}
func (t *demoT) Fatalf(format string, args ...any) {
	t.fail(fmt.Sprintf(format, args...))
	panic(abort{})
}

func (t *demoT) fail(msg string) {
	t.mu.Lock()
	t.failed = true
	t.mu.Unlock()
	if msg != "" {
		fmt.Fprintf(os.Stderr, "demo: error: %s\n", msg)
	}
}

func (t *demoT) Failed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failed
}

func (t *demoT) Skip(args ...any) { t.Fatal(args...) }
func (t *demoT) Skipf(format string, args ...any) {
	t.Fatalf(format, args...)
}
func (t *demoT) SkipNow()               { t.FailNow() }
func (t *demoT) Skipped() bool          { return false }
func (t *demoT) Name() string           { return "ambient-redirect-demo" }
func (t *demoT) Attr(key, value string) {}
func (t *demoT) Output() io.Writer      { return logWriter{t} }
func (t *demoT) Context() context.Context {
	return t.ctx
}
func (t *demoT) ArtifactDir() string { return t.TempDir() }

func (t *demoT) Setenv(key, value string) {
	old, had := os.LookupEnv(key)
	if err := os.Setenv(key, value); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if had {
			_ = os.Setenv(key, old)
		} else {
			_ = os.Unsetenv(key)
		}
	})
}

func (t *demoT) Chdir(dir string) {
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
}

// TempDir is a fresh directory under base (removed as a whole at exit).
func (t *demoT) TempDir() string {
	t.mu.Lock()
	t.ndir++
	n := t.ndir
	t.mu.Unlock()
	dir, err := os.MkdirTemp(t.base, fmt.Sprintf("%03d-", n))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// Cleanup registers f; once cleanups are running, f runs at once.
func (t *demoT) Cleanup(f func()) {
	t.mu.Lock()
	if t.cleaning {
		t.mu.Unlock()
		t.runOne(f)
		return
	}
	t.cleanups = append(t.cleanups, f)
	t.mu.Unlock()
}

// runCleanups runs every cleanup, newest first, each protected so that a
// failing one does not skip the rest.
func (t *demoT) runCleanups() {
	t.mu.Lock()
	t.cleaning = true
	t.mu.Unlock()
	t.cancel()
	for {
		t.mu.Lock()
		if len(t.cleanups) == 0 {
			t.mu.Unlock()
			return
		}
		f := t.cleanups[len(t.cleanups)-1]
		t.cleanups = t.cleanups[:len(t.cleanups)-1]
		t.mu.Unlock()
		t.runOne(f)
	}
}

func (t *demoT) runOne(f func()) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(abort); !ok {
				t.fail(fmt.Sprintf("cleanup panicked: %v\n%s", r, debug.Stack()))
			}
		}
	}()
	f()
}

// logs returns everything logged so far.
func (t *demoT) allLogs() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.logs...)
}

type logWriter struct{ t *demoT }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.log(string(p))
	return len(p), nil
}

// softT is handed to the harness for control commands: a failure there is
// reported to the caller instead of ending the demo. Cleanups and temp dirs
// belong to the demo.
type softT struct {
	*demoT
	msgs []string
}

type softAbort struct{}

func (s *softT) Helper() {}
func (s *softT) Error(args ...any) {
	s.msgs = append(s.msgs, fmt.Sprint(args...))
}
func (s *softT) Errorf(format string, args ...any) {
	s.msgs = append(s.msgs, fmt.Sprintf(format, args...))
}
func (s *softT) Fail() { s.msgs = append(s.msgs, "failed") }
func (s *softT) FailNow() {
	s.Fail()
	panic(softAbort{})
}
func (s *softT) Fatal(args ...any) {
	s.Error(args...)
	panic(softAbort{})
}
func (s *softT) Fatalf(format string, args ...any) {
	s.Errorf(format, args...)
	panic(softAbort{})
}
func (s *softT) Failed() bool { return len(s.msgs) > 0 }
func (s *softT) Skip(args ...any) {
	s.Fatal(args...)
}
func (s *softT) Skipf(format string, args ...any) {
	s.Fatalf(format, args...)
}
func (s *softT) SkipNow() { s.FailNow() }

// try runs f with a softT and returns its failure, if any.
func (t *demoT) try(f func(testing.TB)) (err error) {
	s := &softT{demoT: t}
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(softAbort); !ok {
				panic(r)
			}
		}
		if len(s.msgs) > 0 {
			err = fmt.Errorf("%s", strings.Join(s.msgs, "; "))
		}
	}()
	f(s)
	return nil
}
