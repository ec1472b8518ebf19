// Package install puts the chained CNI plugin on the node and keeps it there:
// its binary in the runtime's bin dir under its type, the kubeconfig it
// falls back to, and its entry at the end of the primary conflist (edited as
// text, so that uninstalling restores the file byte for byte). Only the agent
// links it.
package install

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"go.uber.org/zap"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

// Names of what the installer reads and writes.
const (
	// SourceBinaryName is the plugin's file name where it is built and
	// shipped (next to the agent in the image).
	SourceBinaryName = "ambient-redirect-cni"
	// BinaryName is its name in BinDir: a runtime (libcni) finds a plugin by
	// the entry's type in its bin dirs, so it must be the type.
	BinaryName = cni.PluginType
	// KubeconfigName is in ConfDir; no config extension, so runtimes skip it.
	KubeconfigName = "ambient-redirect-kubeconfig"
)

// legacyBinaryNames are names earlier versions installed the plugin under
// in BinDir (no runtime could find it there); install and uninstall remove them.
var legacyBinaryNames = []string{SourceBinaryName}

var (
	// ErrNotInstalled is Uninstall's answer when no config file has our entry.
	ErrNotInstalled = errors.New("ambient-redirect is not in the CNI network config")
	// ErrNoConfig means the conf dir has no network config yet: the primary
	// plugin (kindnet, for one) writes it once it runs. Watch retries.
	ErrNoConfig = errors.New("no CNI network config")
)

// confExtensions are the files containerd and CRI-O load, by extension.
var confExtensions = []string{".conflist", ".conf", ".json"}

// Installer puts the plugin on the node: the binary in the runtime's CNI bin
// dir and our entry at the end of the primary conflist's plugins.
//
// Hazards it handles: the runtime re-reads the conf dir at any moment, so
// every file is replaced whole (temp file in the same dir, fsync, rename),
// never written in place; the binary may be running, so it is renamed over
// (writing it in place would fail with ETXTBSY); the primary plugin may
// rewrite its conflist at any time, without our entry (Watch puts it back)
// or while we edit it (the write is redone on the new content); the file is
// edited as text, so uninstalling restores it byte for byte.
type Installer struct {
	BinDir  string
	ConfDir string
	// Binary is the source path of the plugin binary.
	Binary string
	// Conf is the entry to insert; its type is forced to cni.PluginType.
	// Conf.Kubeconfig, when empty and Kubeconfig is set, is
	// ConfDir/KubeconfigName: set it when ConfDir is the host's conf dir
	// mounted elsewhere, since the plugin runs on the host.
	Conf cni.PluginConf
	// Kubeconfig, when non-nil, is written to ConfDir/KubeconfigName (0600).
	Kubeconfig []byte
	// KubeconfigFunc, when set, is called on every install instead (Watch
	// then keeps a rotating token current).
	KubeconfigFunc func() ([]byte, error)
	Log            *zap.Logger

	mu       sync.Mutex
	lastErr  error       // of the last install; nil before the first
	done     bool        // an install has run
	verified fs.FileInfo // the installed binary that last answered VERSION
}

// Healthy is nil once the last install (Install or Watch's) succeeded: the
// plugin is in place under its type, runnable, and its entry is in the
// primary conflist. Until then it says what is wrong; the agent is not
// ready meanwhile, so a rollout never looks healthy on a node whose
// runtime cannot run the plugin.
func (in *Installer) Healthy() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.done {
		return errors.New("the CNI plugin is not installed yet")
	}
	return in.lastErr
}

func (in *Installer) record(err error) {
	in.mu.Lock()
	in.lastErr, in.done = err, true
	in.mu.Unlock()
}

// Install copies the binary, writes the kubeconfig and inserts our entry
// into the primary conflist, each only when it differs from what is there,
// and reports whether it wrote anything.
func (in *Installer) Install() (bool, error) {
	changed, err := in.install(true)
	in.record(err)
	return changed, err
}

// install is Install; with compareBinary false the binary is rewritten only
// when missing or of another size, so that Watch's polling stays cheap.
func (in *Installer) install(compareBinary bool) (bool, error) {
	e, err := in.entry()
	if err != nil {
		return false, err
	}
	// The binary first: the runtime must find it once the entry is in.
	binChanged, err := in.installBinary(compareBinary)
	if err != nil {
		return false, err
	}
	// A runtime that cannot find or run the plugin by its type fails every
	// sandbox on the node (and leaks the primary plugin's work on DEL):
	// never insert the entry then.
	if err := in.runnable(compareBinary); err != nil {
		return binChanged, err
	}
	kcChanged, err := in.installKubeconfig()
	if err != nil {
		return binChanged, err
	}
	confChanged, err := in.insertEntry(e)
	return binChanged || kcChanged || confChanged, err
}

