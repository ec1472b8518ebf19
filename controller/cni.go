package controller

// The agent's side of the chained CNI plugin: a pod handed over in CNI ADD
// is decided from the caches (or a GET when the cache has not seen it yet)
// and programmed through the same sync as every other pod, before its
// containers start. Its status IPs, when they arrive, change nothing.

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/controller/desired"
	"github.com/ambient-redirect/ambient-redirect/controller/handover"
	"github.com/ambient-redirect/ambient-redirect/selection"
	"github.com/ambient-redirect/ambient-redirect/selection/kube"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// ReasonSandboxDeleted is the reason of a pod whose network CNI DEL tore down.
const ReasonSandboxDeleted = desired.ReasonSandboxDeleted

// HandleCNI implements cni.Handler.
func (c *Controller) HandleCNI(ctx context.Context, req cni.Request) (cni.Response, error) {
	key := req.PodNamespace + "/" + req.PodName
	for { // nothing is known before the first sync
		c.mu.Lock()
		ready, wait := c.pods != nil, c.synced
		c.mu.Unlock()
		if ready {
			break
		}
		select {
		case <-ctx.Done():
			return cni.Response{}, fmt.Errorf("pod %s: the agent has not synced yet: %w", key, ctx.Err())
		case <-wait:
		}
	}
	switch req.Command {
	case cni.CommandDel:
		c.mu.Lock()
		ok := c.cni.Del(key, req.ContainerID, types.UID(req.PodUID))
		c.mu.Unlock()
		if ok {
			c.podKey(key)
		}
		return cni.Response{Reason: "forgotten"}, nil
	case cni.CommandCheck:
		return c.checkCNI(ctx, req)
	case cni.CommandAdd:
	default:
		return cni.Response{}, fmt.Errorf("unknown CNI command %q", req.Command)
	}
	if len(req.IPs) == 0 {
		return cni.Response{}, fmt.Errorf("pod %s: CNI ADD without addresses (no prevResult IPs)", key)
	}
	pod, ns, cached, err := c.cniLookup(ctx, req)
	if err != nil {
		return cni.Response{}, err
	}
	withIPs := handover.WithPodIPs(pod, req.IPs)
	ok, why := kube.Enrolled(withIPs, ns, c.cfg.Selection)
	sidecar, _ := kube.SidecarEnrolled(withIPs, c.cfg.Selection)
	switch {
	case sidecar:
		// Refused at once: the pod must not start with rules we cannot write.
		if _, err := desired.SidecarCaptureOf(withIPs); err != nil {
			return cni.Response{Ambient: true, Reason: err.Error()}, err
		}
	case !ok:
		return cni.Response{Reason: why}, nil
	}
	cp := handover.Sandbox{UID: pod.UID, ContainerID: req.ContainerID, IPs: slices.Clone(req.IPs), NetNS: req.NetNS}
	if !cached {
		cp.Pod = pod // the cache has not seen it (this UID) yet
	}
	var after uint64
	c.mark(func() {
		c.cni.Add(key, cp)
		c.dirty[key] = true
		// Only a sync that starts after this has seen the sandbox: an
		// earlier one may have decided the pod has no address yet.
		after = c.started + 1
	})
	for {
		c.mu.Lock()
		pe, ok := c.pods[key]
		ok = ok && c.done >= after
		done := ok && pe.Pod != nil && pe.Pod.UID == string(pod.UID) && containsAll(pe.Pod.IPs, req.IPs)
		// Fail closed with no ztunnel programmed (a node starting, its
		// ztunnel not Ready yet): the pod would start with its TCP reset.
		// It waits instead, and starts captured from its first packet.
		noZtunnel := c.cfg.WaitForZtunnel && c.wantBase.Ztunnel == nil
		done = done && !noZtunnel
		notAmbient := ok && !pe.Status.Enrolled && pe.Status.UID == string(pod.UID) && pe.Sidecar == nil && pe.SidecarErr == nil
		sidecarErr := ok && pe.Status.UID == string(pod.UID) && pe.SidecarErr != nil
		wait := c.synced
		c.mu.Unlock()
		// The dataplane says what is programmed (asked without c.mu: an
		// apply holds its lock).
		done = done && containsAll(c.dp.Programmed(string(pod.UID)), req.IPs)
		if sidecar && ok && pe.Sidecar != nil && pe.Sidecar.UID == string(pod.UID) {
			switch in, err := c.dp.SidecarProgrammed(string(pod.UID)); {
			case err != nil:
				return cni.Response{Ambient: true, Reason: err.Error()}, fmt.Errorf("sidecar pod %s: %w", key, err)
			case in:
				c.log.Debug("sidecar pod programmed through CNI", zap.String("pod", key))
				return cni.Response{Ambient: true, Programmed: true, Reason: pe.Status.Reason}, nil
			}
		}
		if sidecarErr {
			return cni.Response{Ambient: true, Reason: pe.SidecarErr.Error()}, pe.SidecarErr
		}
		switch {
		case done:
			c.log.Debug("pod programmed through CNI", zap.String("pod", key), zap.Any("ips", req.IPs))
			return cni.Response{Ambient: true, Programmed: true, Reason: pe.Status.Reason}, nil
		case notAmbient:
			return cni.Response{Reason: pe.Status.Reason}, nil
		}
		select {
		case <-ctx.Done():
			if noZtunnel {
				return cni.Response{Ambient: true}, fmt.Errorf("pod %s: no ztunnel on this node yet and the fail mode is closed, so it must not start uncaptured (the runtime retries): %w", key, ctx.Err())
			}
			return cni.Response{Ambient: true}, fmt.Errorf("pod %s not programmed before the plugin gave up: %w", key, ctx.Err())
		case <-wait:
		}
	}
}

