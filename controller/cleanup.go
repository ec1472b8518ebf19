package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/ambient-redirect/ambient-redirect/selection"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// patchRedirection sets the redirection annotation of pod to value (nil
// removes it: JSON null); a resourceVersion makes the patch conditional.
func patchRedirection(ctx context.Context, client kubernetes.Interface, pod *corev1.Pod, value any, resourceVersion string) error {
	meta := map[string]any{"annotations": map[string]any{selection.RedirectionAnno: value}}
	if resourceVersion != "" {
		meta["resourceVersion"] = resourceVersion
	}
	patch, _ := json.Marshal(map[string]any{"metadata": meta})
	_, err := client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	return err
}

// RemoveAnnotations removes selection.RedirectionAnno=enabled from node's pods (for
// `cleanup`, once the kernel no longer redirects them) and returns how many
// pods lost it. An opt-out ("disabled") is never touched.
func RemoveAnnotations(ctx context.Context, client kubernetes.Interface, node string) (int, error) {
	if node == "" {
		return 0, errors.New("no node name")
	}
	removed := 0
	for attempt := 1; ; attempt++ {
		list, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			return removed, fmt.Errorf("list pods of node %s: %w", node, err)
		}
		var errs []error
		conflicts := 0
		for _, p := range list.Items {
			if p.Spec.NodeName != node || p.Annotations[selection.RedirectionAnno] != selection.RedirectionEnabled {
				continue
			}
			if ctx.Err() != nil {
				return removed, errors.Join(append(errs, ctx.Err())...)
			}
			// The resourceVersion makes the patch conditional: a pod changed
			// since the list (perhaps opted out) is listed again, not patched.
			err := patchRedirection(ctx, client, &p, nil, p.ResourceVersion)
			switch {
			case err == nil:
				removed++
			case apierrors.IsNotFound(err):
			case apierrors.IsConflict(err):
				conflicts++
			default:
				errs = append(errs, fmt.Errorf("pod %s/%s: %w", p.Namespace, p.Name, err))
			}
		}
		if conflicts > 0 && attempt < 3 {
			continue
		}
		if conflicts > 0 {
			errs = append(errs, fmt.Errorf("%d pods kept changing while being patched", conflicts))
		}
		return removed, errors.Join(errs...)
	}
}
