// Command app is the workload of the real-cluster tests (one static
// binary, image ambient-redirect.test/app).
//
//	app serve [--http :8080] [--echo :9000] [--dial-at-start HOST:PORT,...]
//	          [--loop HOST:PORT --loop-every 15ms] [--stream HOST:PORT]
//	app probe [--url http://127.0.0.1:8080/healthz]   # exec probe: exit 0 when healthy
//
// serve answers GET /healthz (200), /whoami (the peer's address as seen
// here) and /results (JSON: what the dials below saw). The echo port first
// writes "PEER <ip:port>\n" (the client's address as this server sees it),
// then echoes. --dial-at-start dials each target the moment the process
// starts, before anything else, and records what the server saw of it;
// --loop makes a new connection every --loop-every; --stream keeps one
// connection and sends a line every 10 ms, expecting it back.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ambient-redirect/ambient-redirect/test/realcluster/app/results"
)

// The types of /results live in package results: the tests decode them.
type (
	Dial    = results.Dial
	Stream  = results.Stream
	Results = results.Results
)

var (
	mu  sync.Mutex
	res Results
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "probe" {
		fs := flag.NewFlagSet("probe", flag.ExitOnError)
		url := fs.String("url", "http://127.0.0.1:8080/healthz", "URL that must answer 200")
		_ = fs.Parse(os.Args[2:])
		c := http.Client{Timeout: 2 * time.Second}
		resp, err := c.Get(*url)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			fmt.Fprintln(os.Stderr, resp.Status)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "serve" {
		os.Args = append(os.Args[:1], os.Args[2:]...)
	}
	var (
		httpAddr  = flag.String("http", ":8080", "HTTP listen address")
		echoAddr  = flag.String("echo", ":9000", "echo listen address")
		atStart   = flag.String("dial-at-start", "", "comma-separated HOST:PORT to dial at start")
		loop      = flag.String("loop", "", "HOST:PORT to connect to repeatedly")
		loopEvery = flag.Duration("loop-every", 15*time.Millisecond, "interval of --loop")
		stream    = flag.String("stream", "", "HOST:PORT to hold one echo stream with")
	)
	flag.Parse()
	// First, before any listener: the connections made "the moment the
	// container starts".
	for _, t := range strings.Split(*atStart, ",") {
		if t = strings.TrimSpace(t); t != "" {
			d := dialOnce(t, 3*time.Second)
			log.Printf("dial-at-start %s: local %s peer %s err %q", t, d.Local, d.Peer, d.Err)
			mu.Lock()
			res.Start = append(res.Start, d)
			mu.Unlock()
		}
	}
	go echoServer(*echoAddr)
	if *loop != "" {
		go loopDial(*loop, *loopEvery)
	}
	if *stream != "" {
		go streamDial(*stream)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, r.RemoteAddr) })
	mux.HandleFunc("/results", func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		_ = json.NewEncoder(w).Encode(res)
	})
	log.Fatal(http.ListenAndServe(*httpAddr, mux))
}

// dialOnce connects to target and reads the server's PEER line.
func dialOnce(target string, timeout time.Duration) Dial {
	d := Dial{Target: target, At: time.Now()}
	c, err := net.DialTimeout("tcp", target, timeout)
	if err != nil {
		d.Err = err.Error()
		return d
	}
	defer c.Close()
	d.Local = c.LocalAddr().String()
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		d.Err = "read: " + err.Error()
		return d
	}
	d.Peer = strings.TrimSpace(strings.TrimPrefix(line, "PEER "))
	return d
}

func echoServer(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer c.Close()
			fmt.Fprintf(c, "PEER %s\n", c.RemoteAddr())
			_, _ = io.Copy(c, c)
		}()
	}
}

func loopDial(target string, every time.Duration) {
	for range time.Tick(every) {
		d := dialOnce(target, 2*time.Second)
		mu.Lock()
		res.Loop = append(res.Loop, d)
		if d.Err != "" {
			res.LoopErrors++
		}
		mu.Unlock()
	}
}

func streamDial(target string) {
	s := &Stream{Target: target}
	mu.Lock()
	res.Stream = s
	mu.Unlock()
	fail := func(err error) {
		mu.Lock()
		s.Err, s.EndedAt = err.Error(), time.Now()
		mu.Unlock()
	}
	c, err := net.DialTimeout("tcp", target, 3*time.Second)
	if err != nil {
		fail(err)
		return
	}
	defer c.Close()
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		fail(err)
		return
	}
	mu.Lock()
	s.Local, s.Peer = c.LocalAddr().String(), strings.TrimSpace(strings.TrimPrefix(line, "PEER "))
	mu.Unlock()
	for i := 0; ; i++ {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := fmt.Sprintf("%d\n", i)
		if _, err := io.WriteString(c, msg); err != nil {
			fail(err)
			return
		}
		mu.Lock()
		s.Sent++
		mu.Unlock()
		got, err := r.ReadString('\n')
		if err != nil {
			fail(err)
			return
		}
		if got != msg {
			fail(fmt.Errorf("echo %q, want %q", got, msg))
			return
		}
		mu.Lock()
		s.Echoed++
		s.LastEcho = time.Now()
		mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
}
