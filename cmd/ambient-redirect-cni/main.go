// Command ambient-redirect-cni is the chained CNI plugin: run after the
// primary plugin, it hands each new pod to the node agent and lets the
// sandbox start only once the agent has captured it (or found it is not
// ambient). It links no client-go: the runtime starts it for every pod.
package main

import (
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

func main() {
	// GC and STATUS (spec 1.1.0) are left to skel, which answers success: the
	// agent collects stale pods from its informer, and a STATUS failure would
	// take the node's whole pod network down while the agent restarts.
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck},
		version.PluginSupports(cni.SupportedVersions...), "CNI plugin "+cni.PluginType+" "+buildVersion())
}

// buildVersion is the module version and VCS revision, for the "about" line.
func buildVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			v += " " + s.Value
		}
	}
	return v
}
