package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// Fail modes: what ADD does when the agent cannot be reached and the pod is
// (or may be) ambient.
const (
	FailClosed = "closed" // ADD fails; the kubelet retries until the agent is back
	FailOpen   = "open"   // ADD passes; the pod starts uncaptured until the agent catches up
)

// DefaultTimeout is how long ADD waits for the agent to program a pod.
const DefaultTimeout = 30 * time.Second

// Defaults the agent's flags have too, so that the plugin's fallback decides
// as the agent would when the entry does not spell them out.
const (
	DefaultZtunnelNamespace = "istio-system"
	DefaultZtunnelSelector  = "app=ztunnel"
)

// DefaultExcludeNamespaces mirrors the agent's --exclude-namespaces default.
var DefaultExcludeNamespaces = []string{"kube-system"}

// SupportedVersions are the CNI spec versions the plugin speaks: every one
// with chaining (prevResult). The installer refuses a conflist of another
// version, since the runtime would then fail every pod's ADD on our entry.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// PluginConf is the plugin's network configuration: our entry in the
// conflist, as the runtime hands it to the plugin (with cniVersion, name and
// prevResult filled in).
type PluginConf struct {
	types.PluginConf

	Socket   string `json:"socket,omitempty"`   // default DefaultSocket
	FailMode string `json:"failMode,omitempty"` // FailClosed (default) or FailOpen
	// Timeout is a Go duration: how long ADD waits for the agent. Default DefaultTimeout.
	Timeout string `json:"timeout,omitempty"`
	// Kubeconfig is read only when the agent is unreachable, to tell a
	// non-ambient pod (which may start) from an ambient one.
	Kubeconfig        string   `json:"kubeconfig,omitempty"`
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"` // nil: DefaultExcludeNamespaces
	ZtunnelNamespace  string   `json:"ztunnelNamespace,omitempty"`
	ZtunnelSelector   string   `json:"ztunnelSelector,omitempty"`
	// SidecarCapture says the agent writes sidecar pods' rules (its
	// --sidecar-capture; nil: true), so that with the agent unreachable
	// such a pod waits as an ambient one does (failMode).
	SidecarCapture *bool `json:"sidecarCapture,omitempty"`
}

// ParseConf decodes the plugin's stdin config, fills in defaults and
// validates it. prevResult stays raw (see version.ParsePrevResult).
func ParseConf(data []byte) (*PluginConf, error) {
	c := &PluginConf{}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, fmt.Errorf("ambient-redirect: decoding network config: %w", err)
	}
	c.Defaults()
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("ambient-redirect: network config: %w", err)
	}
	return c, nil
}

// MarshalJSON writes every field. Without it, the embedded
// types.PluginConf's MarshalJSON would be promoted and leave ours out.
func (c PluginConf) MarshalJSON() ([]byte, error) {
	base, err := c.PluginConf.MarshalJSON()
	if err != nil {
		return nil, err
	}
	own, err := json.Marshal(c.Own())
	if err != nil {
		return nil, err
	}
	m := map[string]json.RawMessage{}
	if err := json.Unmarshal(base, &m); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(own, &m); err != nil {
		return nil, err
	}
	return json.Marshal(m)
}

// Defaults fills in every unset field.
func (c *PluginConf) Defaults() {
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.FailMode == "" {
		c.FailMode = FailClosed
	}
	if c.Timeout == "" {
		c.Timeout = DefaultTimeout.String()
	}
	if c.ExcludeNamespaces == nil {
		c.ExcludeNamespaces = slices.Clone(DefaultExcludeNamespaces)
	}
	if c.ZtunnelNamespace == "" {
		c.ZtunnelNamespace = DefaultZtunnelNamespace
	}
	if c.ZtunnelSelector == "" {
		c.ZtunnelSelector = DefaultZtunnelSelector
	}
}

// Validate checks the fields that are set; run Defaults first for a complete
// config.
func (c *PluginConf) Validate() error {
	var errs []error
	if c.Socket != "" && !filepath.IsAbs(c.Socket) {
		errs = append(errs, fmt.Errorf("socket %q: must be an absolute path", c.Socket))
	}
	switch c.FailMode {
	case "", FailClosed, FailOpen:
	default:
		errs = append(errs, fmt.Errorf("failMode %q: must be %q or %q", c.FailMode, FailClosed, FailOpen))
	}
	if c.Timeout != "" {
		if d, err := time.ParseDuration(c.Timeout); err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("timeout %q: must be a positive Go duration such as \"30s\"", c.Timeout))
		}
	}
	if c.Kubeconfig != "" && !filepath.IsAbs(c.Kubeconfig) {
		errs = append(errs, fmt.Errorf("kubeconfig %q: must be an absolute path", c.Kubeconfig))
	}
	if c.ZtunnelSelector != "" {
		if _, err := selection.ParseSelector(c.ZtunnelSelector); err != nil {
			errs = append(errs, fmt.Errorf("ztunnelSelector %q: %w", c.ZtunnelSelector, err))
		}
	}
	return errors.Join(errs...)
}

// TimeoutDuration is Timeout parsed; DefaultTimeout when unset or invalid.
func (c *PluginConf) TimeoutDuration() time.Duration {
	if d, err := time.ParseDuration(c.Timeout); err == nil && d > 0 {
		return d
	}
	return DefaultTimeout
}

// SelectionOptions are the options the fallback lookup decides with.
func (c *PluginConf) SelectionOptions() (selection.Options, error) {
	sel, err := selection.ParseSelector(c.ZtunnelSelector)
	if err != nil {
		return selection.Options{}, fmt.Errorf("ztunnelSelector %q: %w", c.ZtunnelSelector, err)
	}
	return selection.Options{
		ExcludeNamespaces: c.ExcludeNamespaces,
		ZtunnelNamespace:  c.ZtunnelNamespace,
		ZtunnelSelector:   sel,
		SidecarCapture:    c.SidecarCapture == nil || *c.SidecarCapture,
	}, nil
}

// OwnFields are PluginConf's fields beyond types.PluginConf, as written:
// what MarshalJSON adds and what the installer puts in the conflist.
type OwnFields struct {
	Socket     string `json:"socket,omitempty"`
	FailMode   string `json:"failMode,omitempty"`
	Timeout    string `json:"timeout,omitempty"`
	Kubeconfig string `json:"kubeconfig,omitempty"`
	// A pointer so that an explicit empty list ("exclude nothing") is
	// written, while nil (the plugin's default) is not.
	ExcludeNamespaces *[]string `json:"excludeNamespaces,omitempty"`
	ZtunnelNamespace  string    `json:"ztunnelNamespace,omitempty"`
	ZtunnelSelector   string    `json:"ztunnelSelector,omitempty"`
	SidecarCapture    *bool     `json:"sidecarCapture,omitempty"`
}

// Own returns c's own fields.
func (c *PluginConf) Own() OwnFields {
	f := OwnFields{
		Socket: c.Socket, FailMode: c.FailMode, Timeout: c.Timeout, Kubeconfig: c.Kubeconfig,
		ZtunnelNamespace: c.ZtunnelNamespace, ZtunnelSelector: c.ZtunnelSelector, SidecarCapture: c.SidecarCapture,
	}
	if c.ExcludeNamespaces != nil {
		f.ExcludeNamespaces = &c.ExcludeNamespaces
	}
	return f
}
