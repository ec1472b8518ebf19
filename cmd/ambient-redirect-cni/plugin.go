package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

// Error codes of our own (the spec reserves 100 and up for plugins).
const (
	errAgent         uint = 100 // the agent answered with an error
	errNotProgrammed uint = 101 // the agent answered: ambient, but not programmed
)

// delTimeout caps how long DEL waits for the agent: DEL only informs it (its
// informer sees the pod go anyway), and a slow DEL holds up the teardown.
const delTimeout = 10 * time.Second

// k8sArgs are the CNI_ARGS the kubelet's runtime passes.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
}

// invocation is one run of the plugin, parsed.
type invocation struct {
	args *skel.CmdArgs
	conf *cni.PluginConf
	pod  k8sArgs
}

func load(args *skel.CmdArgs) (*invocation, error) {
	conf, err := cni.ParseConf(args.StdinData)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "ambient-redirect: "+err.Error(), "")
	}
	inv := &invocation{args: args, conf: conf}
	// Unknown keys never fail a pod, whatever the runtime sends.
	inv.pod.IgnoreUnknown = true
	if err := types.LoadArgs(args.Args, &inv.pod); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "ambient-redirect: CNI_ARGS: "+err.Error(), "")
	}
	return inv, nil
}

// podName is "namespace/name"; empty when the container is not a pod's.
func (inv *invocation) podName() string {
	if inv.pod.K8S_POD_NAME == "" {
		return ""
	}
	return string(inv.pod.K8S_POD_NAMESPACE) + "/" + string(inv.pod.K8S_POD_NAME)
}

func (inv *invocation) request(cmd string) cni.Request {
	req := cni.Request{
		Command:      cmd,
		ContainerID:  inv.args.ContainerID,
		NetNS:        inv.args.Netns,
		IfName:       inv.args.IfName,
		PodNamespace: string(inv.pod.K8S_POD_NAMESPACE),
		PodName:      string(inv.pod.K8S_POD_NAME),
		PodUID:       string(inv.pod.K8S_POD_UID),
	}
	if inv.conf.PrevResult != nil {
		req.IPs, _ = podIPs(inv.conf.PrevResult)
	}
	return req
}

// passThrough prints prevResult unchanged, as a chained plugin that adds
// nothing must.
func (inv *invocation) passThrough() error {
	return types.PrintResult(inv.conf.PrevResult, inv.conf.CNIVersion)
}

func cmdAdd(args *skel.CmdArgs) error {
	inv, err := load(args)
	if err != nil {
		return err
	}
	if inv.conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig,
			"ambient-redirect: no prevResult: the plugin must be chained after the primary plugin in a conflist", "")
	}
	if inv.podName() == "" {
		return inv.passThrough()
	}
	if _, err := podIPs(inv.conf.PrevResult); err != nil {
		return types.NewError(types.ErrDecodingFailure, "ambient-redirect: prevResult: "+err.Error(), "")
	}
	if err := inv.ask(cni.CommandAdd); err != nil {
		return err
	}
	return inv.passThrough()
}

func cmdCheck(args *skel.CmdArgs) error {
	inv, err := load(args)
	if err != nil {
		return err
	}
	if inv.podName() == "" {
		return nil
	}
	return inv.ask(cni.CommandCheck)
}

// cmdDel tells the agent, and always succeeds: DEL must be idempotent, a
// pod's teardown must not hang on the agent, and the agent drops a deleted
// pod from its informer anyway. What went wrong goes to stderr.
func cmdDel(args *skel.CmdArgs) error {
	inv, err := load(args)
	if err != nil {
		warn("DEL of container %s: %v; nothing to tell the agent", args.ContainerID, err)
		return nil
	}
	if inv.podName() == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(inv.conf.TimeoutDuration(), delTimeout))
	defer cancel()
	if _, err := cni.Call(ctx, inv.conf.Socket, inv.request(cni.CommandDel)); err != nil && !cni.IsUnreachable(err) {
		warn("DEL of pod %s: the node agent at %s: %v; it forgets the pod when it sees it deleted", inv.podName(), inv.conf.Socket, err)
	}
	return nil
}

