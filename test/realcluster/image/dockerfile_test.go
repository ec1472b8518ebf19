package image

import (
	"encoding/json"
	"os"
	"path"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// dockerfile is what the agent's Dockerfile says about its runtime image.
type dockerfile struct {
	base       string   // last FROM
	packages   []string // apt-get install
	copied     []string // COPY --from=build <srcs...> <dst>: the binaries' names
	copyDst    string
	built      []string // packages of the go build line
	user       string
	entrypoint []string
	cmd        []string
}

func parseDockerfile(t *testing.T, file string) dockerfile {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	// Join continuation lines, drop comments.
	var lines []string
	cur := ""
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		if strings.HasSuffix(l, "\\") {
			cur += strings.TrimSuffix(l, "\\") + " "
			continue
		}
		lines = append(lines, cur+l)
		cur = ""
	}
	var d dockerfile
	jsonArgs := func(s string) []string {
		var v []string
		if err := json.Unmarshal([]byte(s), &v); err != nil {
			t.Fatalf("%s: not JSON exec form: %q", file, s)
		}
		return v
	}
	install := regexp.MustCompile(`apt-get install ((?:-\S+\s+)*)([a-z0-9.+\- ]+?)\s*(?:&&|$)`)
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		rest := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), f[0]))
		switch strings.ToUpper(f[0]) {
		case "FROM":
			d.base = f[1]
			if strings.HasPrefix(f[1], "--") {
				d.base = f[2]
			}
		case "RUN":
			if m := install.FindStringSubmatch(rest); m != nil {
				d.packages = strings.Fields(m[2])
			}
			if i := slices.Index(f, "build"); i > 0 && f[i-1] == "go" {
				for _, a := range f[i+1:] {
					if strings.HasPrefix(a, "./") {
						d.built = append(d.built, a)
					}
				}
			}
		case "COPY":
			if len(f) > 2 && strings.HasPrefix(f[1], "--from=") {
				for _, src := range f[2 : len(f)-1] {
					d.copied = append(d.copied, path.Base(src))
				}
				d.copyDst = f[len(f)-1]
			}
		case "USER":
			d.user = rest
		case "ENTRYPOINT":
			d.entrypoint = jsonArgs(rest)
		case "CMD":
			d.cmd = jsonArgs(rest)
		}
	}
	return d
}

// TestDockerfileInStep keeps the image the real-cluster tests build (Build)
// and the users' Dockerfile the same image: Debian suite, packages,
// binaries and where they go, user, entrypoint and command.
func TestDockerfileInStep(t *testing.T) {
	d := parseDockerfile(t, "../../../Dockerfile")
	if want := "debian:" + AgentSuite + "-slim"; d.base != want {
		t.Errorf("Dockerfile runtime base %q, the image builder makes %q", d.base, want)
	}
	pk := slices.Clone(AgentPackages)
	sort.Strings(pk)
	got := slices.Clone(d.packages)
	sort.Strings(got)
	if !reflect.DeepEqual(got, pk) {
		t.Errorf("Dockerfile installs %q, the image builder %q", d.packages, AgentPackages)
	}
	var names, pkgs []string
	for n, p := range AgentBinaries {
		names = append(names, n)
		pkgs = append(pkgs, p)
	}
	sort.Strings(names)
	sort.Strings(pkgs)
	copied := slices.Clone(d.copied)
	sort.Strings(copied)
	built := slices.Clone(d.built)
	sort.Strings(built)
	if !reflect.DeepEqual(copied, names) || d.copyDst != AgentBinDir {
		t.Errorf("Dockerfile copies %q to %q, the image builder %q to %q", d.copied, d.copyDst, names, AgentBinDir)
	}
	if !reflect.DeepEqual(built, pkgs) {
		t.Errorf("Dockerfile builds %q, the image builder %q", d.built, pkgs)
	}
	if d.user != AgentUser {
		t.Errorf("Dockerfile USER %q, the image builder %q", d.user, AgentUser)
	}
	if !reflect.DeepEqual(d.entrypoint, AgentEntrypoint) || !reflect.DeepEqual(d.cmd, AgentCmd) {
		t.Errorf("Dockerfile ENTRYPOINT %q CMD %q, the image builder %q %q", d.entrypoint, d.cmd, AgentEntrypoint, AgentCmd)
	}
}
