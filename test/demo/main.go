// Command ar-demo shows ambient-redirect's main job on a bare machine (root,
// no cluster): two ptp-shaped nodes in network namespaces, a real etcd and
// kube-apiserver in the underlay namespace, a test ztunnel and the real agent
// on each node, ambient and non-ambient pods with echo servers, traffic
// between them and a live table of which ztunnel captured which connection.
// It reuses the e2e harness (test/harness). Run it through hack/demo.sh.
//
//	ar-demo [--once] [-v] --repo DIR --agent BIN --ztunnel BIN
//	ar-demo ctl SOCKET label|unlabel NAMESPACE | restart-ztunnel NODE
//
// Everything it creates lives in network namespaces it creates; on exit,
// Ctrl-C or error it removes all of it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

type options struct {
	once     bool
	verbose  bool
	interval time.Duration
	repo     string
	agent    string
	ztunnel  string
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "ctl" {
		os.Exit(ctlMain(os.Args[2:]))
	}
	var o options
	fs := flag.NewFlagSet("ar-demo", flag.ExitOnError)
	fs.BoolVar(&o.once, "once", false, "one round of traffic, print everything, clean up and exit (non-zero unless every connection went where it should)")
	fs.BoolVar(&o.verbose, "v", false, "print the harness's log lines as they come")
	fs.DurationVar(&o.interval, "interval", 2*time.Second, "time between traffic rounds")
	fs.StringVar(&o.repo, "repo", ".", "repository root (manifests/ is applied from there)")
	fs.StringVar(&o.agent, "agent", "", "ambient-redirect binary (default: next to this one)")
	fs.StringVar(&o.ztunnel, "ztunnel", "", "test ztunnel binary (default: test-ztunnel next to this one)")
	_ = fs.Parse(os.Args[1:])
	if err := o.resolve(); err != nil {
		fmt.Fprintf(os.Stderr, "ar-demo: %v\n", err)
		os.Exit(2)
	}
	os.Exit(demoMain(o))
}

func (o *options) resolve() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if o.agent == "" {
		o.agent = filepath.Join(filepath.Dir(self), "ambient-redirect")
	}
	if o.ztunnel == "" {
		o.ztunnel = filepath.Join(filepath.Dir(self), "test-ztunnel")
	}
	for _, p := range []*string{&o.repo, &o.agent, &o.ztunnel} {
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
	}
	for _, f := range []string{o.agent, o.ztunnel, filepath.Join(o.repo, "manifests", "rbac.yaml")} {
		if _, err := os.Stat(f); err != nil {
			return err
		}
	}
	if o.interval <= 0 {
		return fmt.Errorf("--interval %s must be positive", o.interval)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces (sudo bash hack/demo.sh)")
	}
	return nil
}

// demoMain runs the demo in a goroutine so that a signal can stop it
// between steps; cleanups always run here, last.
func demoMain(o options) int {
	base, err := os.MkdirTemp("", "ar-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "ar-demo:", err)
		return 1
	}
	defer os.RemoveAll(base)
	t := newDemoT(base, o.verbose)
	d := &demo{t: t, o: o, base: base, stop: make(chan struct{}), ctl: make(chan ctlReq)}

	sigs := stopSignals()
	done := make(chan int, 1)
	go func() {
		code := 1
		defer func() {
			if r := recover(); r != nil {
				if _, ok := r.(abort); !ok {
					t.fail(fmt.Sprintf("panic: %v\n%s", r, debug.Stack()))
				}
			}
			done <- code
		}()
		code = d.run()
	}()

	code := 0
	select {
	case code = <-done:
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "\n%v: stopping (again to force) ...\n", s)
		t.interrupt()
		close(d.stop)
		select {
		case <-done:
		case <-sigs:
		case <-time.After(90 * time.Second): // the harness's longest wait is 60 s
		}
		code = 0 // asked for
		if o.once {
			code = 130
		}
	}

	began := time.Now()
	// By its lock, before the cleanups remove it: when interrupted, the
	// harness may not have returned the cluster yet.
	prefix := clusterPrefix()
	what := "everything it set up"
	if n := len(leftovers(prefix)); n > 0 {
		what = fmt.Sprintf("agents, ztunnels, echo servers, kube-apiserver, etcd and %d network namespaces", n)
	}
	fmt.Printf("\ntearing down %s ...\n", what)
	t.runCleanups()
	if left := leftovers(prefix); len(left) > 0 {
		t.fail("left behind: network namespaces " + strings.Join(left, " "))
	} else {
		fmt.Printf("done in %s: nothing of the demo is left (no network namespace, process or kernel object)\n",
			time.Since(began).Round(100*time.Millisecond))
	}
	if t.Failed() {
		if !o.verbose {
			fmt.Fprintln(os.Stderr, "\nharness log:")
			for _, l := range t.allLogs() {
				fmt.Fprintf(os.Stderr, "    | %s\n", strings.ReplaceAll(l, "\n", "\n    | "))
			}
		}
		if code == 0 {
			code = 1
		}
	}
	return code
}

