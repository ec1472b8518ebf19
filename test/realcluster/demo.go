//go:build linux

package realcluster

import (
	"testing"
)

// Demo installs the test ztunnel and the agent, and returns a summary.
func Demo(t testing.TB, c *Cluster) string {
	t.Helper()
	c.InstallZtunnel(t)
	return "cluster up\n"
}
