package controller

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// The annotation reconciler: the redirection annotation follows what is
// programmed, on a queue of its own apart from the kernel loop.

// annotator makes the annotations follow what the controller programmed.
// It reads the pod cache and the programmed set, and writes the API only.
type annotator struct {
	client API
	log    *zap.Logger
	// pods is the pod cache of the current informer generation.
	pods func() corelisters.PodLister
	// programmed asks the dataplane whether a pod is programmed.
	programmed func(uid types.UID) bool
	kick       chan struct{}
}

func newAnnotator(client API, log *zap.Logger, pods func() corelisters.PodLister, programmed func(types.UID) bool) *annotator {
	return &annotator{client: client, log: log, pods: pods, programmed: programmed, kick: make(chan struct{}, 1)}
}

// Kick asks for a pass; any number of kicks coalesce.
func (a *annotator) Kick() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// run makes the redirection annotation follow what is
// programmed: set once a pod's redirection is in the kernel, removed when it
// leaves. It runs apart from the kernel loop so an API outage never delays it.
func (a *annotator) run(ctx context.Context) {
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		case <-retry:
		}
		retry = nil
		if err := a.sync(ctx); err != nil {
			a.log.Info("annotation sync incomplete; will retry", zap.Error(err))
			retry = time.After(time.Second)
		}
	}
}

// sync makes one pass over the node's pods.
func (a *annotator) sync(ctx context.Context) error {
	pods, err := a.pods().List(labels.Everything())
	if err != nil {
		return err
	}
	type patch struct {
		pod   *corev1.Pod
		value any
	}
	var todo []patch
	for _, p := range pods {
		cur := p.Annotations[selection.RedirectionAnno]
		want := a.programmed(p.UID)
		switch {
		case want && cur == "":
			todo = append(todo, patch{p, selection.RedirectionEnabled})
		case !want && cur == selection.RedirectionEnabled:
			todo = append(todo, patch{p, nil}) // JSON null removes the key
		}
		// Otherwise in place, or an opt-out ("disabled") we never touch.
	}
	var errs []error
	for _, t := range todo {
		p := t.pod
		err := patchRedirection(ctx, a.client, p, t.value, "")
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("annotate %s/%s: %w", p.Namespace, p.Name, err))
		}
	}
	return errors.Join(errs...)
}
