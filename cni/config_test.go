package cni

import (
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseConf(t *testing.T) {
	cases := []struct {
		name, conf string
		wantErr    []string // substrings; none: valid
	}{
		{name: "defaults", conf: `{"cniVersion":"1.0.0","name":"n","type":"ambient-redirect"}`},
		{name: "all set", conf: `{"cniVersion":"0.4.0","name":"n","type":"ambient-redirect","socket":"/run/x.sock",
			"failMode":"open","timeout":"2s","kubeconfig":"/etc/cni/net.d/kc","excludeNamespaces":[],
			"ztunnelNamespace":"zt","ztunnelSelector":"app in (ztunnel, zt2)"}`},
		{name: "bad failMode", conf: `{"failMode":"Closed"}`, wantErr: []string{`failMode "Closed"`, `"closed" or "open"`}},
		{name: "bad timeout", conf: `{"timeout":"30"}`, wantErr: []string{`timeout "30"`, "Go duration"}},
		{name: "negative timeout", conf: `{"timeout":"-1s"}`, wantErr: []string{`timeout "-1s"`}},
		{name: "relative paths", conf: `{"socket":"cni.sock","kubeconfig":"kc"}`, wantErr: []string{`socket "cni.sock"`, `kubeconfig "kc"`}},
		{name: "bad selector", conf: `{"ztunnelSelector":"app in (a"}`, wantErr: []string{"ztunnelSelector"}},
		{name: "not JSON", conf: `{`, wantErr: []string{"decoding network config"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConf([]byte(tc.conf))
			if len(tc.wantErr) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				if _, err := c.SelectionOptions(); err != nil {
					t.Error(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("ParseConf(%s) succeeded", tc.conf)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

func TestConfDefaults(t *testing.T) {
	c, err := ParseConf([]byte(`{"cniVersion":"1.0.0","name":"n","type":"ambient-redirect"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != DefaultSocket || c.FailMode != FailClosed || c.TimeoutDuration() != 30*time.Second ||
		!slices.Equal(c.ExcludeNamespaces, []string{"kube-system"}) || c.ZtunnelNamespace != "istio-system" || c.ZtunnelSelector != "app=ztunnel" {
		t.Errorf("defaults = %+v", c)
	}
	// An explicit empty list means "exclude nothing", not the default.
	c, err = ParseConf([]byte(`{"excludeNamespaces":[]}`))
	if err != nil || c.ExcludeNamespaces == nil || len(c.ExcludeNamespaces) != 0 {
		t.Errorf("excludeNamespaces [] became %v (%v)", c.ExcludeNamespaces, err)
	}
}

// Marshalling a PluginConf (say, to show the effective config) keeps our
// fields, which the embedded types.PluginConf's MarshalJSON would drop.
func TestConfMarshalRoundTrip(t *testing.T) {
	in := `{"cniVersion":"1.0.0","name":"n","type":"ambient-redirect","failMode":"open","timeout":"3s","excludeNamespaces":[]}`
	c, err := ParseConf([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []any{c, *c} {
		out, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		back, err := ParseConf(out)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, c) {
			t.Errorf("round trip through %s:\n got %+v\nwant %+v", out, back, c)
		}
	}
}
