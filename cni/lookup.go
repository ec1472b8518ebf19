package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// LookupTimeout bounds the whole fallback lookup: it runs while a pod's
// sandbox waits, and only when the agent is down.
const LookupTimeout = 5 * time.Second

// Lookup decides from the API server, as the agent would, whether a pod is
// ambient: the plugin's fallback when the agent is unreachable, so that a
// non-ambient pod can start without it. A pod that is not found is an error
// (undecided), not "not ambient".
func Lookup(ctx context.Context, kubeconfigPath, namespace, name string, o selection.Options) (ambient bool, reason string, err error) {
	a, err := LoadKubeconfig(kubeconfigPath)
	if err != nil {
		return false, "", err
	}
	client, err := a.HTTPClient(LookupTimeout)
	if err != nil {
		return false, "", err
	}
	ctx, cancel := context.WithTimeout(ctx, LookupTimeout)
	defer cancel()

	var pod object
	if err := a.get(ctx, client, "/api/v1/namespaces/"+url.PathEscape(namespace)+"/pods/"+url.PathEscape(name), &pod); err != nil {
		return false, "", fmt.Errorf("pod %s/%s: %w", namespace, name, err)
	}
	p := &selection.Pod{Namespace: pod.Metadata.Namespace, Name: pod.Metadata.Name,
		Labels: pod.Metadata.Labels, Annotations: pod.Metadata.Annotations}
	for _, c := range pod.Spec.InitContainers {
		p.InitContainers = append(p.InitContainers, c.Name)
	}
	// A sidecar pod whose rules are the agent's needs it as an ambient
	// pod does.
	if sidecar, reason := selection.SidecarCaptured(p, o); sidecar {
		return true, reason, nil
	}
	// The pod's own labels often decide; the namespace is read only if not.
	if ambient, reason := selection.Ambient(p, nil, o); reason != selection.ReasonNamespaceUnknown {
		return ambient, reason, nil
	}
	var ns object
	if err := a.get(ctx, client, "/api/v1/namespaces/"+url.PathEscape(namespace), &ns); err != nil {
		return false, "", fmt.Errorf("namespace %s: %w", namespace, err)
	}
	ambient, reason = selection.Ambient(p, &selection.Namespace{Labels: ns.Metadata.Labels}, o)
	return ambient, reason, nil
}

// object is what Lookup reads of a pod or a namespace: the metadata that
// selection.Ambient decides with, and a pod's init containers' names.
// Decoding only these fields keeps the plugin free of the API's types.
type object struct {
	Metadata struct {
		Namespace   string            `json:"namespace"`
		Name        string            `json:"name"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec struct {
		InitContainers []struct {
			Name string `json:"name"`
		} `json:"initContainers"`
	} `json:"spec"`
}

// get decodes the JSON object at path into out; any status but 200 is an
// error carrying the API server's message.
func (a *APIServer) get(ctx context.Context, client *http.Client, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.Server+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if a.Token != "" {
		req.Header.Set("Authorization", "Bearer "+a.Token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var st struct {
			Message string `json:"message"`
		}
		msg := strings.TrimSpace(string(data))
		if json.Unmarshal(data, &st) == nil && st.Message != "" {
			msg = st.Message
		}
		return fmt.Errorf("API server: %s: %s", resp.Status, msg)
	}
	return json.Unmarshal(data, out)
}
