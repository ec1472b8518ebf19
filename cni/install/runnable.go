package install

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

// ErrNotRunnable means a runtime could not run the installed plugin by its
// type: every sandbox on the node would fail.
var ErrNotRunnable = errors.New("the CNI plugin cannot be run by its type")

// runnable checks that BinDir holds the plugin under its type as an
// executable file, the way libcni looks it up; it also executes it
// (CNI_COMMAND=VERSION, as a runtime may) and checks the answer, which
// catches a noexec mount or a binary for another architecture, when run is
// set (at Install) or the file is not the one that last passed (it was
// rewritten, or never passed): never per pod.
func (in *Installer) runnable(run bool) error {
	path := filepath.Join(in.BinDir, cni.PluginType)
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%w: %s does not exist (an entry of type %q is looked up there)", ErrNotRunnable, path, cni.PluginType)
	case err != nil:
		return fmt.Errorf("%w: %w", ErrNotRunnable, err)
	case !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0:
		return fmt.Errorf("%w: %s is not an executable file (%s)", ErrNotRunnable, path, fi.Mode())
	}
	in.mu.Lock()
	passed := in.verified != nil && os.SameFile(in.verified, fi) && in.verified.Size() == fi.Size() && in.verified.ModTime().Equal(fi.ModTime())
	in.mu.Unlock()
	if !run && passed {
		return nil
	}
	if err := in.runVersion(path); err != nil {
		return err
	}
	in.mu.Lock()
	in.verified = fi
	in.mu.Unlock()
	return nil
}

// runVersion runs the plugin at path as a runtime's VERSION call.
func (in *Installer) runVersion(path string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = []string{"CNI_COMMAND=VERSION", "CNI_PATH=" + in.BinDir}
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%w: %s VERSION: %w", ErrNotRunnable, path, err)
	}
	var v struct {
		SupportedVersions []string `json:"supportedVersions"`
	}
	if json.Unmarshal(out, &v) != nil || len(v.SupportedVersions) == 0 {
		return fmt.Errorf("%w: %s VERSION answered %q, not a CNI version result", ErrNotRunnable, path, out)
	}
	return nil
}
