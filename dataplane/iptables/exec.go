package iptables

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
)

// Backends.
const (
	NFT    = "nft"
	Legacy = "legacy"
)

// InNS runs f with the calling thread in some network namespace. Binaries
// started from f inherit that namespace.
type InNS func(f func() error) error

// Here runs f in the current namespace.
func Here(f func() error) error { return f() }

// ExecRunner runs the iptables (or ip6tables) binaries of one backend.
type ExecRunner struct {
	backend string
	tool    string // "iptables" or "ip6tables"
	inNS    InNS
}

// NewExecRunner returns a runner for backend ("nft" or "legacy"), running
// binaries through inNS.
func NewExecRunner(backend string, inNS InNS) (*ExecRunner, error) {
	if backend != NFT && backend != Legacy {
		return nil, fmt.Errorf("iptables backend %q is not nft or legacy", backend)
	}
	if inNS == nil {
		inNS = Here
	}
	return &ExecRunner{backend: backend, tool: "iptables", inNS: inNS}, nil
}

// NewExecRunner6 is NewExecRunner for ip6tables.
func NewExecRunner6(backend string, inNS InNS) (*ExecRunner, error) {
	r, err := NewExecRunner(backend, inNS)
	if err == nil {
		r.tool = "ip6tables"
	}
	return r, err
}

// Backend implements Runner.
func (r *ExecRunner) Backend() string { return r.backend }

func (r *ExecRunner) bin(tool string) string { return r.tool + "-" + r.backend + "-" + tool }

// Save implements Runner.
func (r *ExecRunner) Save(ctx context.Context, table string) (string, error) {
	args := []string{}
	if table != "" {
		args = append(args, "-t", table)
	}
	out, err := r.run(ctx, nil, r.bin("save"), args...)
	if err != nil {
		return "", err
	}
	return out, nil
}

// Restore implements Runner. --noflush keeps every chain we do not declare;
// -w waits for the xtables lock instead of failing.
func (r *ExecRunner) Restore(ctx context.Context, input string) error {
	_, err := r.run(ctx, strings.NewReader(input), r.bin("restore"), "--noflush", "-w", "5")
	return err
}

func (r *ExecRunner) run(ctx context.Context, stdin *strings.Reader, name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	err := r.inNS(func() error {
		cmd := exec.CommandContext(ctx, name, args...)
		if stdin != nil {
			cmd.Stdin = stdin
		}
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		return cmd.Run()
	})
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Detect picks the backend kubelet uses, the way kube-proxy's
// iptables-wrappers do: the kubelet canary chains decide; failing that, the
// backend with more rules wins; nft on a tie. It returns the backend and why.
func Detect(ctx context.Context, runner func(backend string) (Runner, error)) (string, string, error) {
	counts := map[string]int{}
	canary := map[string]bool{}
	var errs []string
	backends := []string{NFT, Legacy}
	outs, saveErrs := make([]string, len(backends)), make([]error, len(backends))
	var wg sync.WaitGroup
	for i, b := range backends {
		r, err := runner(b)
		if err != nil {
			return "", "", err
		}
		// Both at once: each is a process. All existing tables: -t would
		// instantiate missing legacy tables.
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], saveErrs[i] = r.Save(ctx, "")
		}()
	}
	wg.Wait()
	for i, b := range backends {
		if saveErrs[i] != nil {
			errs = append(errs, saveErrs[i].Error())
			continue
		}
		out := outs[i]
		if strings.Contains(out, "KUBE-IPTABLES-HINT") || strings.Contains(out, "KUBE-KUBELET-CANARY") {
			canary[b] = true
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "-") {
				counts[b]++
			}
		}
	}
	switch {
	case len(errs) == 2:
		return "", "", fmt.Errorf("no iptables backend works: %s", strings.Join(errs, "; "))
	case canary[NFT]:
		return NFT, "kubelet canary chain found in nft", nil
	case canary[Legacy]:
		return Legacy, "kubelet canary chain found in legacy", nil
	case counts[Legacy] > counts[NFT]:
		return Legacy, fmt.Sprintf("no canary; legacy has more rules (%d > %d)", counts[Legacy], counts[NFT]), nil
	default:
		return NFT, fmt.Sprintf("no canary; nft has at least as many rules (%d >= %d)", counts[NFT], counts[Legacy]), nil
	}
}
