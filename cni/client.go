package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
)

// AgentError is the agent's answer when its handler failed: the agent runs
// and decided, so the plugin's failMode does not apply.
type AgentError struct {
	StatusCode int
	Message    string
}

func (e *AgentError) Error() string {
	return fmt.Sprintf("agent: %s (HTTP %d)", e.Message, e.StatusCode)
}

// Call sends req to the agent listening on socket and waits for its answer
// until ctx ends. Errors: an *AgentError when the agent answered with one;
// one IsUnreachable recognises when no agent listens; otherwise a transport
// error (wrapping context.DeadlineExceeded when ctx timed out).
func Call(ctx context.Context, socket string, req Request) (Response, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		// One request per process: nothing to keep alive.
		DisableKeepAlives: true,
	}}
	// The host part is ignored: DialContext always dials the socket.
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://ambient-redirect"+APIPath, bytes.NewReader(body))
	if err != nil {
		return Response{}, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hresp, err := client.Do(hreq)
	if err != nil {
		return Response{}, err
	}
	defer hresp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(hresp.Body, MaxRequestBytes))
	if err != nil {
		return Response{}, fmt.Errorf("reading the agent's answer: %w", err)
	}
	if hresp.StatusCode != http.StatusOK {
		var eb ErrorBody
		if json.Unmarshal(data, &eb) != nil || eb.Error == "" {
			eb.Error = string(bytes.TrimSpace(data))
		}
		return Response{}, &AgentError{StatusCode: hresp.StatusCode, Message: eb.Error}
	}
	var resp Response
	if err := json.Unmarshal(data, &resp); err != nil {
		return Response{}, fmt.Errorf("decoding the agent's answer: %w", err)
	}
	return resp, nil
}

// IsUnreachable reports whether err means no agent is running: the socket is
// missing or nobody listens on it. An agent that answered (AgentError) or is
// too slow (a timeout) is running, and is not unreachable.
func IsUnreachable(err error) bool {
	var ae *AgentError
	if err == nil || errors.As(err, &ae) {
		return false
	}
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
}
