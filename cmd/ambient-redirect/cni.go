package main

// The agent's CNI side: the socket the plugin talks to, and the plugin's
// installation into the host's CNI directories.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/rest"

	"github.com/ambient-redirect/ambient-redirect/cni"
	"github.com/ambient-redirect/ambient-redirect/cni/install"
	"github.com/ambient-redirect/ambient-redirect/cni/server"
)

// pluginBinary is the plugin shipped next to this binary (the image has both).
func pluginBinary() string {
	exe, err := os.Executable()
	if err != nil {
		return install.SourceBinaryName
	}
	return filepath.Join(filepath.Dir(exe), install.SourceBinaryName)
}

// installer is the plugin's installer for o.
func (o *Options) installer(restCfg *rest.Config, log *zap.Logger) (*install.Installer, error) {
	in := &install.Installer{BinDir: o.CNIBinDir, ConfDir: o.CNIConfDir, Binary: o.CNIPluginBinary, Log: log,
		Conf: cni.PluginConf{Socket: o.CNISocket, FailMode: o.FailMode, ExcludeNamespaces: o.excluded(),
			ZtunnelNamespace: o.ZtunnelNamespace, ZtunnelSelector: o.ZtunnelSelector}}
	if !o.SidecarCapture {
		off := false
		in.Conf.SidecarCapture = &off // the plugin's default is on
	}
	in.Conf.Type = cni.PluginType
	if o.CNIHostConfDir != "" {
		in.Conf.Kubeconfig = filepath.Join(o.CNIHostConfDir, install.KubeconfigName)
	}
	if restCfg != nil {
		// Read on every check: a projected token rotates (about hourly).
		in.KubeconfigFunc = func() ([]byte, error) { return pluginKubeconfig(restCfg) }
	}
	return in, nil
}

// pluginKubeconfig is the agent's own API access, for the plugin to tell a
// non-ambient pod from an ambient one while the agent is down.
func pluginKubeconfig(c *rest.Config) ([]byte, error) {
	read := func(data []byte, file string) ([]byte, error) {
		if len(data) > 0 || file == "" {
			return data, nil
		}
		return os.ReadFile(file)
	}
	ca, err := read(c.CAData, c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CA of the API server: %w", err)
	}
	cert, err := read(c.CertData, c.CertFile)
	if err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	key, err := read(c.KeyData, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("client key: %w", err)
	}
	token := c.BearerToken
	if token == "" && c.BearerTokenFile != "" {
		b, err := os.ReadFile(c.BearerTokenFile)
		if err != nil {
			return nil, fmt.Errorf("token: %w", err)
		}
		token = string(b)
	}
	return cni.Kubeconfig(c.Host, ca, token, cert, key), nil
}

// serveCNI listens on the plugin's socket and, with --cni-install, installs
// the plugin once the agent answers. It returns once listening, with the
// installer's health (nil without --cni-install).
func serveCNI(ctx context.Context, o *Options, h cni.Handler, restCfg *rest.Config, log *zap.Logger) (func() error, error) {
	if o.CNISocket == "" {
		return nil, nil
	}
	srv, err := server.Listen(o.CNISocket)
	if err != nil {
		return nil, fmt.Errorf("CNI socket: %w", err)
	}
	go func() {
		if err := srv.Serve(ctx, h, log); err != nil {
			log.Error("CNI socket server stopped", zap.Error(err))
		}
	}()
	if !o.CNIInstall {
		return nil, nil
	}
	in, err := o.installer(restCfg, log)
	if err != nil {
		return nil, err
	}
	// No conflist yet (the primary plugin writes it later) or a plugin the
	// runtime could not run: keep serving (pods are still enrolled from
	// their status) while Watch retries, and stay not ready meanwhile.
	if _, err := in.Install(); errors.Is(err, install.ErrNotRunnable) {
		log.Error("the CNI plugin is not chained in: a runtime could not run it; not ready until it can", zap.Error(err))
	} else if err != nil && !errors.Is(err, install.ErrNoConfig) {
		return nil, fmt.Errorf("install the CNI plugin: %w", err)
	}
	go in.Watch(ctx, time.Second) // the primary plugin may write or rewrite its conflist later
	return in.Healthy, nil
}

// uninstallCNI takes the plugin out of the host's CNI config (cleanup).
func uninstallCNI(o *Options, log *zap.Logger) error {
	if !o.CNIInstall {
		return nil
	}
	in, err := o.installer(nil, log)
	if err != nil {
		return err
	}
	if err := in.Uninstall(); err != nil && !errors.Is(err, install.ErrNotInstalled) && !errors.Is(err, install.ErrNoConfig) && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