// stopSignals delivers the signals that stop the demo. SIGPIPE is caught
// too: with stdout gone (`| head`) Go would otherwise die on the next write
// and skip the teardown. Once caught it also comes for sockets whose peer
// went away, which must not stop anything.
func stopSignals() <-chan os.Signal {
	in, out := make(chan os.Signal, 4), make(chan os.Signal, 4)
	signal.Notify(in, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGPIPE)
	go func() {
		for s := range in {
			if s == syscall.SIGPIPE && !outputGone() {
				continue
			}
			select {
			case out <- s:
			default:
			}
		}
	}()
	return out
}

// outputGone reports whether nobody reads our stdout or stderr any more.
func outputGone() bool {
	fds := []unix.PollFd{{Fd: 1, Events: unix.POLLOUT}, {Fd: 2, Events: unix.POLLOUT}}
	if _, err := unix.Poll(fds, 0); err != nil {
		return false
	}
	return fds[0].Revents&unix.POLLERR != 0 || fds[1].Revents&unix.POLLERR != 0
}

// clusterPrefix finds this process's netnstest cluster by its lock file,
// which holds our pid and is taken before any namespace is created.
func clusterPrefix() string {
	locks, _ := filepath.Glob(filepath.Join(netnstest.LockDir, netnstest.PrefixBase+"*.lock"))
	for _, l := range locks {
		if b, err := os.ReadFile(l); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(os.Getpid()) {
			return strings.TrimSuffix(filepath.Base(l), ".lock")
		}
	}
	return ""
}

// leftovers lists the network namespaces of this demo's cluster that still
// exist.
func leftovers(prefix string) []string {
	if prefix == "" {
		return nil
	}
	entries, _ := os.ReadDir(netnstest.NetnsDir)
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out
}

func step(n int, format string, args ...any) time.Time {
	fmt.Printf("[%d/5] %s\n", n, fmt.Sprintf(format, args...)) // [1/5] and [2/5] are hack/demo.sh's
	return time.Now()
}

func stepDone(began time.Time, format string, args ...any) {
	fmt.Printf("      done in %s: %s\n", time.Since(began).Round(100*time.Millisecond), fmt.Sprintf(format, args...))
}

