package image

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
)

// The agent image: what the Dockerfile builds, made without docker. A test
// (dockerfile_test.go) parses the Dockerfile and checks these against it.
var (
	// AgentSuite is the Debian release of the Dockerfile's runtime base
	// (debian:bookworm-slim).
	AgentSuite = "bookworm"
	// AgentPackages are the Dockerfile's `apt-get install` packages.
	AgentPackages = []string{"iptables", "ipset", "iproute2"}
	// AgentBinaries maps the Dockerfile's binaries (in /usr/local/bin/) to
	// the packages they are built from.
	AgentBinaries = map[string]string{
		"ambient-redirect":     "./cmd/ambient-redirect",
		"ambient-redirect-cni": "./cmd/ambient-redirect-cni",
	}
	AgentBinDir     = "/usr/local/bin/"
	AgentEntrypoint = []string{"/usr/local/bin/ambient-redirect"}
	AgentCmd        = []string{"run"}
	AgentUser       = "0"
)

// Image references of the test images (a registry-like name, so nothing
// is ever looked up on docker.io).
const (
	Registry = "ambient-redirect.test"
	Agent    = Registry + "/ambient-redirect"
	Ztunnel  = Registry + "/test-ztunnel"
	App      = Registry + "/app"
	// SidecarProxy is the sidecar test proxy (test/sidecar/proxy).
	SidecarProxy = Registry + "/sidecar-proxy"
	Pause        = Registry + "/pause:v1"
)

// debianPath is the PATH of Debian's images.
const debianPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Archives are the docker-archive tars Build wrote, one per image, and the
// references they carry.
type Archives struct {
	// Agent has one archive per tag.
	Agent        map[string]string
	Ztunnel      string
	App          string
	SidecarProxy string
	Pause        string
	// Refs maps an archive to its image reference.
	Refs map[string]string
}

// All returns every archive.
func (a Archives) All() []string {
	out := []string{a.Ztunnel, a.App, a.SidecarProxy, a.Pause}
	for _, p := range a.Agent {
		out = append(out, p)
	}
	return out
}

// Build compiles the binaries of repo (the module root) into outDir and
// writes the images there: the agent (one image per tag in agentTags, each
// with a distinct config so the tags are distinct images), the test
// ztunnel, the app and pause. The agent's Debian root filesystem comes from
// BaseRootfs (cached under cacheDir). logf reports progress.
func Build(repo, outDir, cacheDir string, agentTags []string, logf func(string, ...any)) (Archives, error) {
	a := Archives{Agent: map[string]string{}, Refs: map[string]string{}}
	bin := filepath.Join(outDir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return a, err
	}
	pkgs := map[string]string{"test-ztunnel": "./test/ztunnel", "app": "./test/realcluster/app", "pause": "./test/realcluster/pause",
		"test-sidecar-proxy": "./test/sidecar/proxy"}
	for name, pkg := range AgentBinaries {
		pkgs[name] = pkg
	}
	for name, pkg := range pkgs {
		args := []string{"build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(bin, name), pkg}
		cmd := exec.Command("go", args...)
		cmd.Dir = repo
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return a, fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(bin, name)) }
	single := func(name, binName, dst, ref string, cfg Config) (string, error) {
		data, err := read(binName)
		if err != nil {
			return "", err
		}
		layer, err := FilesLayer(filepath.Join(outDir, name+"-layer.tar"), []File{{Path: dst, Mode: 0o755, Data: data}})
		if err != nil {
			return "", err
		}
		archive := filepath.Join(outDir, name+".tar")
		if err := WriteDockerArchive(archive, runtime.GOARCH, []string{ref}, []Layer{layer}, cfg); err != nil {
			return "", err
		}
		a.Refs[archive] = ref
		return archive, nil
	}
	var err error
	// hack/kind/ztunnel.Dockerfile: ENTRYPOINT ["/test-ztunnel"].
	if a.Ztunnel, err = single("test-ztunnel", "test-ztunnel", "/test-ztunnel", Ztunnel+":v1", Config{Entrypoint: []string{"/test-ztunnel"}}); err != nil {
		return a, err
	}
	if a.App, err = single("app", "app", "/app", App+":v1", Config{Entrypoint: []string{"/app"}}); err != nil {
		return a, err
	}
	if a.SidecarProxy, err = single("sidecar-proxy", "test-sidecar-proxy", "/test-sidecar-proxy", SidecarProxy+":v1",
		Config{Entrypoint: []string{"/test-sidecar-proxy"}}); err != nil {
		return a, err
	}
	if a.Pause, err = single("pause", "pause", "/pause", Pause, Config{Entrypoint: []string{"/pause"}}); err != nil {
		return a, err
	}

	base, err := BaseRootfs(cacheDir, logf)
	if err != nil {
		return a, err
	}
	var files []File
	for name := range AgentBinaries {
		data, err := read(name)
		if err != nil {
			return a, err
		}
		files = append(files, File{Path: AgentBinDir + name, Mode: 0o755, Data: data})
	}
	binLayer, err := FilesLayer(filepath.Join(outDir, "agent-bin-layer.tar"), files)
	if err != nil {
		return a, err
	}
	for _, tag := range agentTags {
		archive := filepath.Join(outDir, "agent-"+tag+".tar")
		ref := Agent + ":" + tag
		cfg := Config{
			Entrypoint: AgentEntrypoint, Cmd: AgentCmd, User: AgentUser, Env: []string{debianPath},
			Labels: map[string]string{"ambient-redirect.test/tag": tag},
		}
		if err := WriteDockerArchive(archive, runtime.GOARCH, []string{ref}, []Layer{{Path: base}, binLayer}, cfg); err != nil {
			return a, err
		}
		a.Agent[tag] = archive
		a.Refs[archive] = ref
	}
	return a, nil
}

// BaseRootfs returns a layer tar of a Debian AgentSuite root filesystem
// with AgentPackages installed (no recommends, without docs, man pages and
// locales, like debian:*-slim), made with mmdebstrap the first time and
// cached in cacheDir under a name keyed by the suite, package list and
// options. Concurrent callers serialise on a lock file.
func BaseRootfs(cacheDir string, logf func(string, ...any)) (string, error) {
	args := []string{
		"--variant=minbase",
		"--include=" + strings.Join(AgentPackages, ","),
		`--aptopt=APT::Install-Recommends "false"`,
		"--dpkgopt=path-exclude=/usr/share/doc/*",
		"--dpkgopt=path-exclude=/usr/share/man/*",
		"--dpkgopt=path-exclude=/usr/share/locale/*",
		// Device nodes are the runtime's business (runc mounts /dev).
		"--skip=output/dev",
		AgentSuite,
	}
	sum := sha256.Sum256([]byte(strings.Join(args, "\x00")))
	dst := filepath.Join(cacheDir, "debian-"+AgentSuite+"-"+hex.EncodeToString(sum[:8])+".tar")
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(cacheDir, ".rootfs.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		return "", fmt.Errorf("mmdebstrap not found (apt-get install mmdebstrap): %w", err)
	}
	tmp := dst + ".tmp.tar"
	logf("image: building the agent's Debian %s root filesystem with mmdebstrap (~1 min, cached as %s)", AgentSuite, dst)
	out, err := exec.Command("mmdebstrap", append(append([]string{"--quiet"}, args...), tmp)...).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("mmdebstrap: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", err
	}
	return dst, nil
}
