package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

// fixtures are conflists as primary plugins write them, each exercising a
// layout: kindnet's template (tabs, elements at the array's indentation, a
// comma on a line of its own), compact JSON without a final newline, tabs
// with brackets and a "plugins" key inside strings and a nested object, four
// spaces with a mix of one-line and multi-line elements, and a one-element
// list. Each also runs with CRLF line ends.
func fixtures(t *testing.T) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, name := range []string{"kindnet", "compact", "tabs", "four-spaces", "two-spaces-single"} {
		data, err := os.ReadFile(filepath.Join("testdata", name+".conflist"))
		if err != nil {
			t.Fatal(err)
		}
		out[name] = data
		if bytes.Contains(data, []byte("\n")) {
			out[name+"-crlf"] = bytes.ReplaceAll(data, []byte("\n"), []byte("\r\n"))
		}
	}
	return out
}

// fakePlugin is a script answering CNI VERSION as a plugin does.
func fakePlugin(version string) []byte {
	return []byte("#!/bin/sh\n# plugin " + version + "\necho '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}'\n")
}

// testInstaller is an Installer over fresh dirs with conflist written as
// 10-test.conflist, a fake binary, and a log observer.
func testInstaller(t *testing.T, conflist []byte) (*Installer, string, *observer.ObservedLogs) {
	t.Helper()
	root := t.TempDir()
	in := &Installer{
		BinDir:  filepath.Join(root, "bin"),
		ConfDir: filepath.Join(root, "net.d"),
		Binary:  filepath.Join(root, "plugin"),
		Conf: cni.PluginConf{
			FailMode:          cni.FailClosed,
			Timeout:           "20s",
			ExcludeNamespaces: []string{"kube-system", "istio-system"},
			ZtunnelNamespace:  "istio-system",
			ZtunnelSelector:   "app=ztunnel",
		},
		Kubeconfig: cni.Kubeconfig("https://10.96.0.1:443", []byte("ca"), "token", nil, nil),
	}
	core, logs := observer.New(zap.DebugLevel)
	in.Log = zap.New(core)
	for _, d := range []string{in.BinDir, in.ConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(in.Binary, fakePlugin("v1"), 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(in.ConfDir, "10-test.conflist")
	if conflist != nil {
		if err := os.WriteFile(path, conflist, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return in, path, logs
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// plugins parses a conflist as the runtime's libcni does (which this test
// does not link: it would pull OpenTelemetry into go.mod) and returns its
// plugins' types and our entry.
func plugins(t *testing.T, data []byte) ([]string, map[string]any) {
	t.Helper()
	var list struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatalf("the conflist is not valid: %v\n%s", err, data)
	}
	if list.Name == "" || list.CNIVersion == "" || len(list.Plugins) == 0 {
		t.Fatalf("the conflist lacks name, cniVersion or plugins:\n%s", data)
	}
	var types []string
	var ours map[string]any
	for _, p := range list.Plugins {
		typ, _ := p["type"].(string)
		if typ == "" {
			t.Fatalf("a plugin has no type:\n%s", data)
		}
		types = append(types, typ)
		if typ == cni.PluginType {
			ours = p
		}
	}
	return types, ours
}

func TestInstallUninstallRoundTrip(t *testing.T) {
	for name, orig := range fixtures(t) {
		t.Run(name, func(t *testing.T) {
			in, path, logs := testInstaller(t, orig)
			before, _ := plugins(t, orig)

			changed, err := in.Install()
			if err != nil || !changed {
				t.Fatalf("Install() = %v, %v; want true, nil", changed, err)
			}
			installed := readFile(t, path)
			types, ours := plugins(t, installed)
			if want := append(before, cni.PluginType); strings.Join(types, ",") != strings.Join(want, ",") {
				t.Errorf("plugins after install = %v, want %v", types, want)
			}
			want := map[string]any{
				"type": cni.PluginType, "failMode": "closed", "timeout": "20s",
				"kubeconfig":        filepath.Join(in.ConfDir, KubeconfigName),
				"excludeNamespaces": []any{"kube-system", "istio-system"},
				"ztunnelNamespace":  "istio-system", "ztunnelSelector": "app=ztunnel",
			}
			if !jsonEqual(ours, want) {
				t.Errorf("our entry = %v, want %v", ours, want)
			}
			// Only an insertion: the original bytes are all there, in order.
			if !isInsertion(orig, installed) {
				t.Errorf("install changed more than it inserted:\n%s", installed)
			}
			if bytes.Contains(orig, []byte("\r\n")) && bytes.Count(installed, []byte("\n")) != bytes.Count(installed, []byte("\r\n")) {
				t.Errorf("a CRLF file got LF line ends:\n%q", installed)
			}
			if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
				t.Errorf("conflist mode = %v, want 0644 (kept)", fi.Mode().Perm())
			}
			t.Logf("installed:\n%s", installed)

			if err := in.Uninstall(); err != nil {
				t.Fatal(err)
			}
			if got := readFile(t, path); !bytes.Equal(got, orig) {
				t.Errorf("after uninstall the conflist differs from before install:\n got %q\nwant %q", got, orig)
			}
			if logs.FilterMessageSnippet("not byte-identical").Len() != 0 {
				t.Error("uninstall logged a structural removal for an untouched file")
			}
			for _, p := range []string{filepath.Join(in.BinDir, BinaryName), filepath.Join(in.ConfDir, KubeconfigName)} {
				if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there after uninstall (%v)", p, err)
				}
			}
			assertNoTempFiles(t, in.ConfDir, in.BinDir)
		})
	}
}

// The layout follows the file: a two-space file gets a two-space entry.
func TestInstallMatchesIndentation(t *testing.T) {
	in, path, _ := testInstaller(t, []byte(`{
  "cniVersion": "1.0.0",
  "name": "n",
  "plugins": [
    {
      "type": "ptp"
    }
  ]
}
`))
	in.Conf = cni.PluginConf{FailMode: cni.FailOpen}
	in.Kubeconfig = nil
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	want := `{
  "cniVersion": "1.0.0",
  "name": "n",
  "plugins": [
    {
      "type": "ptp"
    },
    {
      "type": "ambient-redirect",
      "failMode": "open"
    }
  ]
}
`
	if got := string(readFile(t, path)); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestInstallIdempotent(t *testing.T) {
	for name, orig := range fixtures(t) {
		t.Run(name, func(t *testing.T) {
			in, path, _ := testInstaller(t, orig)
			if _, err := in.Install(); err != nil {
				t.Fatal(err)
			}
			files := []string{path, filepath.Join(in.BinDir, BinaryName), filepath.Join(in.ConfDir, KubeconfigName)}
			before := statAll(t, files)
			time.Sleep(10 * time.Millisecond) // so that a rewrite would show in the mtime
			changed, err := in.Install()
			if err != nil || changed {
				t.Fatalf("second Install() = %v, %v; want false, nil", changed, err)
			}
			if after := statAll(t, files); after != before {
				t.Errorf("second Install wrote files:\n%s\n%s", before, after)
			}
		})
	}
}

// statAll renders inode, mtime and ctime of each file: equal when nothing
// was written (or renamed over, or chmodded).
func statAll(t *testing.T, files []string) string {
	t.Helper()
	var b strings.Builder
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		fmt.Fprintf(&b, "%s ino=%d mtime=%v ctime=%v\n", f, st.Ino, fi.ModTime(), time.Unix(st.Ctim.Unix()))
	}
	return b.String()
}

func TestInstallReplacesChangedEntry(t *testing.T) {
	orig := fixtures(t)["kindnet"]
	in, path, _ := testInstaller(t, orig)
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	in.Conf.FailMode = cni.FailOpen
	in.Conf.ExcludeNamespaces = []string{}
	changed, err := in.Install()
	if err != nil || !changed {
		t.Fatalf("Install() with a new config = %v, %v; want true, nil", changed, err)
	}
	installed := readFile(t, path)
	types, ours := plugins(t, installed)
	if strings.Join(types, ",") != "ptp,portmap,"+cni.PluginType {
		t.Errorf("plugins = %v", types)
	}
	if ours["failMode"] != "open" || len(ours["excludeNamespaces"].([]any)) != 0 {
		t.Errorf("entry not updated: %v", ours)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); !bytes.Equal(got, orig) {
		t.Errorf("after replace + uninstall the conflist differs:\n%s", got)
	}
}

// An entry with our content but someone else's formatting is left alone, and
// a second copy is removed.
func TestInstallKeepsEquivalentEntryDropsDuplicates(t *testing.T) {
	in, path, _ := testInstaller(t, fixtures(t)["compact"])
	in.Kubeconfig = nil
	in.Conf = cni.PluginConf{FailMode: cni.FailOpen}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	reformatted := []byte(`{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp"},{ "failMode" : "open", "type" : "ambient-redirect" }]}`)
	if err := os.WriteFile(path, reformatted, 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := in.Install(); err != nil || changed {
		t.Fatalf("Install() over an equivalent entry = %v, %v; want false, nil", changed, err)
	}
	dup := []byte(`{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp"},{"type":"ambient-redirect","failMode":"open"},{"type":"ambient-redirect","failMode":"closed"}]}`)
	if err := os.WriteFile(path, dup, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	want := `{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp"},{"type":"ambient-redirect","failMode":"open"}]}`
	if got := string(readFile(t, path)); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestInstallRefusesAndLeavesFileAlone(t *testing.T) {
	cases := []struct {
		name, file, content, wantErr string
	}{
		{"invalid JSON", "10-test.conflist", `{"cniVersion":"0.3.1","name":"n","plugins":[{"type":"ptp"},]}`, "not valid JSON"},
		{"truncated", "10-test.conflist", `{"cniVersion":"0.3.1","name":"n","plugins":[{"type":"ptp"}`, "not valid JSON"},
		{"single-plugin .conf", "10-bridge.conf", `{"cniVersion":"0.3.1","name":"n","type":"bridge"}`, "single-plugin config"},
		{"plugins not an array", "10-test.conflist", `{"cniVersion":"0.3.1","name":"n","plugins":{"type":"ptp"}}`, `"plugins" is not an array`},
		{"no primary plugin", "10-test.conflist", `{"cniVersion":"0.3.1","name":"n","plugins":[]}`, "no primary plugin"},
		{"unsupported version", "10-test.conflist", `{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"ptp"}]}`, `cniVersion "0.2.0"`},
		{"not an object", "10-test.conflist", `[{"type":"ptp"}]`, "not a JSON object"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in, _, _ := testInstaller(t, nil)
			path := filepath.Join(in.ConfDir, tc.file)
			if err := os.WriteFile(path, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			before := statAll(t, []string{path})
			_, err := in.Install()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), path) {
				t.Errorf("Install() error = %v; want one naming %s and saying %q", err, path, tc.wantErr)
			}
			if err := in.Uninstall(); err == nil {
				t.Error("Uninstall() of an unusable primary config succeeded")
			}
			if got := readFile(t, path); string(got) != tc.content || statAll(t, []string{path}) != before {
				t.Errorf("file touched: %s", got)
			}
		})
	}
}

func TestUninstallNotInstalled(t *testing.T) {
	orig := fixtures(t)["kindnet"]
	in, path, _ := testInstaller(t, orig)
	before := statAll(t, []string{path})
	err := in.Uninstall()
	if !errors.Is(err, ErrNotInstalled) || !strings.Contains(err.Error(), path) {
		t.Errorf("Uninstall() = %v; want ErrNotInstalled naming %s", err, path)
	}
	if statAll(t, []string{path}) != before || !bytes.Equal(readFile(t, path), orig) {
		t.Error("file touched")
	}
	// An empty conf dir: not installed either.
	in2, _, _ := testInstaller(t, nil)
	if err := in2.Uninstall(); !errors.Is(err, ErrNotInstalled) {
		t.Errorf("Uninstall() with no config = %v; want ErrNotInstalled", err)
	}
}

// When the file was reformatted or extended after the install, the entry
// still goes, structurally, and that is logged.
func TestUninstallAfterEdits(t *testing.T) {
	orig := fixtures(t)["kindnet"]
	edits := map[string]func([]byte) []byte{
		"reformatted": func(b []byte) []byte {
			var v any
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatal(err)
			}
			out, _ := json.MarshalIndent(v, "", " ")
			return out
		},
		"plugin appended after ours": func(b []byte) []byte {
			i := bytes.LastIndexByte(b, ']')
			return append(append(append([]byte(nil), b[:i]...), []byte(`, {"type": "bandwidth"}`)...), b[i:]...)
		},
	}
	for name, edit := range edits {
		t.Run(name, func(t *testing.T) {
			in, path, logs := testInstaller(t, orig)
			if _, err := in.Install(); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, edit(readFile(t, path)), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := in.Uninstall(); err != nil {
				t.Fatal(err)
			}
			got := readFile(t, path)
			types, _ := plugins(t, got)
			for _, typ := range types {
				if typ == cni.PluginType {
					t.Errorf("our entry is still there:\n%s", got)
				}
			}
			if logs.FilterMessageSnippet("not byte-identical").Len() != 1 {
				t.Errorf("the structural removal was not logged: %v", logs.All())
			}
		})
	}
}

// Runtimes read the conf dir at any moment: through 200 installs and
// uninstalls, a reader must always find the file, whole and valid.
func TestConflistAlwaysValidForReaders(t *testing.T) {
	in, path, _ := testInstaller(t, fixtures(t)["kindnet"])
	in.Log = zap.NewNop()
	var stop atomic.Bool
	var reads atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			data, err := os.ReadFile(path)
			if err == nil && !json.Valid(data) {
				err = errors.New("invalid JSON: " + string(data))
			}
			if err != nil {
				errs <- err
				return
			}
			reads.Add(1)
		}
	}()
	for i := 0; i < 200; i++ {
		if _, err := in.Install(); err != nil {
			t.Fatal(err)
		}
		if err := in.Uninstall(); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatalf("a reader saw a broken conflist: %v", err)
	default:
	}
	t.Logf("%d reads", reads.Load())
	assertNoTempFiles(t, in.ConfDir, in.BinDir)
}

