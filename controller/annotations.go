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

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// The annotation reconciler: the redirection annotation follows what is
// programmed, on a queue of its own apart from the kernel loop.

func (c *Controller) kickAnnotations() {
	select {
	case c.annoKick <- struct{}{}:
	default:
	}
}

// annotationLoop makes the redirection annotation follow what is
// programmed: set once a pod's redirection is in the kernel, removed when it
// leaves. It runs apart from the kernel loop so an API outage never delays it.
func (c *Controller) annotationLoop(ctx context.Context) {
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.annoKick:
		case <-retry:
		}
		retry = nil
		if err := c.syncAnnotations(ctx); err != nil {
			c.log.Info("annotation sync incomplete; will retry", zap.Error(err))
			retry = time.After(time.Second)
		}
	}
}

func (c *Controller) syncAnnotations(ctx context.Context) error {
	podLister, _ := c.listers()
	pods, err := podLister.List(labels.Everything())
	if err != nil {
		return err
	}
	type patch struct {
		pod   *corev1.Pod
		value any
	}
	var todo []patch
	c.mu.Lock() // programmed changes in place
	for _, p := range pods {
		cur := p.Annotations[selection.RedirectionAnno]
		want := c.programmed[p.UID]
		switch {
		case want && cur == "":
			todo = append(todo, patch{p, selection.RedirectionEnabled})
		case !want && cur == selection.RedirectionEnabled:
			todo = append(todo, patch{p, nil}) // JSON null removes the key
		}
		// Otherwise in place, or an opt-out ("disabled") we never touch.
	}
	c.mu.Unlock()
	var errs []error
	for _, t := range todo {
		p := t.pod
		err := patchRedirection(ctx, c.client, p, t.value, "")
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("annotate %s/%s: %w", p.Namespace, p.Name, err))
		}
	}
	return errors.Join(errs...)
}
