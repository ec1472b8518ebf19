package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLinksOnlyWhatItNeeds keeps the plugin small and quick to start (the
// runtime runs it for every pod): none of the agent's libraries may creep
// back into its imports through package cni or selection. (A YAML parser
// stays: the plugin config may name a kubeconfig people wrote.)
func TestLinksOnlyWhatItNeeds(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to list the imports with")
	}
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	banned := []string{"k8s.io/", "go.uber.org/zap", "github.com/prometheus/", "github.com/vishvananda/netlink",
		"github.com/ambient-redirect/ambient-redirect/controller", "github.com/ambient-redirect/ambient-redirect/dataplane",
		"github.com/ambient-redirect/ambient-redirect/cni/install", "github.com/ambient-redirect/ambient-redirect/cni/server",
		"github.com/ambient-redirect/ambient-redirect/selection/kube"}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "sigs.k8s.io/yaml") {
			continue
		}
		for _, b := range banned {
			if strings.Contains(pkg, b) {
				t.Errorf("the plugin imports %s", pkg)
			}
		}
	}
}
