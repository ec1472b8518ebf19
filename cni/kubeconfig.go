package cni

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// kubeconfig is the part of a kubeconfig file the plugin reads. The plugin
// links no client-go, so this is the whole of its API client config: TLS
// verification with the CA (or the system's roots), a bearer token, a
// client certificate.
type kubeconfig struct {
	APIVersion     string      `json:"apiVersion"`
	Kind           string      `json:"kind"`
	CurrentContext string      `json:"current-context"`
	Clusters       []kcCluster `json:"clusters"`
	Contexts       []kcContext `json:"contexts"`
	Users          []kcUser    `json:"users"`
}

type kcCluster struct {
	Name    string `json:"name"`
	Cluster struct {
		Server                   string `json:"server"`
		CertificateAuthority     string `json:"certificate-authority,omitempty"`
		CertificateAuthorityData []byte `json:"certificate-authority-data,omitempty"`
		InsecureSkipTLSVerify    bool   `json:"insecure-skip-tls-verify,omitempty"`
	} `json:"cluster"`
}

type kcContext struct {
	Name    string `json:"name"`
	Context struct {
		Cluster string `json:"cluster"`
		User    string `json:"user"`
	} `json:"context"`
}

type kcUser struct {
	Name string `json:"name"`
	User struct {
		Token                 string `json:"token,omitempty"`
		TokenFile             string `json:"tokenFile,omitempty"`
		ClientCertificate     string `json:"client-certificate,omitempty"`
		ClientCertificateData []byte `json:"client-certificate-data,omitempty"`
		ClientKey             string `json:"client-key,omitempty"`
		ClientKeyData         []byte `json:"client-key-data,omitempty"`
	} `json:"user"`
}

// Kubeconfig renders a minimal kubeconfig (JSON, which is valid YAML) for
// one API server and one credential: a bearer token, a client certificate,
// or both. Empty arguments are left out.
func Kubeconfig(server string, caData []byte, token string, certData, keyData []byte) []byte {
	var cl kcCluster
	cl.Name = PluginType
	cl.Cluster.Server = server
	cl.Cluster.CertificateAuthorityData = caData
	var u kcUser
	u.Name = PluginType
	u.User.Token = token
	u.User.ClientCertificateData = certData
	u.User.ClientKeyData = keyData
	var cx kcContext
	cx.Name = PluginType
	cx.Context.Cluster = PluginType
	cx.Context.User = PluginType
	kc := kubeconfig{
		APIVersion: "v1", Kind: "Config", CurrentContext: PluginType,
		Clusters: []kcCluster{cl}, Contexts: []kcContext{cx}, Users: []kcUser{u},
	}
	// Strings and byte slices always marshal.
	out, _ := json.MarshalIndent(kc, "", "  ")
	return append(out, '\n')
}

// APIServer is what the plugin needs to call the API server: its URL and
// credentials, as read from a kubeconfig.
type APIServer struct {
	Server   string
	CAData   []byte // nil: the system's roots
	Insecure bool   // insecure-skip-tls-verify
	Token    string
	CertData []byte
	KeyData  []byte
}

// LoadKubeconfig reads the current context's cluster and user from a JSON
// kubeconfig, as Kubeconfig writes it (the agent's own credentials): inline
// *-data fields or files (relative to the kubeconfig's directory), a token or
// a tokenFile. JSON (what the agent writes) or YAML (what people write:
// the plugin config may name any kubeconfig).
func LoadKubeconfig(path string) (*APIServer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	var kc kubeconfig
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	clusterName, userName := "", ""
	for _, c := range kc.Contexts {
		if c.Name == kc.CurrentContext || kc.CurrentContext == "" && len(kc.Contexts) == 1 {
			clusterName, userName = c.Context.Cluster, c.Context.User
		}
	}
	var cluster *kcCluster
	for i := range kc.Clusters {
		if kc.Clusters[i].Name == clusterName || clusterName == "" && len(kc.Clusters) == 1 {
			cluster = &kc.Clusters[i]
		}
	}
	if cluster == nil || cluster.Cluster.Server == "" {
		return nil, fmt.Errorf("kubeconfig %s: no cluster with a server for context %q", path, kc.CurrentContext)
	}
	dir := filepath.Dir(path)
	readRel := func(p string) ([]byte, error) {
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		return os.ReadFile(p)
	}
	a := &APIServer{
		Server:   strings.TrimSuffix(cluster.Cluster.Server, "/"),
		CAData:   cluster.Cluster.CertificateAuthorityData,
		Insecure: cluster.Cluster.InsecureSkipTLSVerify,
	}
	var errs []error
	if a.CAData == nil && cluster.Cluster.CertificateAuthority != "" {
		a.CAData, err = readRel(cluster.Cluster.CertificateAuthority)
		errs = append(errs, err)
	}
	for i := range kc.Users {
		u := kc.Users[i].User
		if kc.Users[i].Name != userName && (userName != "" || len(kc.Users) != 1) {
			continue
		}
		// A token read from a file often ends in a newline, which is not
		// valid in a header.
		a.Token, a.CertData, a.KeyData = strings.TrimSpace(u.Token), u.ClientCertificateData, u.ClientKeyData
		if a.Token == "" && u.TokenFile != "" {
			var tok []byte
			tok, err = readRel(u.TokenFile)
			a.Token = strings.TrimSpace(string(tok))
			errs = append(errs, err)
		}
		if a.CertData == nil && u.ClientCertificate != "" {
			a.CertData, err = readRel(u.ClientCertificate)
			errs = append(errs, err)
		}
		if a.KeyData == nil && u.ClientKey != "" {
			a.KeyData, err = readRel(u.ClientKey)
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return a, nil
}

// HTTPClient is a client for the API server with a's TLS settings; the
// bearer token is set per request (see Lookup).
func (a *APIServer) HTTPClient(timeout time.Duration) (*http.Client, error) {
	// InsecureSkipVerify only when the kubeconfig says so, as client-go does.
	tc := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: a.Insecure}
	if len(a.CAData) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(a.CAData) {
			return nil, errors.New("kubeconfig: no certificate in the certificate authority data")
		}
		tc.RootCAs = pool
	}
	if len(a.CertData) > 0 || len(a.KeyData) > 0 {
		cert, err := tls.X509KeyPair(a.CertData, a.KeyData)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:             http.ProxyFromEnvironment,
			TLSClientConfig:   tc,
			ForceAttemptHTTP2: true,
		},
	}, nil
}
