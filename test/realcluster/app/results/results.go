// Package results is what the test app (test/realcluster/app) reports on
// /results, for the app and the tests that read it.
package results

import "time"

// Dial is one connection's outcome.
type Dial struct {
	Target string    `json:"target"`
	Local  string    `json:"local"` // our address
	Peer   string    `json:"peer"`  // our address as the server saw it
	Err    string    `json:"err,omitempty"`
	At     time.Time `json:"at"`
}

// Stream is the long-lived connection's state.
type Stream struct {
	Target   string    `json:"target"`
	Local    string    `json:"local"`
	Peer     string    `json:"peer"`
	Sent     int       `json:"sent"`
	Echoed   int       `json:"echoed"`
	LastEcho time.Time `json:"last_echo"`
	Err      string    `json:"err,omitempty"`
	EndedAt  time.Time `json:"ended_at"`
}

// Results is what /results returns.
type Results struct {
	Start      []Dial  `json:"start"`
	Loop       []Dial  `json:"loop"`
	LoopErrors int     `json:"loop_errors"`
	Stream     *Stream `json:"stream,omitempty"`
}
