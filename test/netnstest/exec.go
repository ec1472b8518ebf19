//go:build linux

package netnstest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ExecErr runs `ip netns exec ns args...` and returns its combined output.
func ExecErr(ns string, args ...string) (string, error) {
	if err := checkNSName(ns); err != nil {
		return "", err
	}
	if len(args) == 0 {
		return "", errors.New("netnstest: no command")
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip netns exec %s %s: %w", ns, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// Exec runs `ip netns exec ns args...` and fails the test (with the combined
// output) if the command fails. It returns the combined output.
func Exec(t testing.TB, ns string, args ...string) string {
	t.Helper()
	out, err := ExecErr(ns, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// Proc is a long-running process started with Start.
type Proc struct {
	Cmd     *exec.Cmd
	LogPath string

	logFile  *os.File
	done     chan struct{}
	waitErr  error
	stopOnce sync.Once
}

// Start runs `ip netns exec ns args...` in the background in its own process
// group (ip execs the command, so the PID is the command's), with stdout and
// stderr going to a file in t.TempDir(). The process is stopped in t.Cleanup
// (its log is printed if the test failed) and is SIGKILLed if the test
// process dies first.
func Start(t testing.TB, ns string, args ...string) *Proc {
	t.Helper()
	if err := checkNSName(ns); err != nil {
		t.Fatal(err)
	}
	if len(args) == 0 {
		t.Fatal("netnstest: Start: no command")
	}
	f, err := os.CreateTemp(t.TempDir(), filepath.Base(args[0])+"-*.log")
	if err != nil {
		t.Fatalf("netnstest: create log: %v", err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Stdout = f
	cmd.Stderr = f
	// Pdeathsig: if the test binary dies (crash, timeout, kill -9) the
	// process is killed too instead of lingering in a deleted namespace.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		t.Fatalf("netnstest: start %v in %s: %v", args, ns, err)
	}
	p := &Proc{Cmd: cmd, LogPath: f.Name(), logFile: f, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("log of %v (pid %d) in %s:\n%s", args, cmd.Process.Pid, ns, p.Log())
		}
	})
	return p
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err returns the process's exit error once Done is closed (nil before).
func (p *Proc) Err() error {
	select {
	case <-p.done:
		return p.waitErr
	default:
		return nil
	}
}

// Stop sends SIGTERM to the process (by PID), waits up to 5s, then sends
// SIGKILL and waits for it to exit. It is idempotent.
func (p *Proc) Stop() {
	p.stopOnce.Do(func() {
		// os.Process.Signal uses a pidfd where available, so it never
		// signals a recycled PID.
		select {
		case <-p.done:
		default:
			_ = p.Cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
				_ = p.Cmd.Process.Signal(syscall.SIGKILL)
				<-p.done
			}
		}
		_ = p.logFile.Close()
	})
}

// Log returns the process's combined stdout/stderr so far.
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("<read %s: %v>", p.LogPath, err)
	}
	return string(b)
}

var (
	reCounters   = regexp.MustCompile(`\[\d+:\d+\]`)
	rePktBytes   = regexp.MustCompile(`packets \d+ bytes \d+`)
	reTimeout    = regexp.MustCompile(`\btimeout \d+`)
	reExpires    = regexp.MustCompile(`\bexpires \d+(ms|s|sec)?`)
	reInitval    = regexp.MustCompile(`\s*initval 0x[0-9a-fA-F]+`)
	reLifetime   = regexp.MustCompile(`(valid|preferred)_lft \d+sec`)
	reNftHandle  = regexp.MustCompile(`\s*# handle \d+`)
	reWhitespace = regexp.MustCompile(`[ \t]+`)
)

// Dump returns a normalised dump of the named namespace's network state, for
// before/after comparisons: policy rules, routes of all tables, addresses,
// links, permanent neighbours, qdiscs, iptables (nft and legacy, v4 and v6),
// nftables and ipsets. Counters, timers, timeouts and random hash seeds are
// normalised so that two dumps of an unchanged namespace are identical.
func Dump(t testing.TB, ns string) string {
	t.Helper()
	if err := checkNSName(ns); err != nil {
		t.Fatal(err)
	}
	return dump(t, ns, func(args ...string) (string, error) { return ExecErr(ns, args...) })
}

// DumpPath is Dump of the network namespace at path (any nsfs path, e.g.
// /proc/<pid>/ns/net or a netns mount seen through /proc/<pid>/root), run
// with nsenter.
func DumpPath(t testing.TB, path string) string {
	t.Helper()
	return dump(t, path, func(args ...string) (string, error) {
		out, err := exec.Command("nsenter", append([]string{"--net=" + path, "--"}, args...)...).CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("nsenter --net=%s %s: %w", path, strings.Join(args, " "), err)
		}
		return string(out), nil
	})
}

