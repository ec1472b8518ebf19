// Package e2e runs the real ambient-redirect binary in ptp-shaped node
// network namespaces against a real etcd + kube-apiserver, under the RBAC of
// manifests/, and proves its behaviour with real sockets through the test
// ztunnel (see test/harness).
package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/ambient-redirect/ambient-redirect/test/harness"
	"github.com/ambient-redirect/ambient-redirect/test/sidecar/sidecartest"
)

var (
	bins harness.Binaries
	// sidecarProxy is the sidecar test proxy (test/sidecar/proxy).
	sidecarProxy string
)

func TestMain(m *testing.M) {
	os.Exit(func() int {
		if os.Geteuid() != 0 {
			return m.Run() // every test skips (or fails in CI) via RequireRoot
		}
		dir, err := os.MkdirTemp("", "ar-e2e-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if bins, err = harness.Build("../..", dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if sidecarProxy, err = sidecartest.BuildProxy(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return m.Run()
	}())
}
