//go:build linux

package realcluster

import (
	"testing"
)

// TestOurPidsNeverMatchesThisMachine: a state naming this machine's own
// namespaces (a recorded inode number reused, a holder recorded before it
// unshared) or a cgroup root that is no single directory name must match no
// process: teardown SIGKILLs what ourPids returns.
func TestOurPidsNeverMatchesThisMachine(t *testing.T) {
	mnt, err := nsInode("/proc/self/ns/mnt")
	if err != nil {
		t.Skip(err)
	}
	net, err := nsInode("/proc/self/ns/net")
	if err != nil {
		t.Skip(err)
	}
	s := &State{
		Dir:         "/nonexistent/ambient-redirect-test-dir",
		Netns:       map[string]uint64{"no-such-netns": net},
		MountNs:     []uint64{mnt},
		CgroupRoots: []string{"", ".", "..", "/", "a/b"},
	}
	if pids := s.ourPids(); len(pids) != 0 {
		t.Fatalf("ourPids matched %d processes of this machine: %v", len(pids), pids)
	}
}