// checkCNI answers CHECK: is this sandbox's pod ambient, and if so are its
// addresses (prevResult's) programmed? The pod is decided as ADD decides it
// (labels, with the sandbox's addresses), so an ambient pod the agent does
// not know, has no address for, or programmed with other addresses fails.
func (c *Controller) checkCNI(ctx context.Context, req cni.Request) (cni.Response, error) {
	key := req.PodNamespace + "/" + req.PodName
	pod, ns, _, err := c.cniLookup(ctx, req)
	if err != nil {
		return cni.Response{}, err
	}
	if len(req.IPs) > 0 {
		pod = handover.WithPodIPs(pod, req.IPs)
	}
	if ok, why := kube.Enrolled(pod, ns, c.cfg.Selection); !ok {
		if ambient, _ := kube.Ambient(pod, ns, c.cfg.Selection); ambient && why == selection.ReasonNoIP {
			return cni.Response{Ambient: true, Reason: "not programmed: " + why}, nil
		}
		return cni.Response{Reason: why}, nil
	}
	c.mu.Lock()
	pe, ok := c.pods[key]
	c.mu.Unlock()
	switch {
	case !ok || pe.Pod == nil || pe.Pod.UID != string(pod.UID):
		return cni.Response{Ambient: true, Reason: "not programmed: the agent has not programmed this pod"}, nil
	case !containsAll(pe.Pod.IPs, req.IPs):
		return cni.Response{Ambient: true, Reason: fmt.Sprintf("not programmed: the sandbox's addresses %v are not among the programmed %v", req.IPs, pe.Pod.IPs)}, nil
	}
	if programmed := c.dp.Programmed(string(pod.UID)); !containsAll(programmed, req.IPs) {
		return cni.Response{Ambient: true, Reason: fmt.Sprintf("not programmed: the kernel captures %v of the sandbox's addresses %v", programmed, req.IPs)}, nil
	}
	return cni.Response{Ambient: true, Programmed: true, Reason: pe.Status.Reason}, nil
}

// cniLookup finds the pod and its namespace, from the caches or the API;
// cached says the pod (that UID) came from the cache.
func (c *Controller) cniLookup(ctx context.Context, req cni.Request) (pod *corev1.Pod, ns *corev1.Namespace, cached bool, err error) {
	podLister, nsLister := c.listers()
	pod, err = podLister.Pods(req.PodNamespace).Get(req.PodName)
	cached = err == nil && (req.PodUID == "" || string(pod.UID) == req.PodUID)
	if !cached {
		pod, err = c.client.Pods(req.PodNamespace).Get(ctx, req.PodName, metav1.GetOptions{})
		if err != nil {
			return nil, nil, false, fmt.Errorf("pod %s/%s: %w", req.PodNamespace, req.PodName, err)
		}
		if req.PodUID != "" && string(pod.UID) != req.PodUID {
			return nil, nil, false, fmt.Errorf("pod %s/%s is UID %s, not the sandbox's %s", req.PodNamespace, req.PodName, pod.UID, req.PodUID)
		}
		pod = minimalPodOf(pod)
	}
	ns, err = nsLister.Get(req.PodNamespace)
	if err != nil {
		ns, err = c.client.Namespaces().Get(ctx, req.PodNamespace, metav1.GetOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return nil, nil, false, fmt.Errorf("namespace %s: %w", req.PodNamespace, err)
		}
		if err != nil {
			ns = nil
		}
	}
	return pod, ns, cached, nil
}

// withHandedOver is the pod to decide for key, given the cache's answer
// (p, err): see handover.Store.Resolve. Called with c.mu held.
func (c *Controller) withHandedOver(key string, p *corev1.Pod, err error) (*corev1.Pod, error) {
	return c.cni.Resolve(key, p, err, c.cachedPod)
}

// cachedPod is the pod cache's answer for ns/name now.
func (c *Controller) cachedPod(ns, name string) (*corev1.Pod, error) {
	podLister, _ := c.listers()
	if podLister == nil {
		return nil, apierrors.NewNotFound(corev1.Resource("pods"), ns+"/"+name)
	}
	return podLister.Pods(ns).Get(name)
}

// podKey queues one pod.
func (c *Controller) podKey(key string) { c.mark(func() { c.dirty[key] = true }) }

// withCNI applies what CNI said about p's sandbox (handover.Apply).
// Called with c.mu held.
func (c *Controller) withCNI(p *corev1.Pod) (*corev1.Pod, bool, bool, string) {
	hp, via, deleted := c.cni.Apply(p)
	return hp, via, deleted, c.cni.NetNS(p)
}

func containsAll(have, want []netip.Addr) bool {
	for _, a := range want {
		if !slices.Contains(have, a.Unmap()) {
			return false
		}
	}
	return true
}
