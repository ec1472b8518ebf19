package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/netnstest"
	"github.com/ambient-redirect/ambient-redirect/test/ztunnel/record"
)

// demo is the running demo; only the goroutine of run touches it.
type demo struct {
	t       *demoT
	o       options
	base    string
	e       *harness.Env
	adminKC string
	sock    string
	stop    chan struct{}
	ctl     chan ctlReq

	pods        []*harness.Pod
	flows       []flow
	zts         []*ztLog
	names       map[string]string // IP -> "namespace/pod" or node name
	rounds      int
	prevKeys    map[string]bool // client addresses of the previous round
	others      []hop           // captured connections the demo did not make
	lastAmbient map[string]bool
	lastAction  string
}

type flow struct{ from, to *harness.Pod }

// ztLog is one ztunnel's record file, read incrementally.
type ztLog struct {
	node, pod, path string
	off             int64
}

type hop struct {
	zt *ztLog
	r  record.Record
	at time.Time
}

type result struct {
	f     flow
	kind  string
	want  []string // "node:port" of the ztunnels that should see it, in order
	local string   // the client's ip:port, "" when it could not connect
	err   error
	hops  []hop
}

func name(p *harness.Pod) string { return p.Obj.Namespace + "/" + p.Obj.Name }

func (d *demo) addZtunnel(n *harness.Node) {
	z := n.ZT
	d.zts = append(d.zts, &ztLog{node: n.Name, pod: z.Pod.Obj.Name, path: z.RecordsPath})
	d.remember(z.Pod)
}

func (d *demo) remember(p *harness.Pod) {
	if d.names == nil {
		d.names = map[string]string{}
		for _, n := range d.e.Nodes {
			d.names[n.IP.String()] = n.Name
		}
		for _, q := range d.pods {
			d.names[q.IP] = name(q)
		}
	}
	d.names[p.IP] = name(p)
}

// who names an "ip:port" or "ip" for people.
func (d *demo) who(addr string, port bool) string {
	ip, p, err := net.SplitHostPort(addr)
	if err != nil {
		ip = addr
	}
	s := ip
	if port && p != "" {
		s = addr
	}
	if n, ok := d.names[ip]; ok {
		return n + " " + s
	}
	return s
}

// kind classifies a flow by the namespaces' labels now (a namespace's pods
// are ambient when it is labelled), and says which ztunnel listeners should
// see it, as the README's packet paths promise.
func kind(f flow, amb map[string]bool) (string, []string) {
	src, dst := amb[f.from.Obj.Namespace], amb[f.to.Obj.Namespace]
	same := f.from.Node == f.to.Node
	sn, dn := f.from.Node.Name, f.to.Node.Name
	switch {
	case src && dst && same:
		return "same-node", []string{sn + ":15001"}
	case src && dst:
		return "cross-node", []string{sn + ":15001", dn + ":15008"}
	case dst && same:
		return "inbound", []string{dn + ":15006"}
	case dst:
		return "inbound, cross-node", []string{dn + ":15006"}
	case src:
		// Cross-node this fails with the test ztunnel: it tunnels to every
		// remote pod's :15008, and a non-ambient pod has no ztunnel.
		return "to non-ambient", []string{sn + ":15001"}
	}
	return "neither ambient", nil
}

// round makes one connection per flow and attributes the ztunnels' new
// records to them by the client's address.
func (d *demo) round() []result {
	d.rounds++
	amb := d.ambient()
	res := make([]result, 0, len(d.flows))
	for _, f := range d.flows {
		if d.stopped() {
			break
		}
		r := d.connect(f)
		r.kind, r.want = kind(f, amb)
		res = append(res, r)
	}
	keys := map[string]int{}
	for i, r := range res {
		if r.local != "" {
			keys[r.local] = i
		}
	}
	for _, h := range d.readNew() {
		k := h.r.Client
		if h.r.Listener == 15008 && h.r.HeaderClient != "" {
			k = h.r.HeaderClient
		}
		if i, ok := keys[k]; ok {
			res[i].hops = append(res[i].hops, h)
			continue
		}
		if d.prevKeys[k] {
			continue // a late record of the previous round
		}
		d.others = append(d.others, h)
		if len(d.others) > 6 {
			d.others = d.others[len(d.others)-6:]
		}
	}
	d.prevKeys = map[string]bool{}
	for k := range keys {
		d.prevKeys[k] = true
	}
	for i := range res {
		sort.SliceStable(res[i].hops, func(a, b int) bool { return res[i].hops[a].r.Listener < res[i].hops[b].r.Listener })
	}
	return res
}

