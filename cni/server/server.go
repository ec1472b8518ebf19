// Package server is the agent's side of the plugin's socket: it listens
// and hands each request to a cni.Handler.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

// Server is the agent's listener for the plugin: HTTP over a unix socket
// only root can reach (directory 0700, socket 0600), since whoever can talk
// to it can make the agent wait on, or forget, any pod.
type Server struct {
	path string
	ln   net.Listener
}

// Listen creates the socket at path. A socket left behind by a previous agent
// is replaced; a live one (another agent answers) or a file that is not a
// socket is an error rather than something to delete.
func Listen(path string) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cni socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("cni socket %s: exists and is not a socket; not removing it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("cni socket %s: another process is listening on it", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("removing stale cni socket: %w", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("cni socket %s: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("cni socket: %w", err)
	}
	// The 0700 directory already keeps others out while the socket still has
	// the umask's mode; the chmod matters when the directory pre-existed.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("cni socket: %w", err)
	}
	return &Server{path: path, ln: ln}, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Serve answers requests with h until ctx is done, then stops (in-flight
// handlers see their context cancelled) and removes the socket. A request's
// context also ends when the plugin hangs up. log may be nil.
func (s *Server) Serve(ctx context.Context, h cni.Handler, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cni.APIPath, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var req cni.Request
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, cni.MaxRequestBytes))
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, cni.ErrorBody{Error: "decoding request: " + err.Error()})
			return
		}
		switch req.Command {
		case cni.CommandAdd, cni.CommandDel, cni.CommandCheck:
		default:
			writeJSON(w, http.StatusBadRequest, cni.ErrorBody{Error: fmt.Sprintf("unknown command %q", req.Command)})
			return
		}
		resp, err := h.HandleCNI(r.Context(), req)
		fields := []zap.Field{
			zap.String("command", req.Command), zap.String("pod", req.PodNamespace+"/"+req.PodName),
			zap.String("containerID", req.ContainerID), zap.Duration("elapsed", time.Since(start)),
		}
		if err != nil {
			log.Warn("cni request failed", append(fields, zap.Error(err))...)
			writeJSON(w, http.StatusInternalServerError, cni.ErrorBody{Error: err.Error()})
			return
		}
		log.Debug("cni request", append(fields, zap.Bool("ambient", resp.Ambient),
			zap.Bool("programmed", resp.Programmed), zap.String("reason", resp.Reason))...)
		writeJSON(w, http.StatusOK, resp)
	})
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	stopped := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-ctx.Done():
		case <-stopped:
			return
		}
		// Handlers see ctx cancelled through BaseContext, so they return soon.
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
	}()
	// Closing the listener (Shutdown does) unlinks the socket: net.Listen
	// created it, so it owns it.
	err := srv.Serve(s.ln)
	close(stopped)
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	s.ln.Close()
	return fmt.Errorf("cni server: %w", err)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
