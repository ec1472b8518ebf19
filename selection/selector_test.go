package selection_test

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/ambient-redirect/ambient-redirect/selection"
)

// TestSelectorAsAPIMachinery checks ParseSelector against the API machinery's
// parser, which the agent used before: the same selectors are accepted, and
// they match the same label sets.
func TestSelectorAsAPIMachinery(t *testing.T) {
	selectors := []string{
		"", "app=ztunnel", "app==ztunnel", "app = ztunnel", " app=ztunnel ", "app!=ztunnel",
		"app", "!app", "! app", "app,tier", "app=ztunnel,tier=proxy", "app=ztunnel, !canary",
		"app in (ztunnel,proxy)", "app in ( ztunnel , proxy )", "app notin (ztunnel)", "app in (ztunnel,)",
		"app in ()", "app notin ()", "app=", "app=,tier=x", "app!=", "n>3", "n<3", "n > 10", "n>x", "n>", "n>3,n<8",
		"istio.io/app=ztunnel", "Istio.io/app=x", "a/b/c=x", "/app=x", "app/=x", "-app=x", "app-=x", "app=-x", "app=x-",
		"app=ztunnel,", ",app=ztunnel", "app=ztunnel,,tier=x", "app=(x)", "app in x", "app in (x", "app in (x y)",
		"app=x y", "app=x=y", "app==", "app!", "=x", "!=x", "app !=x", "app=a.b_c-d", "app=" + string(make([]byte, 64)), "app=" + strings.Repeat("v", 64), "app=" + strings.Repeat("v", 63),
		"a=" + strings.Repeat("k", 254) + "/x", strings.Repeat("k", 253) + "/x=y", strings.Repeat("k", 64) + "=y", "app\t=\tx", "app in (x)y",
		"k.k8s.io/name=v", "app in (a,b),tier notin (c)", "app=ztunnel,app=proxy", "in=x", "notin", "app in", "app notin (a,b",
		"x=yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy", "UPPER=Case", "a=1,b>0",
	}
	labelSets := []map[string]string{
		nil, {"app": "ztunnel"}, {"app": "proxy"}, {"app": ""}, {"app": "ztunnel", "tier": "proxy"},
		{"tier": "x"}, {"n": "5"}, {"n": "11"}, {"n": "x"}, {"n": "1"}, {"istio.io/app": "ztunnel"},
		{"app": "ztunnel", "canary": "y"}, {"app": "a.b_c-d"}, {"UPPER": "Case"}, {"a": "1", "b": "2"}, {"a": "1", "b": "0"},
	}
	for _, s := range selectors {
		want, werr := labels.Parse(s)
		got, gerr := selection.ParseSelector(s)
		if (werr == nil) != (gerr == nil) {
			t.Errorf("ParseSelector(%q) error %v, API machinery's %v", s, gerr, werr)
			continue
		}
		if werr != nil {
			continue
		}
		for _, l := range labelSets {
			if g, w := got.Matches(l), want.Matches(labels.Set(l)); g != w {
				t.Errorf("%q.Matches(%v) = %v, API machinery's %v", s, l, g, w)
			}
		}
	}
}