// entry is the entry Install inserts, validated.
func (in *Installer) entry() (entry, error) {
	c := in.Conf
	c.Type = cni.PluginType
	if c.Kubeconfig == "" && (in.Kubeconfig != nil || in.KubeconfigFunc != nil) {
		c.Kubeconfig = filepath.Join(in.ConfDir, KubeconfigName)
	}
	check := c
	check.Defaults()
	if err := check.Validate(); err != nil {
		return entry{}, fmt.Errorf("ambient-redirect plugin config: %w", err)
	}
	return entry{Type: cni.PluginType, OwnFields: c.Own()}, nil
}

func (in *Installer) log() *zap.Logger {
	if in.Log == nil {
		return zap.NewNop()
	}
	return in.Log
}

func (in *Installer) installBinary(compare bool) (bool, error) {
	dst := filepath.Join(in.BinDir, BinaryName)
	si, err := os.Stat(in.Binary)
	if err != nil {
		return false, fmt.Errorf("plugin binary: %w", err)
	}
	if compare {
		for _, n := range legacyBinaryNames {
			if err := os.Remove(filepath.Join(in.BinDir, n)); err == nil {
				in.log().Info("removed the plugin binary an earlier version installed under a name no runtime looks up",
					zap.String("path", filepath.Join(in.BinDir, n)))
			}
		}
	}
	if fi, err := os.Stat(dst); err == nil && fi.Mode().Perm() == 0o755 && fi.Size() == si.Size() {
		if !compare || sameContent(in.Binary, dst) {
			return false, nil
		}
	}
	src, err := os.ReadFile(in.Binary)
	if err != nil {
		return false, fmt.Errorf("plugin binary: %w", err)
	}
	if err := writeFileAtomic(dst, src, 0o755, nil); err != nil {
		return false, fmt.Errorf("installing the plugin binary: %w", err)
	}
	in.log().Info("installed the CNI plugin binary", zap.String("path", dst))
	return true, nil
}

func sameContent(a, b string) bool {
	da, err := os.ReadFile(a)
	if err != nil {
		return false
	}
	db, err := os.ReadFile(b)
	return err == nil && bytes.Equal(da, db)
}

func (in *Installer) installKubeconfig() (bool, error) {
	kc := in.Kubeconfig
	if in.KubeconfigFunc != nil {
		var err error
		if kc, err = in.KubeconfigFunc(); err != nil {
			return false, fmt.Errorf("the plugin's kubeconfig: %w", err)
		}
	}
	if kc == nil {
		return false, nil
	}
	path := filepath.Join(in.ConfDir, KubeconfigName)
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, kc) {
		if fi, err := os.Stat(path); err == nil && fi.Mode().Perm() == 0o600 {
			return false, nil
		}
	}
	if err := writeFileAtomic(path, kc, 0o600, nil); err != nil {
		return false, fmt.Errorf("writing the plugin's kubeconfig: %w", err)
	}
	return true, nil
}

// insertEntry makes e our one entry in the primary conflist.
func (in *Installer) insertEntry(e entry) (bool, error) {
	name, err := in.primary()
	if err != nil {
		return false, err
	}
	changed, err := editConfig(name, func(data []byte) ([]byte, error) {
		c, err := parseConflist(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w; not touching it", name, err)
		}
		if !slices.Contains(cni.SupportedVersions, c.version) {
			return nil, fmt.Errorf("%s: cniVersion %q: the plugin supports %v; not touching it", name, c.version, cni.SupportedVersions)
		}
		out, changed, err := c.withEntry(e)
		if err != nil {
			return nil, fmt.Errorf("%s: %w; not touching it", name, err)
		}
		if !changed {
			return nil, nil
		}
		return out, nil
	})
	if changed {
		in.log().Info("inserted the ambient-redirect entry into the CNI network config", zap.String("file", name))
	}
	return changed, err
}

// editConfig replaces the config file name (a symlink's target: the link
// stays) with what edit makes of its content; nil means no change. A
// rewrite by the primary plugin between our read and our rename is
// detected (see writeFileAtomic) and the edit is redone on the new content.
// It reports whether it wrote.
func editConfig(name string, edit func(data []byte) ([]byte, error)) (bool, error) {
	path, err := filepath.EvalSymlinks(name)
	if err != nil {
		return false, err
	}
	for range 5 {
		data, fi, err := readWithInfo(path)
		if err != nil {
			return false, err
		}
		out, err := edit(data)
		if err != nil || out == nil {
			return false, err
		}
		err = writeFileAtomic(path, out, fi.Mode().Perm(), &fileState{data: data, info: fi})
		if errors.Is(err, errConcurrentWrite) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("%s: %w", name, err)
		}
		return true, nil
	}
	return false, fmt.Errorf("%s: %w, five times in a row", name, errConcurrentWrite)
}

