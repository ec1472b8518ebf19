package install

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func hasEntry(t *testing.T, path string) bool {
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	c, err := parseConflist(data)
	return err == nil && len(c.ours) == 1
}

// runWatch runs Watch until the test ends.
func runWatch(t *testing.T, in *Installer, period time.Duration) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); in.Watch(ctx, period) }()
	t.Cleanup(func() { cancel(); <-done })
}

// The primary plugin rewrites its conflist without our entry (kindnet does
// when it starts), by rename or in place: Watch puts the entry back. The
// hour-long period shows that the change itself (inotify) triggers it.
func TestWatchReinserts(t *testing.T) {
	orig := fixtures(t)["kindnet"]
	in, path, logs := testInstaller(t, orig)
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	runWatch(t, in, time.Hour)

	rewrites := map[string]func(){
		"rename": func() {
			tmp := filepath.Join(in.ConfDir, ".kindnet.tmp")
			if err := os.WriteFile(tmp, orig, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		},
		"in place": func() {
			if err := os.WriteFile(path, orig, 0o644); err != nil {
				t.Fatal(err)
			}
		},
	}
	for _, how := range []string{"rename", "in place"} {
		rewrites[how]()
		waitFor(t, "the entry to be re-inserted after a rewrite "+how, func() bool { return hasEntry(t, path) })
	}
	waitFor(t, "the re-inserts to be logged", func() bool {
		return logs.FilterMessageSnippet("re-installed").Len() == 2
	})
}

// The conf dir is empty until the primary plugin runs: Watch installs as
// soon as its conflist appears (here found by polling: the dir does not exist
// when Watch starts, so there is nothing to watch yet).
func TestWatchInstallsOnceConfigAppears(t *testing.T) {
	in, path, _ := testInstaller(t, nil)
	if err := os.RemoveAll(in.ConfDir); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err == nil {
		t.Fatal("Install() with no conf dir succeeded")
	}
	runWatch(t, in, 20*time.Millisecond)
	if err := os.MkdirAll(in.ConfDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, fixtures(t)["compact"], 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the entry to be inserted", func() bool { return hasEntry(t, path) })
}
