package dataplane

// The managers the agent keeps across applies: one per kind of kernel
// object whose desired and last known state outlive a convergence. Ip
// rules, sysctls and a netns's routes outside the node are read back on
// every full apply, so their managers live for one convergence only.

type managers struct {
	sets       map[Family]*setManager
	routes     *routeManager
	nodeFilter map[Family]*filterManager
	// ztFilter are each ztunnel netns's chains, by path and family.
	ztFilter map[string]map[Family]*filterManager
}

func newManagers() managers {
	return managers{sets: map[Family]*setManager{}, nodeFilter: map[Family]*filterManager{}, ztFilter: map[string]map[Family]*filterManager{}}
}

// clone copies the managers for a dry run (Diff): it converges the copies,
// recording instead of writing, so what it records is exactly what is
// pending, and what the next apply starts from stays as it was.
func (m *managers) clone() *managers {
	c := newManagers()
	for f, s := range m.sets {
		c.sets[f] = s.clone()
	}
	c.routes = m.routes.clone()
	for f, n := range m.nodeFilter {
		c.nodeFilter[f] = n.clone()
	}
	for path, fs := range m.ztFilter {
		c.ztFilter[path] = map[Family]*filterManager{}
		for f, n := range fs {
			c.ztFilter[path][f] = n.clone()
		}
	}
	return &c
}
