// Package cni is the node side of the chained CNI plugin: the protocol
// between the plugin and the agent (a JSON request over a unix socket), the
// plugin's network config, its installer (binary plus an entry in the primary
// conflist) and the API lookup the plugin falls back to when the agent is not
// running. It imports no client-go: the plugin binary links it and must start
// fast.
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
