package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// TestDemo runs `bash hack/demo.sh --once` as a newcomer would and checks
// that its table shows same-node, cross-node and inbound captures, and that
// it leaves the machine as it found it: no network namespace, no process,
// no iptables/ipset/rule/route/link change in the root netns (only read).
func TestDemo(t *testing.T) {
	netnstest.RequireRoot(t)
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	nsBefore, rootBefore := netnsList(t), rootState(t)

	// Every process of the demo inherits the marker, so any survivor is
	// found by it, whatever else runs on the machine.
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	marker := "AR_DEMO_TEST_RUN=" + hex.EncodeToString(rnd[:])

	timeout := 25 * time.Minute // a cold control-plane build takes ~18 min
	if dl, ok := t.Deadline(); ok {
		timeout = time.Until(dl) - time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "hack/demo.sh", "--once")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), marker)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// On timeout: Ctrl-C for its whole process group, so it cleans up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGINT) }
	cmd.WaitDelay = 2 * time.Minute
	began := time.Now()
	runErr := cmd.Run()
	took := time.Since(began)
	t.Logf("hack/demo.sh --once took %s; output:\n%s", took.Round(100*time.Millisecond), out.String())
	if runErr != nil {
		t.Errorf("hack/demo.sh --once: %v", runErr)
	}

	checkTable(t, out.String())

	nsAfter := netnsList(t)
	for ns := range nsAfter {
		if !nsBefore[ns] {
			t.Errorf("network namespace %s left behind", ns)
		}
	}
	if left := markedProcesses(marker, 5*time.Second); len(left) > 0 {
		t.Errorf("processes of the demo left running: %s", strings.Join(left, "; "))
	}
	if rootAfter := rootState(t); rootAfter != rootBefore {
		t.Errorf("root network namespace changed:\n%s", netnstest.LineDiff(rootBefore, rootAfter))
	}
}

// checkTable wants at least one captured same-node, cross-node (both
// ztunnels) and inbound connection, and the non-ambient pair direct.
func checkTable(t *testing.T, out string) {
	t.Helper()
	i := strings.Index(out, "Connections, round")
	if i < 0 {
		t.Fatal("no table in the output")
	}
	lines := strings.Split(out[i:], "\n")
	row := func(kind string) (string, string) {
		re := regexp.MustCompile(`^  ` + regexp.QuoteMeta(kind) + `\s{2}`)
		for j, l := range lines {
			if l == "" {
				break
			}
			if re.MatchString(l) {
				next := ""
				if j+1 < len(lines) {
					next = lines[j+1]
				}
				return l, next
			}
		}
		return "", ""
	}
	has := func(l, hop string) bool {
		return regexp.MustCompile(strings.ReplaceAll(regexp.QuoteMeta(hop), " ", `\s+`)).MatchString(l)
	}
	check := func(name string, ok bool, l string) {
		if !ok {
			t.Errorf("table: no %s capture as expected (row %q)", name, l)
		}
	}
	l, _ := row("same-node")
	check("same-node", has(l, "ztunnel-node1 (node1) 15001 outbound") && strings.HasSuffix(l, " ok"), l)
	l, next := row("cross-node")
	check("cross-node", has(l, "ztunnel-node1 (node1) 15001 outbound (HBONE)") && strings.HasSuffix(l, " ok") &&
		has(next, "ztunnel-node2 (node2) 15008 HBONE inbound"), l+"\n"+next)
	l, _ = row("inbound")
	check("inbound", has(l, "ztunnel-node1 (node1) 15006 inbound") && strings.HasSuffix(l, " ok"), l)
	l, _ = row("neither ambient")
	check("direct (non-ambient pair)", has(l, "- not captured (direct)") && strings.HasSuffix(l, " ok"), l)
	if !strings.Contains(out, "nothing of the demo is left") {
		t.Error("the demo did not report a clean teardown")
	}
}

// netnsList is `ip netns list`, by name.
func netnsList(t *testing.T) map[string]bool {
	t.Helper()
	b, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatalf("ip netns list: %v", err)
	}
	m := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			m[f[0]] = true
		}
	}
	return m
}

// markedProcesses lists the processes whose environment holds marker,
// waiting up to grace for them to go.
func markedProcesses(marker string, grace time.Duration) []string {
	deadline := time.Now().Add(grace)
	for {
		var found []string
		dirs, _ := os.ReadDir("/proc")
		for _, d := range dirs {
			pid, err := strconv.Atoi(d.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			env, err := os.ReadFile(filepath.Join("/proc", d.Name(), "environ"))
			if err != nil || !bytes.Contains(env, []byte(marker)) {
				continue
			}
			cmdline, _ := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
			found = append(found, d.Name()+" "+strings.TrimSpace(string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))))
		}
		if len(found) == 0 || time.Now().After(deadline) {
			return found
		}
		time.Sleep(200 * time.Millisecond)
	}
}

var (
	rePackets = regexp.MustCompile(`packets \d+ bytes \d+`)
	reExpires = regexp.MustCompile(`expires \d+sec`)
)

// rootState reads (never writes) the root netns: iptables and ip6tables
// (nft and legacy), nftables, ipsets, policy rules, routes and link names.
func rootState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, c := range [][]string{
		{"iptables-nft-save"}, {"ip6tables-nft-save"}, {"iptables-legacy-save"}, {"ip6tables-legacy-save"},
		{"nft", "list", "ruleset"}, {"ipset", "list", "-n"},
		{"ip", "-4", "rule"}, {"ip", "-6", "rule"},
		{"ip", "-4", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		{"ip", "-o", "link", "show"},
	} {
		if _, err := exec.LookPath(c[0]); err != nil {
			continue
		}
		o, err := exec.Command(c[0], c[1:]...).CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("%v: %v", c, err)
		}
		s := string(o)
		switch {
		case strings.HasSuffix(c[0], "-save"):
			// Tables that hold nothing go: a module loaded for a netns
			// instantiates empty tables in every netns, root too.
			s = netnstest.NormIptables(s)
		case c[0] == "nft":
			s = rePackets.ReplaceAllString(s, "")
		case c[1] == "-o":
			var names []string
			for _, l := range strings.Split(s, "\n") {
				if f := strings.Fields(l); len(f) > 1 {
					names = append(names, f[1])
				}
			}
			s = strings.Join(names, " ")
		}
		b.WriteString("### " + strings.Join(c, " ") + "\n" + reExpires.ReplaceAllString(s, "") + "\n")
	}
	return b.String()
}
