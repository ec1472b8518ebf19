package istio

import (
	"slices"
	"strings"
	"testing"
)

func TestArgsFor(t *testing.T) {
	tests := []struct {
		name string
		ann  map[string]string
		want string
	}{
		{"defaults", nil, "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020"},
		{"tproxy and ranges", map[string]string{
			AnnotationInterceptionMode:        "TPROXY",
			AnnotationIncludeOutboundIPRanges: "10.96.0.0/12,fd00:10:96::/112",
			AnnotationExcludeOutboundIPRanges: "10.96.0.1/32",
			AnnotationIncludeInboundPorts:     "8080,9090",
			AnnotationExcludeInboundPorts:     "8081, 8082",
		}, "-p 15001 -z 15006 -u 1337 -m TPROXY -i 10.96.0.0/12,fd00:10:96::/112 -x 10.96.0.1/32 -b 8080,9090 -d 15090,15021,8081,8082,15020"},
		{"status port already excluded", map[string]string{AnnotationExcludeInboundPorts: "15020,8081"},
			"-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020,8081"},
		{"no status port", map[string]string{AnnotationStatusPort: "0"},
			"-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021"},
		{"optional flags", map[string]string{
			AnnotationIncludeOutboundPorts:     "443",
			AnnotationExcludeOutboundPorts:     "3306,5432",
			AnnotationKubevirtInterfaces:       "old0",
			AnnotationRerouteVirtualInterfaces: "new0",
			AnnotationExcludeInterfaces:        "eth1",
		}, "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020 -q 443 -o 3306,5432 -k new0 -c eth1"},
		{"old kubevirt name", map[string]string{AnnotationKubevirtInterfaces: "old0"},
			"-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020 -k old0"},
	}
	for _, tt := range tests {
		if got := strings.Join(ArgsFor(tt.ann), " "); got != tt.want {
			t.Errorf("%s:\n got %s\nwant %s", tt.name, got, tt.want)
		}
	}
	// An empty include list is passed as such (it disables capture).
	args := ArgsFor(map[string]string{AnnotationIncludeInboundPorts: ""})
	if i := slices.Index(args, "-b"); i < 0 || args[i+1] != "" {
		t.Errorf("empty includeInboundPorts: %q", args)
	}
}
