package cni_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/cni/cnitest"
	"github.com/ambient-redirect/ambient-redirect/selection"
)

func pod(ns, name string, lbls map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbls}}
}

// sidecar is a pod injected with Istio's sidecar, with or without istio-init.
func sidecar(ns, name string, istioInit bool) *corev1.Pod {
	p := pod(ns, name, nil)
	p.Annotations = map[string]string{selection.SidecarStatusAnno: "{}"}
	if istioInit {
		p.Spec.InitContainers = []corev1.Container{{Name: selection.IstioInitContainer}}
	}
	return p
}

func namespace(name string, lbls map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: lbls}}
}

func TestLookup(t *testing.T) {
	ambientNS := map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient}
	api := cnitest.NewAPI(t,
		namespace("mesh", ambientNS), namespace("plain", nil), namespace("istio-system", ambientNS),
		pod("mesh", "a", nil),
		pod("mesh", "opted-out", map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeNone}),
		pod("plain", "b", nil),
		pod("plain", "labelled", map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient}),
		pod("istio-system", "ztunnel-x", map[string]string{"app": "ztunnel"}),
		sidecar("plain", "sidecar", false), sidecar("plain", "istio-init", true),
	)
	sel, err := selection.ParseSelector("app=ztunnel")
	if err != nil {
		t.Fatal(err)
	}
	o := selection.Options{
		ExcludeNamespaces: []string{"kube-system"},
		ZtunnelNamespace:  "istio-system",
		ZtunnelSelector:   sel,
		SidecarCapture:    true,
	}
	cases := []struct {
		ns, name   string
		want       bool
		wantReason string
	}{
		{"mesh", "a", true, selection.ReasonEnrolledNamespace},
		{"mesh", "opted-out", false, selection.ReasonOptOutLabel},
		{"plain", "b", false, selection.ReasonNotAmbient},
		{"plain", "labelled", true, selection.ReasonEnrolledPodLabel},
		{"istio-system", "ztunnel-x", false, selection.ReasonZtunnel},
		// A sidecar pod whose rules are the agent's waits for it, as an
		// ambient pod does; one with istio-init writes its own.
		{"plain", "sidecar", true, selection.ReasonSidecarCapture},
		{"plain", "istio-init", false, selection.ReasonSidecar},
	}
	for _, tc := range cases {
		got, reason, err := cni.Lookup(context.Background(), api.Kubeconfig, tc.ns, tc.name, o)
		if err != nil || got != tc.want || reason != tc.wantReason {
			t.Errorf("Lookup(%s/%s) = %v, %q, %v; want %v, %q", tc.ns, tc.name, got, reason, err, tc.want, tc.wantReason)
		}
	}
	if _, _, err := cni.Lookup(context.Background(), api.Kubeconfig, "mesh", "gone", o); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("Lookup of a missing pod: %v; want a 404 error", err)
	}
}

func TestLookupUnauthorized(t *testing.T) {
	api := cnitest.NewAPI(t, pod("mesh", "a", nil))
	a, err := cni.LoadKubeconfig(api.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(t.TempDir(), "kc")
	if err := os.WriteFile(kc, cni.Kubeconfig(a.Server, a.CAData, "wrong", nil, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = cni.Lookup(context.Background(), kc, "mesh", "a", selection.Options{})
	if err == nil || !strings.Contains(err.Error(), "Unauthorized") {
		t.Errorf("Lookup with a bad token: %v; want the API server's Unauthorized", err)
	}
}

func TestLoadKubeconfig(t *testing.T) {
	dir := t.TempDir()
	kc := filepath.Join(dir, "kc.json")
	if err := os.WriteFile(kc, cni.Kubeconfig("https://10.96.0.1:443/", []byte("CA"), "tok\n", []byte("CERT"), []byte("KEY")), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := cni.LoadKubeconfig(kc)
	if err != nil {
		t.Fatal(err)
	}
	if a.Server != "https://10.96.0.1:443" || string(a.CAData) != "CA" || a.Token != "tok" || string(a.CertData) != "CERT" || string(a.KeyData) != "KEY" {
		t.Errorf("LoadKubeconfig = %+v", a)
	}

	// One written by hand, with files relative to it and a context to pick.
	for name, content := range map[string]string{"ca.crt": "CA2", "token": "tok2\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	js := []byte(`{"apiVersion": "v1", "kind": "Config", "current-context": "second",
  "clusters": [
    {"name": "one", "cluster": {"server": "https://one"}},
    {"name": "two", "cluster": {"server": "https://two:6443", "certificate-authority": "ca.crt"}}],
  "contexts": [
    {"name": "first", "context": {"cluster": "one", "user": "u1"}},
    {"name": "second", "context": {"cluster": "two", "user": "u2"}}],
  "users": [
    {"name": "u1", "user": {"token": "nope"}},
    {"name": "u2", "user": {"tokenFile": "token"}}]}
`)
	kc = filepath.Join(dir, "kc2.json")
	if err := os.WriteFile(kc, js, 0o600); err != nil {
		t.Fatal(err)
	}
	a, err = cni.LoadKubeconfig(kc)
	if err != nil {
		t.Fatal(err)
	}
	if a.Server != "https://two:6443" || !bytes.Equal(a.CAData, []byte("CA2")) || a.Token != "tok2" {
		t.Errorf("LoadKubeconfig(hand-written) = %+v", a)
	}
	// YAML, as people write kubeconfigs, is read too.
	kc = filepath.Join(dir, "kc.yaml")
	yamlKC := "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://three:6443\n" +
		"    certificate-authority-data: Q0Ez\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\nusers:\n- name: u\n  user:\n    token: tok3\n"
	if err := os.WriteFile(kc, []byte(yamlKC), 0o600); err != nil {
		t.Fatal(err)
	}
	if a, err := cni.LoadKubeconfig(kc); err != nil || a.Server != "https://three:6443" || !bytes.Equal(a.CAData, []byte("CA3")) || a.Token != "tok3" {
		t.Errorf("LoadKubeconfig(yaml) = %+v, %v", a, err)
	}
	if err := os.WriteFile(kc, []byte("clusters: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := cni.LoadKubeconfig(kc); err == nil {
		t.Error("LoadKubeconfig of broken YAML succeeded")
	}
	if _, err := cni.LoadKubeconfig(filepath.Join(dir, "missing")); err == nil {
		t.Error("LoadKubeconfig of a missing file succeeded")
	}
}
