// Package cni is what the chained CNI plugin links: the protocol between the
// plugin and the agent (a JSON request over a unix socket) and its client,
// the plugin's network config, and the API lookup the plugin falls back to
// when the agent is not running. It imports no zap, no client-go and no
// k8s.io/api: the runtime starts the plugin for every pod, so it must start
// fast. The agent's side lives in cni/server (the socket) and cni/install
// (the binary, kubeconfig and conflist entry on the node).
package cni

import (
	"context"
	"net/netip"
)

// PluginType is the "type" of our entry in the conflist, and so the name the
// runtime looks the plugin binary up by.
const PluginType = "ambient-redirect"

// DefaultSocket is where the agent listens for the plugin.
const DefaultSocket = "/var/run/ambient-redirect/cni.sock"

// APIPath is the one endpoint of the protocol (POST, a JSON Request; the
// answer is a JSON Response, or an ErrorBody with any status but 200).
const APIPath = "/v1/cni"

// MaxRequestBytes bounds a request or answer body; a real one is a few
// hundred bytes.
const MaxRequestBytes = 64 << 10

// ErrorBody is the body of every non-200 answer.
type ErrorBody struct {
	Error string `json:"error"`
}

// CNI commands carried in Request.Command.
const (
	CommandAdd   = "ADD"
	CommandDel   = "DEL"
	CommandCheck = "CHECK"
)

// Request is one CNI invocation handed to the agent.
type Request struct {
	Command      string       `json:"command"` // CommandAdd, CommandDel or CommandCheck
	ContainerID  string       `json:"containerID"`
	NetNS        string       `json:"netns"`
	IfName       string       `json:"ifName"`
	PodNamespace string       `json:"podNamespace"`
	PodName      string       `json:"podName"`
	PodUID       string       `json:"podUID,omitempty"`
	IPs          []netip.Addr `json:"ips,omitempty"` // from prevResult
}

// Response is the agent's decision about the pod.
type Response struct {
	Ambient    bool   `json:"ambient"`
	Programmed bool   `json:"programmed"`
	Reason     string `json:"reason"`
}

// Handler is the agent's side of the protocol.
//
// For ADD it returns once the pod is programmed (Ambient and Programmed) or
// known not to be ambient (Ambient false). It must answer a non-ambient pod
// at once, without waiting for anything else: such a pod never depends on the
// agent. Ambient without Programmed (and no error) fails the ADD with Reason,
// as an error does; the plugin's failMode only covers an agent it cannot
// reach. The request context ends when the plugin gives up (its timeout) or
// the server stops.
//
// For DEL it forgets the pod; an unknown pod is not an error. For CHECK it
// reports the pod's state without changing it.
type Handler interface {
	HandleCNI(ctx context.Context, req Request) (Response, error)
}