func dump(t testing.TB, ns string, execErr func(args ...string) (string, error)) string {
	t.Helper()
	var b strings.Builder
	section := func(title string, norm func(string) string, args ...string) {
		out, err := execErr(args...)
		fmt.Fprintf(&b, "### %s\n", title)
		if err != nil {
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				// Command missing etc.: environment problem, not state.
				t.Fatalf("netnstest: Dump %s: %v\n%s", ns, err, out)
			}
			fmt.Fprintf(&b, "ERROR exit %d\n", ee.ExitCode())
		}
		if norm != nil {
			out = norm(out)
		}
		b.WriteString(strings.TrimRight(out, "\n"))
		b.WriteString("\n")
	}
	section("ip -4 rule", plain, "ip", "-4", "rule", "show")
	section("ip -6 rule", plain, "ip", "-6", "rule", "show")
	section("ip -4 route table all", normRoutes, "ip", "-4", "route", "show", "table", "all")
	section("ip -6 route table all", normRoutes, "ip", "-6", "route", "show", "table", "all")
	section("ip addr", normAddrs, "ip", "-o", "addr", "show")
	section("ip link", normLinks, "ip", "-d", "-j", "link", "show")
	section("ip neigh permanent", sortedLines, "ip", "neigh", "show", "nud", "permanent")
	section("tc qdisc", sortedLines, "tc", "qdisc", "show")
	section("iptables-nft-save", NormIptables, "iptables-nft-save")
	section("ip6tables-nft-save", NormIptables, "ip6tables-nft-save")
	section("iptables-legacy-save", NormIptables, "iptables-legacy-save")
	section("ip6tables-legacy-save", NormIptables, "ip6tables-legacy-save")
	section("nft list ruleset", normNft, "nft", "list", "ruleset")
	section("ipset list", normIpset, "ipset", "list")
	return b.String()
}

func plain(s string) string { return s }

func sortedLines(s string) string {
	lines := nonEmptyLines(s)
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func nonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, strings.TrimRight(l, " \t"))
		}
	}
	return out
}