// Uninstall removes our entry from every config file in ConfDir that has
// one (a former primary's too: it would be used again once it is the first
// file), then the binary and the kubeconfig. Removing an entry restores the
// file to its bytes before Install when nothing else edited it since;
// otherwise only the entry (and its comma) goes, and that is logged. With no
// entry anywhere it returns ErrNotInstalled and touches no config file. A
// file it cannot parse is left alone, and so are the binary and kubeconfig
// (the entry may still be in it).
func (in *Installer) Uninstall() error {
	primary, err := in.primary()
	if err != nil && !errors.Is(err, ErrNoConfig) {
		return err
	}
	names, err := confFiles(in.ConfDir)
	if err != nil {
		return err
	}
	removed := false
	var errs []error
	for _, name := range names {
		ok, err := in.removeEntries(name, name == primary)
		removed = removed || ok
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	remove := []string{filepath.Join(in.BinDir, BinaryName), filepath.Join(in.ConfDir, KubeconfigName)}
	for _, n := range legacyBinaryNames {
		remove = append(remove, filepath.Join(in.BinDir, n))
	}
	for _, p := range remove {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if !removed {
		if primary == "" {
			return fmt.Errorf("%w: %w in %s", ErrNotInstalled, ErrNoConfig, in.ConfDir)
		}
		return fmt.Errorf("%w: %s", ErrNotInstalled, primary)
	}
	return nil
}

// removeEntries removes every entry of ours from the file name. Only the
// primary must parse: another file is read only if it names our type.
func (in *Installer) removeEntries(name string, primary bool) (bool, error) {
	exact := true
	removed, err := editConfig(name, func(data []byte) ([]byte, error) {
		if !primary && !bytes.Contains(data, []byte(`"`+cni.PluginType+`"`)) {
			return nil, nil
		}
		out := data
		exact = true
		for {
			c, err := parseConflist(out)
			if err != nil {
				return nil, fmt.Errorf("%s: %w; not touching it", name, err)
			}
			if len(c.ours) == 0 {
				break
			}
			var ex bool
			out, ex = c.without(c.ours[len(c.ours)-1])
			exact = exact && ex
		}
		if bytes.Equal(out, data) {
			return nil, nil
		}
		return out, nil
	})
	switch {
	case removed && exact:
		in.log().Info("removed the ambient-redirect entry from the CNI network config", zap.String("file", name))
	case removed:
		in.log().Warn("removed the ambient-redirect entry from the CNI network config; the file was edited "+
			"around it since it was inserted, so it is valid but not byte-identical to before the install", zap.String("file", name))
	}
	return removed, err
}

// primary is the file the runtime uses: the first config file by name, as
// libcni's ConfFiles (containerd, CRI-O) sorts them.
func (in *Installer) primary() (string, error) {
	names, err := confFiles(in.ConfDir)
	if err != nil {
		return "", err
	}
	if len(names) == 0 {
		return "", fmt.Errorf("%w in %s", ErrNoConfig, in.ConfDir)
	}
	return names[0], nil
}

// confFiles lists ConfDir's config files in name order; a missing dir has none.
func confFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir) // sorted by name
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !e.IsDir() && slices.Contains(confExtensions, filepath.Ext(e.Name())) {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out, nil
}

func readWithInfo(path string) ([]byte, fs.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	data, err := io.ReadAll(f)
	return data, fi, err
}

// errConcurrentWrite: the file changed between our read and our rename.
var errConcurrentWrite = errors.New("the file was rewritten while we edited it")

// fileState is a file as read before an edit.
type fileState struct {
	data []byte
	info fs.FileInfo
}

// writeFileAtomic replaces path with data: readers see the old file or the
// new one, never a partial or missing one. The temp file's name ends in .tmp
// and starts with a dot, so no runtime loads it as a config. With was set,
// path must still hold was (same inode, same bytes) just before the rename,
// or it is errConcurrentWrite. The owner of the file replaced is kept.
func writeFileAtomic(path string, data []byte, mode fs.FileMode, was *fileState) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		return err
	}
	if was != nil {
		if st, ok := was.info.Sys().(*syscall.Stat_t); ok && (int(st.Uid) != os.Getuid() || int(st.Gid) != os.Getgid()) {
			if err := tmp.Chown(int(st.Uid), int(st.Gid)); err != nil {
				return err
			}
		}
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if was != nil {
		cur, fi, err := readWithInfo(path)
		if err != nil || !os.SameFile(fi, was.info) || !bytes.Equal(cur, was.data) {
			return errConcurrentWrite
		}
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	done = true
	// Make the rename itself durable.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