// ask hands the pod to the agent (ADD or CHECK) and returns nil when the
// pod may run: the agent programmed it, or it is not ambient.
func (inv *invocation) ask(cmd string) error {
	ctx, cancel := context.WithTimeout(context.Background(), inv.conf.TimeoutDuration())
	defer cancel()
	resp, err := cni.Call(ctx, inv.conf.Socket, inv.request(cmd))
	var ae *cni.AgentError
	switch {
	case err == nil && (!resp.Ambient || resp.Programmed):
		return nil
	case err == nil:
		return types.NewError(errNotProgrammed,
			fmt.Sprintf("ambient-redirect: %s: ambient pod %s is not programmed by the node agent: %s", cmd, inv.podName(), resp.Reason), "")
	case errors.As(err, &ae):
		return types.NewError(errAgent,
			fmt.Sprintf("ambient-redirect: %s: the node agent failed for pod %s: %s", cmd, inv.podName(), ae.Message), "")
	}
	return inv.noAnswer(err)
}

// noAnswer decides when the agent did not answer: it is not running
// (unreachable), too slow (timeout), or went away mid-request. A pod the API
// server says is not ambient may run: it never depends on the agent. Any
// other pod is ambient, or may be, and failMode decides.
func (inv *invocation) noAnswer(err error) error {
	var what string
	switch {
	case cni.IsUnreachable(err):
		what = fmt.Sprintf("the node agent is not reachable at %s (%s)", inv.conf.Socket, errnoText(err))
	case errors.Is(err, context.DeadlineExceeded):
		what = fmt.Sprintf("the node agent at %s did not answer within %s", inv.conf.Socket, inv.conf.TimeoutDuration())
	default:
		what = fmt.Sprintf("the node agent at %s did not answer (%v)", inv.conf.Socket, err)
	}
	var pod string
	if inv.conf.Kubeconfig == "" {
		pod = fmt.Sprintf("pod %s may be ambient (no kubeconfig in the plugin config to look it up)", inv.podName())
	} else {
		opts, oerr := inv.conf.SelectionOptions()
		ambient, reason, lerr := false, "", oerr
		if lerr == nil {
			ambient, reason, lerr = cni.Lookup(context.Background(), inv.conf.Kubeconfig,
				string(inv.pod.K8S_POD_NAMESPACE), string(inv.pod.K8S_POD_NAME), opts)
		}
		switch {
		case lerr != nil:
			pod = fmt.Sprintf("pod %s may be ambient (looking it up failed: %v)", inv.podName(), lerr)
		case !ambient:
			return nil
		default:
			pod = fmt.Sprintf("pod %s is ambient (%s)", inv.podName(), reason)
		}
	}
	if inv.conf.FailMode == cni.FailOpen {
		warn("%s: %s and failMode is open, so it starts without redirection until the agent catches up", what, pod)
		return nil
	}
	return types.NewError(types.ErrTryAgainLater,
		fmt.Sprintf("ambient-redirect: %s: %s and failMode is closed, so it must not start uncaptured; the kubelet will retry", what, pod), "")
}

// podIPs are the container's addresses in prevResult: those on an interface
// inside the sandbox, or on no interface in particular.
func podIPs(r types.Result) ([]netip.Addr, error) {
	res, err := types100.NewResultFromResult(r)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, ipc := range res.IPs {
		if i := ipc.Interface; i != nil && *i >= 0 && *i < len(res.Interfaces) && res.Interfaces[*i].Sandbox == "" {
			continue // the host side of a veth
		}
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		if a = a.Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out, nil
}

// errnoText is the errno of a dial error ("connection refused"), without
// the URL and socket path the message already names.
func errnoText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return err.Error()
}

// warn writes to stderr, which the runtime logs; stdout is the result.
func warn(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "ambient-redirect: "+format+"\n", a...)
}