// connect sends a line through the destination's echo server and wants it
// back. The ztunnel writes its record before it forwards a byte, so once the
// echo is back every hop is recorded.
func (d *demo) connect(f flow) result {
	r := result{f: f}
	dst := harness.Hostport(f.to.IP, harness.EchoPort)
	c, err := netnstest.Dial(f.from.Net.NS, "tcp", dst, 2*time.Second)
	if err != nil {
		r.err = err
		return r
	}
	defer c.Close()
	r.local = c.LocalAddr().String()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	msg := fmt.Sprintf("hello from %s\n", name(f.from))
	if _, err := io.WriteString(c, msg); err != nil {
		r.err = err
		return r
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	b, err := io.ReadAll(c)
	switch {
	case err != nil:
		r.err = err
	case string(b) != msg:
		r.err = fmt.Errorf("echo: got %q", b)
	}
	return r
}

// readNew returns the records appended to every ztunnel's file since the
// last call (whole lines only).
func (d *demo) readNew() []hop {
	var out []hop
	for _, z := range d.zts {
		f, err := os.Open(z.path)
		if err != nil {
			continue
		}
		_, _ = f.Seek(z.off, io.SeekStart)
		b, _ := io.ReadAll(f)
		f.Close()
		end := bytes.LastIndexByte(b, '\n')
		if end < 0 {
			continue
		}
		z.off += int64(end + 1)
		for _, l := range bytes.Split(b[:end], []byte("\n")) {
			var r record.Record
			if json.Unmarshal(l, &r) == nil {
				at, _ := time.Parse(time.RFC3339Nano, r.Time)
				out = append(out, hop{zt: z, r: r, at: at})
			}
		}
	}
	return out
}

func (r result) got() []string {
	var s []string
	for _, h := range r.hops {
		s = append(s, fmt.Sprintf("%s:%d", h.zt.node, h.r.Listener))
	}
	return s
}

func (r result) expected() bool {
	return r.err == nil && strings.Join(r.got(), ",") == strings.Join(r.want, ",")
}

func allExpected(res []result) bool {
	for _, r := range res {
		if !r.expected() {
			return false
		}
	}
	return len(res) > 0
}

var portNames = map[int]string{15001: "15001 outbound", 15006: "15006 inbound", 15008: "15008 HBONE inbound"}

func portName(p int) string {
	if s, ok := portNames[p]; ok {
		return s
	}
	return fmt.Sprint(p)
}

// render is the table: one line per ztunnel that captured a connection
// (client and original destination as that ztunnel saw them).
func (d *demo) render(res []result, live bool) string {
	var b strings.Builder
	how := "one round"
	if live {
		how = fmt.Sprintf("a new round every %s; Ctrl-C stops the demo and removes everything", d.o.interval)
	}
	fmt.Fprintf(&b, "Connections, round %d at %s (%s):\n", d.rounds, time.Now().Format("15:04:05"), how)
	var amb []string
	for ns := range d.lastAmbient {
		amb = append(amb, ns)
	}
	sort.Strings(amb)
	if len(amb) == 0 {
		amb = []string{"none"}
	}
	fmt.Fprintf(&b, "  ambient: the pods of namespaces labelled %s=%s, now: %s\n",
		selection.DataplaneModeLabel, selection.DataplaneModeAmbient, strings.Join(amb, " "))
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  FLOW\tCLIENT\tORIGINAL DESTINATION\tZTUNNEL (NODE)\tPORT\tECHO")
	for _, r := range res {
		echo := "ok"
		if r.err != nil {
			echo = "FAILED: " + short(r.err.Error())
		}
		if len(r.hops) == 0 {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t-\tnot captured (direct)\t%s\n", r.kind, d.who(r.f.from.IP, false),
				d.who(harness.Hostport(r.f.to.IP, harness.EchoPort), true), echo)
			continue
		}
		for i, h := range r.hops {
			flowCol := r.kind
			if i > 0 {
				flowCol, echo = "", ""
			}
			client, dst, port := h.view()
			if h.r.DialError != "" {
				port += " (dial error: " + short(h.r.DialError) + ")"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", flowCol, d.who(client, false), d.who(dst, true),
				fmt.Sprintf("%s (%s)", h.zt.pod, h.zt.node), port, echo)
		}
	}
	_ = tw.Flush()
	if live {
		fmt.Fprintln(&b, "Other connections the ztunnels captured (yours), newest last:")
		if len(d.others) == 0 {
			fmt.Fprintln(&b, "  none yet")
		}
		tw = tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		for _, h := range d.others {
			client, dst, port := h.view()
			de := ""
			if h.r.DialError != "" {
				de = "dial error: " + short(h.r.DialError)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", h.at.Local().Format("15:04:05"), d.who(client, true), d.who(dst, true),
				fmt.Sprintf("%s (%s)", h.zt.pod, h.zt.node), port, de)
		}
		_ = tw.Flush()
		if d.lastAction != "" {
			fmt.Fprintf(&b, "Last command: %s\n", d.lastAction)
		}
	}
	lines := strings.Split(b.String(), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ") // tabwriter pads empty last cells
	}
	return strings.Join(lines, "\n")
}

