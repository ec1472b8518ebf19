// Package image writes container images without docker or a registry:
// docker-archive tars (manifest.json, a config JSON and uncompressed layer
// tars) made with the Go standard library, which `ctr images import` loads
// into a containerd. It also builds the images the real-cluster tests run
// (see Build): the agent image with the Dockerfile's content, the test
// ztunnel, the test app and a pause image.
package image

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"
)

// File is one regular file of a layer made in memory.
type File struct {
	Path string // absolute path in the image, e.g. /usr/local/bin/x
	Mode int64  // permission bits
	Data []byte
}

// Config is the part of an image's runtime configuration the tests use.
type Config struct {
	Entrypoint []string
	Cmd        []string
	Env        []string
	User       string
	Labels     map[string]string
}

// Layer is an uncompressed layer tar on disk.
type Layer struct{ Path string }

// FilesLayer writes files (with their parent directories, root-owned,
// mtime zero so the digest depends on the content only) as a layer tar at
// dst.
func FilesLayer(dst string, files []File) (Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	epoch := time.Unix(0, 0)
	for _, f := range files {
		clean := strings.TrimPrefix(path.Clean(f.Path), "/")
		var parents []string
		for d := path.Dir(clean); d != "." && d != "/"; d = path.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return Layer{}, err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: clean, Mode: f.Mode, Size: int64(len(f.Data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return Layer{}, err
		}
		if _, err := tw.Write(f.Data); err != nil {
			return Layer{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return Layer{}, err
	}
	if err := os.WriteFile(dst, buf.Bytes(), 0o644); err != nil {
		return Layer{}, err
	}
	return Layer{Path: dst}, nil
}

// dockerConfig is the image config JSON (the subset docker-archive needs).
type dockerConfig struct {
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Created      string          `json:"created"`
	Config       containerConfig `json:"config"`
	RootFS       struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
	History []map[string]string `json:"history"`
}

type containerConfig struct {
	Entrypoint []string          `json:"Entrypoint,omitempty"`
	Cmd        []string          `json:"Cmd,omitempty"`
	Env        []string          `json:"Env,omitempty"`
	User       string            `json:"User,omitempty"`
	Labels     map[string]string `json:"Labels,omitempty"`
}

type manifestEntry struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// WriteDockerArchive writes a docker-archive tar at dst holding one image
// tagged with refs (e.g. "ambient-redirect:dev"), made of layers (bottom
// first) and cfg, for linux/amd64... or whatever arch is given.
func WriteDockerArchive(dst, arch string, refs []string, layers []Layer, cfg Config) error {
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	tw := tar.NewWriter(out)
	dc := dockerConfig{Architecture: arch, OS: "linux", Created: "1970-01-01T00:00:00Z"}
	dc.Config = containerConfig(cfg)
	dc.RootFS.Type = "layers"
	var me manifestEntry
	me.RepoTags = refs
	for i, l := range layers {
		sum, size, err := digestFile(l.Path)
		if err != nil {
			return err
		}
		dc.RootFS.DiffIDs = append(dc.RootFS.DiffIDs, "sha256:"+sum)
		dc.History = append(dc.History, map[string]string{"created": dc.Created, "created_by": fmt.Sprintf("ambient-redirect image builder, layer %d", i)})
		name := sum + "/layer.tar"
		me.Layers = append(me.Layers, name)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: sum + "/", Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		f, err := os.Open(l.Path)
		if err != nil {
			return err
		}
		_, err = io.Copy(tw, f)
		f.Close()
		if err != nil {
			return err
		}
	}
	cj, err := json.Marshal(dc)
	if err != nil {
		return err
	}
	cs := sha256.Sum256(cj)
	me.Config = hex.EncodeToString(cs[:]) + ".json"
	if err := writeEntry(tw, me.Config, cj); err != nil {
		return err
	}
	mj, err := json.Marshal([]manifestEntry{me})
	if err != nil {
		return err
	}
	if err := writeEntry(tw, "manifest.json", mj); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return out.Close()
}

// ConfigDigest returns the image ID (sha256 of the config JSON) of a
// docker-archive written by WriteDockerArchive.
func ConfigDigest(archive string) (string, error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			return "", fmt.Errorf("%s: no manifest.json: %w", archive, err)
		}
		if h.Name != "manifest.json" {
			continue
		}
		var m []manifestEntry
		if err := json.NewDecoder(tr).Decode(&m); err != nil {
			return "", err
		}
		if len(m) != 1 {
			return "", fmt.Errorf("%s: %d images", archive, len(m))
		}
		return "sha256:" + strings.TrimSuffix(m[0].Config, ".json"), nil
	}
}

func writeEntry(tw *tar.Writer, name string, data []byte) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: time.Unix(0, 0)}); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

func digestFile(p string) (string, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