func normRoutes(s string) string {
	var out []string
	for _, l := range nonEmptyLines(s) {
		l = reExpires.ReplaceAllString(l, "expires *")
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

func normAddrs(s string) string {
	var out []string
	for _, l := range nonEmptyLines(s) {
		// "ip -o" prefixes the interface index; drop it.
		if i := strings.Index(l, ": "); i >= 0 {
			l = l[i+2:]
		}
		l = strings.ReplaceAll(l, `\`, " ")
		l = reLifetime.ReplaceAllString(l, "${1}_lft *")
		l = reWhitespace.ReplaceAllString(l, " ")
		out = append(out, l)
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// normLinks renders the stable attributes of `ip -d -j link show` one link
// per line, sorted by name (ifindexes, netns ids, statistics and bridge
// timers are left out).
func normLinks(s string) string {
	var links []map[string]any
	if err := json.Unmarshal([]byte(s), &links); err != nil {
		return "unparsable ip -j link output: " + err.Error() + "\n" + s
	}
	str := func(m map[string]any, k string) string {
		if v, ok := m[k]; ok && v != nil {
			return fmt.Sprint(v)
		}
		return "-"
	}
	var out []string
	for _, l := range links {
		flags := "-"
		if fl, ok := l["flags"].([]any); ok {
			var fs []string
			for _, f := range fl {
				fs = append(fs, fmt.Sprint(f))
			}
			flags = strings.Join(fs, ",")
		}
		kind, slaveKind := "-", "-"
		if li, ok := l["linkinfo"].(map[string]any); ok {
			kind = str(li, "info_kind")
			slaveKind = str(li, "info_slave_kind")
		}
		out = append(out, fmt.Sprintf("%s <%s> mtu=%s state=%s master=%s type=%s kind=%s slave=%s addr=%s",
			str(l, "ifname"), flags, str(l, "mtu"), str(l, "operstate"), str(l, "master"),
			str(l, "link_type"), kind, slaveKind, str(l, "address")))
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// NormIptables drops comments and counters, and tables that hold nothing:
// only built-in chains with policy ACCEPT and no rules. Such a table is no
// state (a legacy table, once instantiated in a netns, cannot be removed).
func NormIptables(s string) string {
	var out, table []string
	empty := true
	for _, l := range nonEmptyLines(s) {
		if strings.HasPrefix(l, "#") {
			continue
		}
		l = reCounters.ReplaceAllString(l, "[0:0]")
		switch {
		case strings.HasPrefix(l, "*"):
			table, empty = []string{l}, true
		case l == "COMMIT":
			if !empty {
				out = append(out, append(table, l)...)
			}
			table = nil
		default:
			if !(strings.HasPrefix(l, ":") && strings.HasSuffix(l, " ACCEPT [0:0]")) {
				empty = false
			}
			table = append(table, l)
		}
	}
	return strings.Join(out, "\n")
}

// normNft drops comments, handles and counters, and tables whose chains are
// only empty base chains with policy accept (see NormIptables).
func normNft(s string) string {
	var out, table []string
	empty := true
	for _, l := range nonEmptyLines(s) {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		l = reNftHandle.ReplaceAllString(l, "")
		l = rePktBytes.ReplaceAllString(l, "packets 0 bytes 0")
		l = reExpires.ReplaceAllString(l, "expires *")
		tl := strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "table "):
			table, empty = []string{l}, true
		case l == "}":
			if !empty {
				out = append(out, append(table, l)...)
			}
			table = nil
		case table != nil:
			if !(strings.HasPrefix(tl, "chain ") || tl == "}" || (strings.HasPrefix(tl, "type ") && strings.HasSuffix(tl, "policy accept;"))) {
				empty = false
			}
			table = append(table, l)
		default:
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// normIpset drops volatile header lines, the random hash seed, per-member
// counters and remaining timeouts, and sorts members.
func normIpset(s string) string {
	var out, members []string
	inMembers := false
	flush := func() {
		sort.Strings(members)
		out = append(out, members...)
		members = nil
		inMembers = false
	}
	for _, l := range strings.Split(s, "\n") {
		switch {
		case strings.TrimSpace(l) == "":
			flush()
			continue
		case strings.HasPrefix(l, "Name: "):
			flush()
		case strings.HasPrefix(l, "References:"), strings.HasPrefix(l, "Size in memory:"):
			continue
		case strings.HasPrefix(l, "Header:"):
			l = reInitval.ReplaceAllString(l, "")
		case l == "Members:":
			out = append(out, l)
			inMembers = true
			continue
		}
		if inMembers {
			l = rePktBytes.ReplaceAllString(l, "packets 0 bytes 0")
			l = reTimeout.ReplaceAllString(l, "timeout *")
			members = append(members, l)
			continue
		}
		out = append(out, l)
	}
	flush()
	return strings.Join(out, "\n")
}

// LineDiff lists the lines of a missing from b ("- ") and of b missing from
// a ("+ "), for showing how two Dumps differ.
func LineDiff(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !mb[l] {
			out = append(out, "- "+l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !ma[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}
