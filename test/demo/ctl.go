package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambient-redirect/ambient-redirect/controller"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
)

// The control socket lets a person poke the running demo from another
// terminal (`ar-demo ctl SOCKET ...`) without kubectl.

type ctlReq struct {
	args  []string
	reply chan string
}

const ctlUsage = "usage: ar-demo ctl SOCKET label NAMESPACE | unlabel NAMESPACE | restart-ztunnel NODE"

// listenCtl serves the control socket. It is created inside the underlay
// netns, like everything else of the demo; a path socket is reachable from
// any netns.
func (d *demo) listenCtl() {
	d.sock = filepath.Join(d.base, "ctl.sock")
	var l net.Listener
	err := netnstest.Do(d.e.C.UnderlayNS, func() error {
		var err error
		l, err = net.Listen("unix", d.sock)
		return err
	})
	if err != nil {
		d.t.Fatalf("control socket: %v", err)
	}
	d.t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go d.serveCtl(c)
		}
	}()
}

func (d *demo) serveCtl(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(90 * time.Second))
	line, err := bufio.NewReader(io.LimitReader(c, 1024)).ReadString('\n')
	if err != nil {
		return
	}
	req := ctlReq{args: strings.Fields(line), reply: make(chan string, 1)}
	select {
	case d.ctl <- req:
	case <-d.stop:
		fmt.Fprintln(c, "error: the demo is stopping")
		return
	case <-time.After(30 * time.Second):
		fmt.Fprintln(c, "error: the demo is busy (still setting up?)")
		return
	}
	select {
	case s := <-req.reply:
		fmt.Fprintln(c, s)
	case <-d.stop:
		fmt.Fprintln(c, "error: the demo is stopping")
	}
}

// command runs a control command in the demo's goroutine; its reply starts
// with "ok" or "error".
func (d *demo) command(args []string) string {
	reply := func(what string, err error) string {
		if err != nil {
			d.lastAction = fmt.Sprintf("%s: error: %v", strings.Join(args, " "), err)
			return "error: " + err.Error()
		}
		d.lastAction = fmt.Sprintf("%s: %s (%s)", strings.Join(args, " "), what, time.Now().Format("15:04:05"))
		return "ok: " + what
	}
	if len(args) != 2 {
		return "error: " + ctlUsage
	}
	switch args[0] {
	case "label", "unlabel":
		on := args[0] == "label"
		err := d.t.try(func(t testing.TB) { d.e.LabelNamespace(t, args[1], on) })
		what := fmt.Sprintf("namespace %s labelled %s=%s; its pods are enrolled within a moment",
			args[1], selection.DataplaneModeLabel, selection.DataplaneModeAmbient)
		if !on {
			what = fmt.Sprintf("label %s removed from namespace %s; its pods are released within a moment", selection.DataplaneModeLabel, args[1])
		}
		return reply(what, err)
	case "restart-ztunnel":
		what, err := d.restartZtunnel(args[1])
		return reply(what, err)
	}
	return "error: " + ctlUsage
}

// restartZtunnel replaces a node's ztunnel pod by a new one (new IP and
// netns) the way a surging DaemonSet rollout does: the new pod becomes
// Ready, the agent moves capture to it, then the old pod goes.
func (d *demo) restartZtunnel(node string) (string, error) {
	var n *harness.Node
	for _, x := range d.e.Nodes {
		if x.Name == node {
			n = x
		}
	}
	if n == nil {
		return "", fmt.Errorf("no node %q (node1, node2)", node)
	}
	old := n.ZT
	var nz *harness.Ztunnel
	var took time.Duration
	err := d.t.try(func(t testing.TB) {
		// The agent picks the newest Ready ztunnel; creation timestamps
		// have second resolution.
		time.Sleep(time.Until(old.Pod.Obj.CreationTimestamp.Add(1100 * time.Millisecond)))
		gen := 1
		for _, z := range d.zts {
			if z.node == n.Name {
				gen++
			}
		}
		nz = d.e.StartZtunnel(t, n, fmt.Sprintf("ztunnel-%s-%d", n.Name, gen))
		n.ZT = nz
		d.addZtunnel(n)
		ready := time.Now()
		harness.Eventually(t, 10*time.Second, func() error {
			var st controller.DebugState
			if _, body, err := d.e.Get(n, "/debug/state"); err != nil || json.Unmarshal([]byte(body), &st) != nil {
				return fmt.Errorf("/debug/state of %s: %v", n.Name, err)
			}
			if st.Ztunnel == nil || !strings.HasSuffix(st.Ztunnel.Pod, "/"+nz.Pod.Obj.Name) || !st.Converged {
				return fmt.Errorf("the agent on %s has not switched to %s yet", n.Name, nz.Pod.Obj.Name)
			}
			return nil
		})
		took = time.Since(ready)
		d.e.DeletePod(t, old.Pod)
		old.Proc.Stop()
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s (%s, netns %s) is Ready, the agent on %s switched to it within %s, then %s was deleted",
		nz.Pod.Obj.Name, nz.Pod.IP, nz.Pod.Net.NS, n.Name, took.Round(10*time.Millisecond), old.Pod.Obj.Name), nil
}

// ctlMain is the client: `ar-demo ctl SOCKET CMD ARG`.
func ctlMain(args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, ctlUsage)
		return 2
	}
	c, err := net.DialTimeout("unix", args[0], 5*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ar-demo ctl: %v (is the demo running?)\n", err)
		return 1
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	fmt.Fprintln(c, strings.Join(args[1:], " "))
	b, err := io.ReadAll(c)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ar-demo ctl: %v\n", err)
		return 1
	}
	fmt.Print(string(b))
	if !strings.HasPrefix(string(b), "ok") {
		return 1
	}
	return 0
}