// The binary is replaced by a rename: a running copy (an open fd here) keeps
// its content, the new one is complete and executable.
func TestInstallBinary(t *testing.T) {
	in, _, _ := testInstaller(t, fixtures(t)["kindnet"])
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(in.BinDir, BinaryName)
	old, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	v2 := fakePlugin("v2, a longer one")
	if err := os.WriteFile(in.Binary, v2, 0o600); err != nil {
		t.Fatal(err)
	}
	changed, err := in.Install()
	if err != nil || !changed {
		t.Fatalf("Install() with a new binary = %v, %v", changed, err)
	}
	fi, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("binary mode = %v, want 0755", fi.Mode().Perm())
	}
	if got := readFile(t, dst); !bytes.Equal(got, v2) {
		t.Errorf("binary = %q, want %q", got, v2)
	}
	if buf, _ := os.ReadFile("/proc/self/fd/" + strconv.Itoa(int(old.Fd()))); !bytes.Contains(buf, []byte("v1")) {
		t.Errorf("the running copy was overwritten in place: %q", buf)
	}
	oldInfo, _ := old.Stat()
	if os.SameFile(oldInfo, fi) {
		t.Error("binary rewritten in place, not renamed over")
	}
	// Same content, another mode (someone chmodded it): fixed.
	if err := os.Chmod(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	if changed, err := in.Install(); err != nil || !changed {
		t.Errorf("Install() over a 0700 binary = %v, %v; want true", changed, err)
	}
	assertNoTempFiles(t, in.BinDir)
}

