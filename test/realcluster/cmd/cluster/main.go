//go:build linux

// Command cluster brings the real cluster of test/realcluster up with the
// agent installed, and removes it (hack/cluster/up.sh, down.sh).
//
//	cluster up [--dir D] [--nodes N]   # start a supervisor in the background; return once installed
//	cluster down [--dir D]             # stop it and remove everything it made
//	cluster serve [--dir D] [--nodes N] # the supervisor (foreground)
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/realcluster"
)

const defaultDir = "/var/tmp/ambient-redirect-cluster"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cluster up|down|serve [--dir D] [--nodes N]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	dir := fs.String("dir", defaultDir, "work directory (state, nodes, logs)")
	nodes := fs.Int("nodes", 2, "number of nodes")
	repo := fs.String("repo", ".", "module root")
	_ = fs.Parse(os.Args[2:])
	absRepo, err := filepath.Abs(*repo)
	if err != nil {
		fail(err)
	}
	switch cmd {
	case "up":
		fail(up(*dir, *nodes, absRepo))
	case "down":
		fail(down(*dir))
	case "serve":
		fail(serve(*dir, *nodes, absRepo))
	default:
		fail(fmt.Errorf("unknown command %q", cmd))
	}
}

func fail(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
}

func readyFile(dir string) string { return dir + ".ready" }
func logFile(dir string) string   { return dir + ".log" }

// up starts `serve` detached and waits for its ready file (or its exit).
func up(dir string, nodes int, repo string) error {
	if st, _ := realcluster.LoadState(dir); st != nil && st.Supervisor > 0 && syscall.Kill(st.Supervisor, 0) == nil {
		return fmt.Errorf("a cluster is already running from %s (pid %d): run hack/cluster/down.sh first", dir, st.Supervisor)
	}
	os.Remove(readyFile(dir))
	self, err := os.Executable()
	if err != nil {
		return err
	}
	logf, err := os.Create(logFile(dir))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(self, "serve", "--dir", dir, "--nodes", fmt.Sprint(nodes), "--repo", repo)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fmt.Fprintf(os.Stderr, "cluster: starting (log: %s)\n", logFile(dir))
	var off int64
	for {
		off = copyNew(logFile(dir), off, os.Stderr)
		select {
		case err := <-exited:
			copyNew(logFile(dir), off, os.Stderr)
			return fmt.Errorf("cluster supervisor exited: %v", err)
		case <-time.After(500 * time.Millisecond):
		}
		if b, err := os.ReadFile(readyFile(dir)); err == nil {
			copyNew(logFile(dir), off, os.Stderr)
			fmt.Print(string(b))
			return nil
		}
	}
}

func copyNew(path string, off int64, w io.Writer) int64 {
	f, err := os.Open(path)
	if err != nil {
		return off
	}
	defer f.Close()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return off
	}
	n, _ := io.Copy(w, f)
	return off + n
}

// serve brings the cluster up, installs the agent and a demo, writes the
// ready file and runs until SIGTERM/SIGINT, then tears everything down.
func serve(dir string, nodes int, repo string) error {
	r := realcluster.NewRunner("cluster", filepath.Join(dir, "tmp"), os.Stderr)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer r.RunCleanups()
	err := r.Run(func(t testing.TB) {
		c := realcluster.Start(t, realcluster.Options{Dir: dir, Nodes: nodes, Repo: repo})
		c.State.Supervisor = os.Getpid()
		if err := c.SaveState(); err != nil {
			t.Fatal(err)
		}
		summary := realcluster.Demo(t, c)
		if err := os.WriteFile(readyFile(dir), []byte(summary), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if err != nil {
		return err
	}
	<-sig
	fmt.Fprintln(os.Stderr, "cluster: tearing down")
	return nil
}

// down stops the supervisor (it tears down) and then removes whatever is
// left, also when the supervisor was killed.
func down(dir string) error {
	st, err := realcluster.LoadState(dir)
	if err != nil {
		return err
	}
	defer os.Remove(readyFile(dir))
	if st == nil {
		os.Remove(logFile(dir))
		fmt.Fprintf(os.Stderr, "cluster: nothing to remove in %s\n", dir)
		return nil
	}
	if pid := st.Supervisor; pid > 0 {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(b), dir) {
			_ = syscall.Kill(pid, syscall.SIGTERM)
			deadline := time.Now().Add(90 * time.Second)
			for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
			}
		}
	}
	st, err = realcluster.LoadState(dir)
	if err != nil || st == nil {
		return err
	}
	if err := st.Teardown(func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }); err != nil {
		return errors.Join(errors.New("teardown"), err)
	}
	if err := os.Remove(logFile(dir)); err != nil && !os.IsNotExist(err) {
		return err
	}
	fmt.Fprintf(os.Stderr, "cluster: removed\n")
	return nil
}
