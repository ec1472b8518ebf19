// Package cnitest has test doubles for users of package cni: an agent
// (a server.Server with a scripted Handler) and an API server serving pods and
// namespaces to cni.Lookup.
package cnitest

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/cni/server"
)

// Agent is a scripted cni.Handler that records what it was asked.
type Agent struct {
	// Answer decides each request; nil answers "not ambient".
	Answer func(ctx context.Context, req cni.Request) (cni.Response, error)

	mu       sync.Mutex
	requests []cni.Request
}

// HandleCNI implements cni.Handler.
func (a *Agent) HandleCNI(ctx context.Context, req cni.Request) (cni.Response, error) {
	a.mu.Lock()
	a.requests = append(a.requests, req)
	a.mu.Unlock()
	if a.Answer == nil {
		return cni.Response{Reason: "not ambient"}, nil
	}
	return a.Answer(ctx, req)
}

// Requests returns the requests so far.
func (a *Agent) Requests() []cni.Request {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]cni.Request(nil), a.requests...)
}

// SocketPath is a fresh socket path, short enough for sun_path (108 bytes),
// which t.TempDir under a long test name is not.
func SocketPath(t testing.TB) string {
	dir, err := os.MkdirTemp("", "arcni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "run", "cni.sock")
}

// Serve runs a server.Server for h on a fresh socket until the test ends and
// returns the socket's path.
func Serve(t testing.TB, h cni.Handler) string {
	path := SocketPath(t)
	srv, err := server.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, h, zap.NewNop()) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("cni server: %v", err)
		}
	})
	return path
}

// Token is the bearer token the API server accepts.
const Token = "cnitest-token"

// API is a fake API server (TLS, bearer token) serving GET of the pods and
// namespaces it holds.
type API struct {
	// Kubeconfig is the path of a kubeconfig for it.
	Kubeconfig string
	// Hits counts requests.
	Hits atomic.Int64
}

// NewAPI starts an API server holding objs (*corev1.Pod, *corev1.Namespace)
// until the test ends.
func NewAPI(t testing.TB, objs ...metav1.Object) *API {
	api := &API{}
	mux := http.NewServeMux()
	for _, o := range objs {
		var path string
		switch o.(type) {
		case *corev1.Pod:
			path = "/api/v1/namespaces/" + o.GetNamespace() + "/pods/" + o.GetName()
		case *corev1.Namespace:
			path = "/api/v1/namespaces/" + o.GetName()
		default:
			t.Fatalf("cnitest.NewAPI: unsupported object %T", o)
		}
		body, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		mux.HandleFunc("GET "+path, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(body)
		})
	}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		api.Hits.Add(1)
		if r.Header.Get("Authorization") != "Bearer "+Token {
			http.Error(w, `{"kind":"Status","message":"Unauthorized"}`, http.StatusUnauthorized)
			return
		}
		if _, pattern := mux.Handler(r); pattern == "" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"kind":"Status","status":"Failure","message":"` + r.URL.Path + ` not found","reason":"NotFound","code":404}`))
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	api.Kubeconfig = filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(api.Kubeconfig, cni.Kubeconfig(srv.URL, ca, Token, nil, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	return api
}
