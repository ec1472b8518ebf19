// Package record is the test ztunnel's record format: one JSON line per
// accepted connection. The test ztunnel writes it; tests read it.
package record

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
)

// Record is one accepted connection.
type Record struct {
	Listener int    `json:"listener"`
	Client   string `json:"client"`
	OrigDst  string `json:"orig_dst"`
	Target   string `json:"target"`
	HBONE    bool   `json:"hbone"`
	// HeaderClient is the client announced in a CONNECT header (15008 only);
	// Client is then the peer ztunnel.
	HeaderClient string `json:"header_client,omitempty"`
	DialError    string `json:"dial_error"`
	Time         string `json:"time"`
}

// Read returns the records of a file; a missing file has none.
func Read(path string) ([]Record, error) { return ReadLines[Record](path) }

// ReadLines reads a file of one JSON value per line (a test proxy's
// records); a missing file has none.
func ReadLines[T any](path string) ([]T, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []T
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r T
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return out, fmt.Errorf("bad record %q: %w", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out, sc.Err()
}