// The primary config is the first by name among .conflist/.conf/.json, as
// runtimes pick it; directories and our kubeconfig are not configs.
func TestInstallPicksPrimaryConfig(t *testing.T) {
	in, _, _ := testInstaller(t, nil)
	files := map[string]string{
		"20-other.conflist":   `{"cniVersion":"0.3.1","name":"b","plugins":[{"type":"bridge"}]}`,
		"10-kindnet.conflist": `{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"ptp"}]}`,
		"99-x.conf":           `{"cniVersion":"0.3.1","name":"c","type":"bridge"}`,
		"05-notes.txt":        `not a config`,
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(in.ConfDir, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(in.ConfDir, "00-dir.conflist"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	for n, c := range files {
		got := string(readFile(t, filepath.Join(in.ConfDir, n)))
		if changed := got != c; changed != (n == "10-kindnet.conflist") {
			t.Errorf("%s changed = %v:\n%s", n, changed, got)
		}
	}
}

// An entry left in a former primary is removed too: that file would be used
// again once it is first, and the binary is gone.
func TestUninstallFormerPrimary(t *testing.T) {
	in, path, _ := testInstaller(t, fixtures(t)["compact"])
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	multus := filepath.Join(in.ConfDir, "00-multus.conflist")
	if err := os.WriteFile(multus, []byte(`{"cniVersion":"0.3.1","name":"multus","plugins":[{"type":"multus"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); !bytes.Equal(got, fixtures(t)["compact"]) {
		t.Errorf("former primary still has our entry:\n%s", got)
	}
}

func TestInstallSymlinkedConflist(t *testing.T) {
	orig := fixtures(t)["kindnet"]
	in, _, _ := testInstaller(t, nil)
	target := filepath.Join(t.TempDir(), "real.conflist")
	if err := os.WriteFile(target, orig, 0o640); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(in.ConfDir, "10-link.conflist")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the symlink was replaced: %v", err)
	}
	if types, _ := plugins(t, readFile(t, link)); types[len(types)-1] != cni.PluginType {
		t.Errorf("plugins = %v", types)
	}
	if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode = %v, want 0640", fi.Mode().Perm())
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, target), orig) {
		t.Error("not restored")
	}
}

func TestInstallRejectsBadConf(t *testing.T) {
	in, path, _ := testInstaller(t, fixtures(t)["kindnet"])
	in.Conf.FailMode = "sometimes"
	in.Conf.Timeout = "soon"
	_, err := in.Install()
	if err == nil || !strings.Contains(err.Error(), `failMode "sometimes"`) || !strings.Contains(err.Error(), `timeout "soon"`) {
		t.Errorf("Install() error = %v; want both bad fields named", err)
	}
	if !bytes.Equal(readFile(t, path), fixtures(t)["kindnet"]) {
		t.Error("conflist touched")
	}
	if _, err := os.Stat(filepath.Join(in.BinDir, BinaryName)); !errors.Is(err, os.ErrNotExist) {
		t.Error("binary installed with a bad config")
	}
}

func assertNoTempFiles(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".tmp") {
				t.Errorf("temp file left behind: %s", filepath.Join(d, e.Name()))
			}
		}
	}
}

// isInsertion reports whether b is a with bytes inserted at one place.
func isInsertion(a, b []byte) bool {
	i := 0
	for i < len(a) && a[i] == b[i] {
		i++
	}
	return bytes.HasSuffix(b, a[i:]) && len(b) > len(a)
}

func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

// A binary the runtime could not run by its type (here: not a CNI plugin
// at all) is never chained in: the conflist stays as it was, Install and
// Healthy say why, and a fixed binary is installed at the next try.
func TestInstallRefusesUnrunnablePlugin(t *testing.T) {
	in, path, _ := testInstaller(t, fixtures(t)["kindnet"])
	before := readFile(t, path)
	if err := in.Healthy(); err == nil {
		t.Fatal("Healthy() before any install = nil")
	}
	if err := os.WriteFile(in.Binary, []byte("#!/bin/sh\necho not a plugin\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); !errors.Is(err, ErrNotRunnable) {
		t.Fatalf("Install() with a binary that does not answer VERSION = %v, want ErrNotRunnable", err)
	}
	if err := in.Healthy(); !errors.Is(err, ErrNotRunnable) {
		t.Errorf("Healthy() = %v, want ErrNotRunnable", err)
	}
	if got := readFile(t, path); !bytes.Equal(got, before) {
		t.Fatalf("conflist changed although the plugin cannot run:\n%s", got)
	}
	if err := os.WriteFile(in.Binary, fakePlugin("v3"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	if err := in.Healthy(); err != nil {
		t.Errorf("Healthy() after a good install = %v", err)
	}
	// The binary disappears under the runtime (someone cleaned the bin
	// dir): Watch's cheap check notices and puts it back.
	if err := os.Remove(filepath.Join(in.BinDir, cni.PluginType)); err != nil {
		t.Fatal(err)
	}
	if err := in.runnable(false); !errors.Is(err, ErrNotRunnable) {
		t.Errorf("runnable() with the binary gone = %v", err)
	}
	if changed, err := in.install(false); err != nil || !changed {
		t.Errorf("install(false) with the binary gone = %v, %v", changed, err)
	}
}

// An earlier version installed the plugin as ambient-redirect-cni, a name
// no runtime looks up: Install replaces it with the binary under its type.
func TestInstallRemovesLegacyBinaryName(t *testing.T) {
	in, _, _ := testInstaller(t, fixtures(t)["kindnet"])
	legacy := filepath.Join(in.BinDir, "ambient-redirect-cni")
	if err := os.WriteFile(legacy, fakePlugin("old"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(legacy); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("legacy binary still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(in.BinDir, "ambient-redirect")); err != nil {
		t.Errorf("binary under its type: %v", err)
	}
}

// A binary that failed the VERSION call is not chained in by a later
// cheap check (Watch's) either, while it stays the same file.
func TestUnrunnablePluginStaysOut(t *testing.T) {
	in, path, _ := testInstaller(t, fixtures(t)["kindnet"])
	before := readFile(t, path)
	if err := os.WriteFile(in.Binary, []byte("#!/bin/sh\necho not a plugin\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); !errors.Is(err, ErrNotRunnable) {
		t.Fatalf("Install() = %v, want ErrNotRunnable", err)
	}
	for range 2 {
		if _, err := in.install(false); !errors.Is(err, ErrNotRunnable) {
			t.Fatalf("install(false) of the same bad binary = %v, want ErrNotRunnable", err)
		}
	}
	if got := readFile(t, path); !bytes.Equal(got, before) {
		t.Fatalf("conflist changed:\n%s", got)
	}
}
