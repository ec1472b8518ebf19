//go:build linux

package realcluster

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// Runner is a testing.TB for code that runs outside a test (TestMain, the
// cluster command): the harness takes a testing.TB everywhere, as
// test/cluster does. Fatal* panics with a value Run recovers; Cleanup
// functions run (last first) in RunCleanups. Methods it does not implement
// (Setenv, Chdir, ...) panic.
type Runner struct {
	testing.TB // nil: only what is overridden below may be called

	name string
	out  io.Writer
	tmp  string

	mu       sync.Mutex
	cleanups []func()
	failed   bool
	n        int
}

type fatal struct{}

// NewRunner returns a Runner logging to out whose TempDir()s are under tmp.
func NewRunner(name, tmp string, out io.Writer) *Runner {
	return &Runner{name: name, out: out, tmp: tmp}
}

// Run calls f(r) and turns a Fatal into an error.
func (r *Runner) Run(f func(testing.TB)) (err error) {
	defer func() {
		if v := recover(); v != nil {
			if _, ok := v.(fatal); !ok {
				panic(v)
			}
			err = errors.New(r.name + ": failed (see log)")
		}
	}()
	f(r)
	return nil
}

// RunCleanups runs the registered cleanups, last first.
func (r *Runner) RunCleanups() {
	for {
		r.mu.Lock()
		if len(r.cleanups) == 0 {
			r.mu.Unlock()
			return
		}
		f := r.cleanups[len(r.cleanups)-1]
		r.cleanups = r.cleanups[:len(r.cleanups)-1]
		r.mu.Unlock()
		func() {
			defer func() {
				if v := recover(); v != nil {
					if _, ok := v.(fatal); !ok {
						r.Logf("cleanup panicked: %v", v)
					}
				}
			}()
			f()
		}()
	}
}

func (r *Runner) Helper()      {}
func (r *Runner) Name() string { return r.name }
func (r *Runner) Cleanup(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, f)
}
func (r *Runner) TempDir() string {
	r.mu.Lock()
	r.n++
	d := filepath.Join(r.tmp, fmt.Sprintf("%03d", r.n))
	r.mu.Unlock()
	if err := os.MkdirAll(d, 0o755); err != nil {
		r.Fatal(err)
	}
	return d
}
func (r *Runner) Log(args ...any)                 { fmt.Fprintln(r.out, args...) }
func (r *Runner) Logf(format string, args ...any) { fmt.Fprintf(r.out, format+"\n", args...) }
func (r *Runner) Error(args ...any)               { r.Fail(); r.Log(args...) }
func (r *Runner) Errorf(format string, args ...any) {
	r.Fail()
	r.Logf(format, args...)
}
func (r *Runner) Fatal(args ...any)                 { r.Error(args...); r.FailNow() }
func (r *Runner) Fatalf(format string, args ...any) { r.Errorf(format, args...); r.FailNow() }
func (r *Runner) Fail() {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
}
func (r *Runner) FailNow() { r.Fail(); panic(fatal{}) }
func (r *Runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}
func (r *Runner) Skipped() bool { return false }
