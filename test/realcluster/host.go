//go:build linux

package realcluster

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// State is what a cluster changed on this machine, saved in <dir>/state.json
// before each change is made, so that Teardown can undo everything even
// after the process that made it was killed.
type State struct {
	Dir string `json:"dir"`
	// Netns are the network namespaces we created (names under
	// /var/run/netns) and their inode numbers.
	Netns map[string]uint64 `json:"netns"`
	// MountNs are the inode numbers of the nodes' mount namespaces.
	MountNs []uint64 `json:"mountNs"`
	// CgroupRoots are the kubelets' cgroup roots (one directory name under
	// every cgroup hierarchy).
	CgroupRoots []string `json:"cgroupRoots"`
	// Sysctls are the global sysctls the kubelet changes, as they were
	// before the first kubelet started.
	Sysctls map[string]string `json:"sysctls"`
	// Created are host paths that did not exist and were created as mount
	// points; they are removed (if empty) at teardown, last first.
	Created []string `json:"created"`
	// Supervisor is the pid of the `cluster serve` process, if any.
	Supervisor int `json:"supervisor,omitempty"`
}

// GlobalSysctls are the sysctls outside the node netns the kubelet sets.
var GlobalSysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

// LoadState reads <dir>/state.json; (nil, nil) when there is none.
func LoadState(dir string) (*State, error) {
	b, err := os.ReadFile(statePath(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", statePath(dir), err)
	}
	return &s, nil
}

func (s *State) save() error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := statePath(s.Dir) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, statePath(s.Dir))
}

func readSysctl(name string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + name)
	return strings.TrimSpace(string(b)), err
}

func nsInode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// cgroupMounts returns the mount points of every cgroup (v1) and cgroup2
// hierarchy.
func cgroupMounts() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && (fields[i+1] == "cgroup" || fields[i+1] == "cgroup2") {
				out = append(out, fields[4])
			}
		}
	}
	return out, sc.Err()
}

// ourPids returns the processes our clusters started and nothing else:
// those in one of our cgroup trees (every container), those in one of our
// network namespaces that are still mounted under /var/run/netns with the
// recorded inode (the control plane, kube-proxy, hostNetwork pods), and
// those in one of our recorded mount namespaces that a process of ours
// (command line naming our work directory, like the namespace's holder)
// still lives in (containerd, shims, kubelet). Namespace inode numbers are
// reused once a namespace is freed, so a recorded number alone proves
// nothing; the namespaces of this process (the machine's own) never match,
// nor does this process or any of its ancestors.
func (s *State) ourPids() []int {
	selfMnt, err1 := nsInode("/proc/self/ns/mnt")
	selfNet, err2 := nsInode("/proc/self/ns/net")
	if err1 != nil || err2 != nil || s.Dir == "" {
		return nil
	}
	netIno := map[uint64]bool{}
	for name, ino := range s.Netns {
		if cur, err := nsInode(filepath.Join("/var/run/netns", name)); err == nil && cur == ino && ino != selfNet {
			netIno[ino] = true
		}
	}
	recordedMnt := map[uint64]bool{}
	for _, ino := range s.MountNs {
		if ino != selfMnt {
			recordedMnt[ino] = true
		}
	}
	skip := map[int]bool{}
	for pid := os.Getpid(); pid > 1; {
		skip[pid] = true
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			break
		}
		// pid (comm) state ppid ...; comm may hold spaces and parens.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 2 {
			break
		}
		pid, _ = strconv.Atoi(f[1])
	}
	type info struct {
		net, mnt uint64
		ours     bool // command line names our work directory
	}
	procs := map[int]info{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || skip[pid] || pid == 1 {
			continue
		}
		var in info
		in.net, _ = nsInode(fmt.Sprintf("/proc/%d/ns/net", pid))
		in.mnt, _ = nsInode(fmt.Sprintf("/proc/%d/ns/mnt", pid))
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		in.ours = len(cmd) > 0 && strings.Contains(string(cmd), s.Dir)
		procs[pid] = in
	}
	liveMnt := map[uint64]bool{}
	for _, in := range procs {
		if in.ours && recordedMnt[in.mnt] {
			liveMnt[in.mnt] = true
		}
	}
	set := map[int]bool{}
	for pid, in := range procs {
		if (in.net != 0 && netIno[in.net]) || (in.mnt != 0 && liveMnt[in.mnt]) {
			set[pid] = true
		}
	}
	mounts, _ := cgroupMounts()
	for _, m := range mounts {
		for _, root := range s.CgroupRoots {
			if root == "" || strings.Contains(root, "/") || root == "." || root == ".." {
				continue
			}
			_ = filepath.WalkDir(filepath.Join(m, root), func(p string, d os.DirEntry, err error) error {
				if err != nil || !d.IsDir() {
					return nil
				}
				b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil && !skip[pid] && pid != 1 {
						set[pid] = true
					}
				}
				return nil
			})
		}
	}
	out := make([]int, 0, len(set))
	for pid := range set {
		out = append(out, pid)
	}
	sort.Ints(out)
	return out
}

// Teardown undoes everything s records, whatever state it is in: kills
// every process in our namespaces and cgroups (SIGKILL), which also drops
// the nodes' mount namespaces and all mounts in them; removes the cgroup
// trees, the network namespaces, the host paths created as mount points;
// restores the global sysctls; removes the work directory. It is
// idempotent and reports every step that failed.
func (s *State) Teardown(logf func(string, ...any)) error {
	var errs []error
	if s.Supervisor > 0 && s.Supervisor != os.Getpid() {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.Supervisor)); err == nil &&
			strings.Contains(string(b), s.Dir) {
			_ = syscall.Kill(s.Supervisor, syscall.SIGKILL)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		pids := s.ourPids()
		if len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("processes still alive after SIGKILL: %v", pids))
			break
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
	}
	mounts, err := cgroupMounts()
	if err != nil {
		errs = append(errs, err)
	}
	for _, m := range mounts {
		for _, root := range s.CgroupRoots {
			if root == "" || strings.Contains(root, "/") || root == "." || root == ".." {
				continue
			}
			if err := removeCgroupTree(filepath.Join(m, root)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	names := make([]string, 0, len(s.Netns))
	for n := range s.Netns {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := os.Stat(filepath.Join("/var/run/netns", n)); err != nil {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", n).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", n, err, out))
		}
	}
	for name, v := range s.Sysctls {
		if cur, err := readSysctl(name); err == nil && cur == v {
			continue
		}
		if err := os.WriteFile("/proc/sys/"+name, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s=%s: %w", name, v, err))
		} else {
			logf("restored %s=%s", strings.ReplaceAll(name, "/", "."), v)
		}
	}
	for i := len(s.Created) - 1; i >= 0; i-- {
		if err := os.Remove(s.Created[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s (created as a mount point): %w", s.Created[i], err))
		}
	}
	if s.Dir != "" && len(errs) == 0 {
		if err := os.RemoveAll(s.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeCgroupTree removes a cgroup directory and its children, deepest
// first (cgroupfs directories are removed with rmdir; their files go with
// them).
func removeCgroupTree(root string) error {
	if _, err := os.Stat(root); err != nil {
		return nil
	}
	var dirs []string
	_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var last error
	for try := 0; try < 20; try++ {
		last = nil
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
				last = fmt.Errorf("rmdir %s: %w", dirs[i], err)
			}
		}
		if last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return last
}