// run sets everything up, then shows it until stopped (or once).
func (d *demo) run() int {
	t := d.t
	// harness.New applies ../../manifests, relative to a package directory.
	t.Chdir(filepath.Join(d.o.repo, "test", "demo"))

	began := step(3, "2 nodes (network namespaces on an underlay bridge), etcd + kube-apiserver in the underlay netns, "+
		"the agent's RBAC from manifests/, a test ztunnel per node (expect ~5 s)")
	d.e = harness.New(t, 2, harness.Binaries{Agent: d.o.agent, Ztunnel: d.o.ztunnel})
	e := d.e
	d.adminKC = e.CP.Kubeconfig(t, e.CP.AdminConfig().BearerToken)
	stepDone(began, "cluster %s (netns %s-*), API server %s in netns %s", e.C.Prefix, e.C.Prefix, e.CP.Host(), e.CP.Netns())

	n1, n2 := e.Nodes[0], e.Nodes[1]
	began = step(4, "pods %s/a1 %s/a2 %s/p1 on node1, %s/b1 %s/p2 on node2 with echo servers on :%d (%s is labelled %s=%s), "+
		"an agent per node (expect ~2 s)",
		harness.AmbientNS, harness.AmbientNS, harness.PlainNS, harness.AmbientNS, harness.PlainNS, harness.EchoPort,
		harness.AmbientNS, selection.DataplaneModeLabel, selection.DataplaneModeAmbient)
	a1 := e.RunPod(t, n1, harness.AmbientNS, "a1")
	a2 := e.RunPod(t, n1, harness.AmbientNS, "a2")
	p1 := e.RunPod(t, n1, harness.PlainNS, "p1")
	b1 := e.RunPod(t, n2, harness.AmbientNS, "b1")
	p2 := e.RunPod(t, n2, harness.PlainNS, "p2")
	d.pods = []*harness.Pod{a1, a2, p1, b1, p2}
	d.flows = []flow{{a1, a2}, {a1, b1}, {p1, a2}, {p2, a1}, {b1, p2}, {p1, p2}}
	for _, n := range e.Nodes {
		d.addZtunnel(n)
	}
	for _, n := range e.Nodes {
		e.StartAgent(t, n)
	}
	d.listenCtl()
	stepDone(began, "agents ready (debug server %s inside each node netns)", harness.DebugAddr)

	began = step(5, "traffic: %d pod-to-pod connections a round, until each goes where it should (expect ~1 s)", len(d.flows))
	var last []result
	ok := false
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		if d.stopped() {
			return 0
		}
		last = d.round()
		if ok = allExpected(last); ok {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if ok {
		stepDone(began, "every connection went where it should (round %d)", d.rounds)
	} else {
		fmt.Printf("      some connections did not go where they should after 20 s (see the table)\n")
	}

	if d.o.once {
		fmt.Println()
		fmt.Print(d.render(last, false))
		d.printStatus()
		d.printPoke()
		if !ok {
			t.Errorf("not every connection was captured as expected")
			return 1
		}
		return 0
	}
	d.printStatus()
	d.printPoke()
	d.live(last)
	return 0
}

func (d *demo) stopped() bool {
	select {
	case <-d.stop:
		return true
	default:
		return false
	}
}

// printStatus shows `ambient-redirect status -v` of every node, once the
// node has converged (or after 10 s anyway).
func (d *demo) printStatus() {
	for _, n := range d.e.Nodes {
		args := []string{"netns", "exec", n.NS, d.o.agent, "status", "-v"}
		var out []byte
		for deadline := time.Now().Add(10 * time.Second); ; {
			var err error
			out, err = exec.Command("ip", args...).CombinedOutput()
			if err == nil || time.Now().After(deadline) || d.stopped() {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		fmt.Printf("\n%s: ip %s\n", n.Name, strings.Join(args, " "))
		fmt.Print(indent(string(out), "  "))
	}
}

func (d *demo) printPoke() {
	e := d.e
	self, _ := os.Executable()
	a1, b1 := d.pods[0], d.pods[3]
	ctl := fmt.Sprintf("%s ctl %s", self, d.sock)
	fmt.Println()
	if d.o.once {
		fmt.Println("Poke it: run bash hack/demo.sh without --once; while it runs, in another terminal (as root):")
	} else {
		fmt.Println("Poke it, in another terminal (as root), while this runs:")
	}
	lines := []string{
		fmt.Sprintf("# a connection of your own from %s to %s's echo server: watch it appear below", name(a1), name(b1)),
		fmt.Sprintf("ip netns exec %s bash -c 'exec 3<>/dev/tcp/%s/%d; echo hello >&3; head -n1 <&3'", a1.Net.NS, b1.IP, harness.EchoPort),
		fmt.Sprintf("# enrol namespace %s (label %s=%s), and undo it", harness.PlainNS, selection.DataplaneModeLabel, selection.DataplaneModeAmbient),
		ctl + " label " + harness.PlainNS,
		ctl + " unlabel " + harness.PlainNS,
		"# restart node1's ztunnel as a DaemonSet rollout does: a new pod (new IP, new netns), then the old one goes",
		ctl + " restart-ztunnel node1",
		"# what the agent on node1 did and why",
		fmt.Sprintf("ip netns exec %s %s status -v", e.Nodes[0].NS, d.o.agent),
	}
	if _, err := exec.LookPath("kubectl"); err == nil {
		lines = append(lines, "# the API server, with the admin token",
			fmt.Sprintf("ip netns exec %s kubectl --kubeconfig %s get pods -A -o wide", e.CP.Netns(), d.adminKC))
	}
	for _, l := range lines {
		fmt.Println("  " + l)
	}
}

// ambient reports which namespaces carry the ambient label now (a user may
// change them while the demo runs).
func (d *demo) ambient() map[string]bool {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	list, err := d.e.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return d.lastAmbient
	}
	m := map[string]bool{}
	for _, ns := range list.Items {
		if ns.Labels[selection.DataplaneModeLabel] == selection.DataplaneModeAmbient {
			m[ns.Name] = true
		}
	}
	d.lastAmbient = m
	return m
}

func indent(s, pre string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return pre + strings.ReplaceAll(s, "\n", "\n"+pre) + "\n"
}
