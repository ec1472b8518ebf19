package image

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// TestDockerArchive writes a two-layer image and reads it back as an
// importer does: manifest.json names the config and the layers, the
// config's diff_ids are the layers' digests, the runtime config is kept.
func TestDockerArchive(t *testing.T) {
	dir := t.TempDir()
	l1, err := FilesLayer(filepath.Join(dir, "l1.tar"), []File{{Path: "/usr/local/bin/a", Mode: 0o755, Data: []byte("A")}})
	if err != nil {
		t.Fatal(err)
	}
	l2, err := FilesLayer(filepath.Join(dir, "l2.tar"), []File{{Path: "/b", Mode: 0o644, Data: []byte("B")}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Entrypoint: []string{"/usr/local/bin/a"}, Cmd: []string{"run"}, User: "0", Env: []string{"PATH=/bin"}}
	out := filepath.Join(dir, "img.tar")
	if err := WriteDockerArchive(out, "amd64", []string{"ambient-redirect.test/x:v1"}, []Layer{l1, l2}, cfg); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		entries[h.Name] = b
	}
	var m []manifestEntry
	if err := json.Unmarshal(entries["manifest.json"], &m); err != nil || len(m) != 1 {
		t.Fatalf("manifest.json: %v %s", err, entries["manifest.json"])
	}
	if !reflect.DeepEqual(m[0].RepoTags, []string{"ambient-redirect.test/x:v1"}) || len(m[0].Layers) != 2 {
		t.Fatalf("manifest: %+v", m[0])
	}
	var dc dockerConfig
	if err := json.Unmarshal(entries[m[0].Config], &dc); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(entries[m[0].Config])
	if want := hex.EncodeToString(sum[:]) + ".json"; m[0].Config != want {
		t.Errorf("config named %s, its digest is %s", m[0].Config, want)
	}
	for i, name := range m[0].Layers {
		s := sha256.Sum256(entries[name])
		if dc.RootFS.DiffIDs[i] != "sha256:"+hex.EncodeToString(s[:]) {
			t.Errorf("layer %d: diff_id %s, digest %x", i, dc.RootFS.DiffIDs[i], s)
		}
	}
	if dc.OS != "linux" || dc.Architecture != "amd64" || !reflect.DeepEqual(dc.Config.Entrypoint, cfg.Entrypoint) ||
		!reflect.DeepEqual(dc.Config.Cmd, cfg.Cmd) || dc.Config.User != "0" {
		t.Errorf("config: %+v", dc)
	}
	id, err := ConfigDigest(out)
	if err != nil || id != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("ConfigDigest: %s %v", id, err)
	}
	// The layer holds the file with its parents.
	lr := tar.NewReader(bytesReader(entries[m[0].Layers[0]]))
	var names []string
	for {
		h, err := lr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
	}
	if want := []string{"usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/a"}; !reflect.DeepEqual(names, want) {
		t.Errorf("layer entries %q, want %q", names, want)
	}
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }
