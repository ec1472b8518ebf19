package kernel

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestSysctlSetWithReadOnlyProcSys: in a container that is not privileged
// /proc/sys is mounted read-only; the per-interface keys the dataplane
// sets must still be written (through netlink), in the right netns. The
// test runs itself in a mount namespace with /proc/sys read-only.
func TestSysctlSetWithReadOnlyProcSys(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network and mount namespaces)")
	}
	if path := os.Getenv("AR_SYSCTL_HELPER_NS"); path != "" {
		sysctlHelper(t, path)
		return
	}
	name := fmt.Sprintf("ar-sysctl-%d", os.Getpid())
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	ip("netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ip("-n", name, "link", "add", "ar-a", "type", "veth", "peer", "name", "ar-b")
	path := filepath.Join("/var/run/netns", name)
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$0" -test.run '^TestSysctlSetWithReadOnlyProcSys$' -test.v`,
		os.Args[0])
	cmd.Env = append(os.Environ(), "AR_SYSCTL_HELPER_NS="+path)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	t.Logf("helper:\n%s", out)
	for key, want := range map[string]string{"accept_local": "1", "rp_filter": "0"} {
		got, err := exec.Command("ip", "netns", "exec", name, "cat", "/proc/sys/net/ipv4/conf/ar-a/"+key).Output()
		if err != nil || strings.TrimSpace(string(got)) != want {
			t.Errorf("ar-a %s = %q (%v), want %s", key, got, err, want)
		}
	}
	// The root netns has no ar-a: nothing was written there.
	if _, err := os.Stat("/proc/sys/net/ipv4/conf/ar-a"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ar-a exists in the root netns: %v", err)
	}
}

func sysctlHelper(t *testing.T, path string) {
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/lo/rp_filter", []byte("0"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("writing /proc/sys in the helper: %v, want EROFS (the read-only mount did not take)", err)
	}
	k, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	for _, kv := range [][2]string{
		{"net.ipv4.conf.ar-a.rp_filter", "2"}, // a value that differs from the default, then ours
		{"net.ipv4.conf.ar-a.rp_filter", "0"},
		{"net.ipv4.conf.ar-a.accept_local", "1"},
	} {
		if err := k.Sysctl.Set(kv[0], kv[1]); err != nil {
			t.Fatalf("Set(%s, %s): %v", kv[0], kv[1], err)
		}
		if got, err := k.Sysctl.Get(kv[0]); err != nil || got != kv[1] {
			t.Fatalf("Get(%s) after Set = %q, %v; want %s", kv[0], got, err, kv[1])
		}
	}
	if err := k.Sysctl.Set("net.ipv4.conf.ar-gone.rp_filter", "0"); err == nil {
		t.Error("Set on a missing link succeeded")
	}
}