// view is the client, original destination and listener as the ztunnel saw
// them; behind 15008 the client and target come from the HBONE header.
func (h hop) view() (client, dst, port string) {
	client, dst, port = h.r.Client, h.r.OrigDst, portName(h.r.Listener)
	if h.r.Listener == 15008 {
		if h.r.HeaderClient != "" {
			client = h.r.HeaderClient
		}
		dst = h.r.Target
	} else if h.r.HBONE {
		port += " (HBONE)"
	}
	return client, dst, port
}

func short(s string) string {
	if i := strings.LastIndex(s, ": "); i >= 0 && len(s) > 60 {
		s = s[i+2:]
	}
	if len(s) > 60 {
		s = s[:57] + "..."
	}
	return s
}

// live redraws the table every round until stopped: in place on a terminal,
// else whenever it changes (or every 30 s).
func (d *demo) live(last []result) {
	tty := isTTY(os.Stdout) && !d.o.verbose
	fmt.Println()
	prevLines, prevBody, prevAt := 0, "", time.Time{}
	tick := time.NewTicker(d.o.interval)
	defer tick.Stop()
	res := last
	for {
		out := d.render(res, true)
		body := out[strings.Index(out, "\n")+1:] // without the clock line
		switch {
		case tty:
			if prevLines > 0 {
				fmt.Printf("\033[%dA\r\033[J", prevLines)
			}
			fmt.Print(out)
			prevLines = screenLines(out)
		case body != prevBody || time.Since(prevAt) > 30*time.Second:
			fmt.Println(out)
			prevBody, prevAt = body, time.Now()
		}
		select {
		case <-d.stop:
			return
		case req := <-d.ctl:
			req.reply <- d.command(req.args)
		case <-tick.C:
		}
		if d.stopped() {
			return
		}
		res = d.round()
	}
}

func isTTY(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// screenLines counts the terminal lines s takes, wrapping included, so the
// redraw moves up exactly that far.
func screenLines(s string) int {
	width := 0
	if ws, err := unix.IoctlGetWinsize(int(os.Stdout.Fd()), unix.TIOCGWINSZ); err == nil {
		width = int(ws.Col)
	}
	n := 0
	for _, l := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
		w := len([]rune(l))
		if width > 0 && w > width {
			n += (w + width - 1) / width
		} else {
			n++
		}
	}
	return n
}
