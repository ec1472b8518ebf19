package realcluster

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// TestPodManifestsParse: the app's Pod manifests are valid Pods, the
// sidecar one with its annotation and native-sidecar proxy.
func TestPodManifestsParse(t *testing.T) {
	for name, m := range map[string]string{"app": AppPod("ns", "a", "node0", "--echo", ":9000"), "sidecar": SidecarAppPod("ns", "s", "node0")} {
		var p corev1.Pod
		if err := yaml.UnmarshalStrict([]byte(strings.TrimSuffix(m, "---\n")), &p); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, m)
		}
		if len(p.Spec.Containers) != 1 || p.Spec.Containers[0].Args[0] != "serve" || p.Spec.NodeName != "node0" {
			t.Fatalf("%s: %+v", name, p.Spec)
		}
		if name == "sidecar" && (p.Annotations["sidecar.istio.io/status"] == "" || len(p.Spec.InitContainers) != 1 ||
			*p.Spec.InitContainers[0].RestartPolicy != corev1.ContainerRestartPolicyAlways || *p.Spec.InitContainers[0].SecurityContext.RunAsUser != 1337) {
			t.Fatalf("sidecar pod: %+v %+v", p.Annotations, p.Spec.InitContainers)
		}
	}
}
