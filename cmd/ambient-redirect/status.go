package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ambient-redirect/ambient-redirect/controller"
)

// cmdStatus prints a summary of a running agent's /debug/state. Exit codes:
// 0 converged, 1 not converged or unreachable, 2 bad flags.
func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	addr := fs.String("debug-addr", "127.0.0.1:15099", "debug address of the running agent")
	verbose := fs.Bool("v", false, "list every pod with its selection reason")
	timeout := fs.Duration("timeout", 5*time.Second, "request timeout")
	if code, ok := parse(fs, args, stdout, stderr); !ok {
		return code
	}
	if err := validHostPort(*addr); err != nil {
		fmt.Fprintf(stderr, "ambient-redirect status: --debug-addr %q: %v\n", *addr, err)
		return 2
	}
	if *timeout <= 0 {
		fmt.Fprintf(stderr, "ambient-redirect status: --timeout %s must be positive\n", *timeout)
		return 2
	}
	c := &http.Client{Timeout: *timeout}
	resp, err := c.Get("http://" + *addr + "/debug/state")
	if err != nil {
		fmt.Fprintf(stderr, "ambient-redirect status: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	var st controller.DebugState
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		fmt.Fprintf(stderr, "ambient-redirect status: decode /debug/state: %v\n", err)
		return 1
	}
	printStatus(stdout, st, *verbose)
	if !st.Converged || len(st.FailedChecks) > 0 {
		return 1
	}
	return 0
}

func printStatus(w io.Writer, st controller.DebugState, verbose bool) {
	state := "converged"
	if !st.Converged {
		state = "NOT converged"
	}
	fmt.Fprintf(w, "state:     %s (ready=%v)\n", state, st.Ready)
	for _, name := range slices.Sorted(maps.Keys(st.FailedChecks)) {
		fmt.Fprintf(w, "NOT READY: %s: %s\n", name, st.FailedChecks[name])
	}
	if z := st.Ztunnel; z != nil {
		fmt.Fprintf(w, "ztunnel:   %s ip %s veth %s netns %s", z.Pod, z.IP, z.HostVeth, z.NetNS)
		if z.Error != "" {
			fmt.Fprintf(w, " (error: %s)", z.Error)
		}
		fmt.Fprintln(w)
	} else {
		fmt.Fprintf(w, "ztunnel:   none (fail mode %v applies)\n", st.Config["failMode"])
	}
	for _, z := range st.Draining {
		fmt.Fprintf(w, "draining:  %s (keeps its connections while it runs)\n", z)
	}
	if st.Tunnel != nil {
		fmt.Fprintf(w, "tunnel:    %v port %v (%v)\n", st.Tunnel["type"], st.Tunnel["port"], st.Tunnel["reason"])
	}
	if st.Backend != nil {
		fmt.Fprintf(w, "backend:   %v (%v)\n", st.Backend["name"], st.Backend["reason"])
	}
	if st.IPTables != nil {
		fmt.Fprintf(w, "iptables:  %v (%v)\n", st.IPTables["backend"], st.IPTables["reason"])
		if warn, ok := st.IPTables["warning"]; ok {
			fmt.Fprintf(w, "WARNING:   %v\n", warn)
		}
	}
	fmt.Fprintf(w, "pods:      %d on node, %d enrolled\n", len(st.Pods), st.Enrolled)
	if len(st.Sidecars) > 0 {
		inPlace := 0
		for _, s := range st.Sidecars {
			if s.InPlace {
				inPlace++
			}
		}
		fmt.Fprintf(w, "sidecars:  %d sidecar pods, rules in place in %d\n", len(st.Sidecars), inPlace)
	}
	if ls := st.LastSync; ls != nil {
		fmt.Fprintf(w, "last sync: %s took %s writes %v", ls.Time.Format(time.RFC3339), ls.Duration, ls.Writes)
		if ls.Error != "" {
			fmt.Fprintf(w, " error: %s", ls.Error)
		}
		fmt.Fprintln(w)
	}
	if len(st.DriftRepairs) > 0 {
		fmt.Fprintf(w, "drift repairs: %v\n", st.DriftRepairs)
	}
	if st.DiffError != "" {
		fmt.Fprintf(w, "diff error: %s\n", st.DiffError)
	}
	if len(st.Diff) > 0 {
		fmt.Fprintf(w, "not converged (%d):\n", len(st.Diff))
		for _, d := range st.Diff {
			fmt.Fprintf(w, "  %s\n", d)
		}
	}
	if verbose {
		pods := append([]controller.PodStatus(nil), st.Pods...)
		sort.Slice(pods, func(i, j int) bool { return pods[i].Namespace+pods[i].Name < pods[j].Namespace+pods[j].Name })
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAMESPACE\tPOD\tIPS\tENROLLED\tREASON")
		for _, p := range pods {
			reason := p.Reason
			if p.ViaCNI {
				reason += " (handed over by the CNI plugin)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\n", p.Namespace, p.Name, strings.Join(p.IPs, ","), p.Enrolled, reason)
		}
		_ = tw.Flush()
		if len(st.Sidecars) > 0 {
			tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SIDECAR POD\tRULES\tINTERCEPTION")
			for _, s := range st.Sidecars {
				state := "in place"
				if !s.InPlace {
					state = "NOT in place"
					if s.Error != "" {
						state += ": " + s.Error
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Name, state, s.Capture)
			}
			_ = tw.Flush()
		}
	}
}
