//go:build linux

// Package cluster gives e2e tests a real etcd and kube-apiserver running
// inside a network namespace, and a real kube-proxy for node namespaces
// (kubeproxy.go).
//
// The binaries (etcd, kube-apiserver, kube-proxy) are built once from the
// Go module proxy by hack/build-control-plane.sh and cached (see BinDir).
// Start runs etcd and kube-apiserver inside a caller-provided network
// namespace (/var/run/netns/<ns>) with `ip netns exec`; the apiserver serves
// on <ip>:6443, where ip is an address configured in that namespace. The
// test process stays in the root namespace, so every client it builds dials
// through NetnsDialer; processes run inside a namespace that routes to ip
// use a kubeconfig from Kubeconfig.
//
// There is no scheduler, controller-manager or kubelet: tests create Pods
// with spec.nodeName set and write their status themselves.
package cluster

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const (
	// APIServerPort is the secure port kube-apiserver listens on at ip.
	APIServerPort = 6443
	// EtcdClientPort and EtcdPeerPort are etcd's ports on 127.0.0.1
	// inside the namespace (private to it, so fixed ports are safe; one
	// control plane per namespace).
	EtcdClientPort = 2379
	EtcdPeerPort   = 2380
	// ServiceClusterIPRange is --service-cluster-ip-range.
	ServiceClusterIPRange = "10.96.0.0/16"
	// ServiceAccountIssuer is --service-account-issuer (and the default
	// audience of TokenRequests).
	ServiceAccountIssuer = "https://kubernetes.default.svc.cluster.local"
	// AdminUser is the static-token user; it is in group system:masters.
	AdminUser = "ambient-redirect-admin"

	serviceAPIServerIP = "10.96.0.1" // first address of ServiceClusterIPRange

	readyTimeout   = 60 * time.Second
	stopGrace      = 15 * time.Second
	logTailLines   = 60
	requestTimeout = 30 * time.Second
)

// ControlPlane is a running etcd + kube-apiserver pair inside one network
// namespace. Its methods are safe for concurrent use.
type ControlPlane struct {
	ns, ip     string
	binDir     string
	dir        string // holds certs, keys, token file, etcd data, logs
	pki        *pki
	adminToken string
	dial       DialFunc
	admin      kubernetes.Interface

	mu            sync.Mutex
	etcd          *proc
	apiserver     *proc
	apiserverArgs []string
}

// Start runs etcd and kube-apiserver inside the network namespace ns
// (/var/run/netns/<ns>, created by the caller) and waits until the apiserver
// answers /readyz. ip must be an IPv4 address configured inside ns: the
// apiserver binds and advertises ip:6443, and its serving certificate covers
// ip. etcd listens on 127.0.0.1:2379/2380 inside ns; Start brings ns's
// loopback up for that. Logs, certificates and etcd's data live in
// t.TempDir(); t.Cleanup stops both processes (register the namespace's
// deletion before calling Start so it runs after). Start fails t on error.
func Start(t testing.TB, ns, ip string) *ControlPlane {
	t.Helper()
	return StartWith(t, ns, ip, Options{})
}

// Options change how StartWith runs the control plane.
type Options struct {
	// APIServerArgs, when set, gets kube-apiserver's argv (binary first) and
	// returns the one to run: a real cluster with a controller-manager and
	// kubelets drops --endpoint-reconciler-type=none and the disabled
	// ServiceAccount admission, for example.
	APIServerArgs func(argv []string) []string
}

// StartWith is Start with options.
func StartWith(t testing.TB, ns, ip string, opts Options) *ControlPlane {
	t.Helper()
	cp, err := start(t, ns, ip, opts)
	if err != nil {
		t.Fatalf("cluster.Start(%q, %q): %v", ns, ip, err)
	}
	return cp
}

func start(t testing.TB, ns, ip string, opts Options) (*ControlPlane, error) {
	began := time.Now()
	parsed := net.ParseIP(ip)
	if parsed == nil || parsed.To4() == nil {
		return nil, fmt.Errorf("ip %q is not an IPv4 address", ip)
	}
	if ns == "" || strings.ContainsAny(ns, "/\x00") {
		return nil, fmt.Errorf("bad netns name %q", ns)
	}
	if _, err := os.Stat(filepath.Join(NetnsDir, ns)); err != nil {
		return nil, fmt.Errorf("netns: %w", err)
	}
	binDir, err := BinDir()
	if err != nil {
		return nil, err
	}
	if out, err := exec.Command("ip", "-n", ns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip -n %s link set lo up: %v: %s", ns, err, out)
	}

	dir := t.TempDir()
	p, err := newPKI(dir, parsed.To4())
	if err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	cp := &ControlPlane{
		ns:         ns,
		ip:         parsed.To4().String(),
		binDir:     binDir,
		dir:        dir,
		pki:        p,
		adminToken: randomHex(32),
		dial:       NetnsDialer(ns),
	}
	tokenFile := filepath.Join(dir, "tokens.csv")
	// token,user,uid,"group1,group2"
	line := fmt.Sprintf("%s,%s,%s,\"system:masters\"\n", cp.adminToken, AdminUser, AdminUser)
	if err := os.WriteFile(tokenFile, []byte(line), 0o600); err != nil {
		return nil, err
	}
	// Registered before anything runs, so a failure below still stops
	// whatever did start.
	t.Cleanup(cp.stopAll)

	if err := cp.startEtcd(); err != nil {
		return nil, err
	}
	cp.apiserverArgs = []string{
		filepath.Join(binDir, APIServerBinary),
		"--etcd-servers=" + fmt.Sprintf("http://127.0.0.1:%d", EtcdClientPort),
		"--bind-address=" + cp.ip,
		"--advertise-address=" + cp.ip,
		"--secure-port=" + strconv.Itoa(APIServerPort),
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file=" + p.certFile,
		"--tls-private-key-file=" + p.keyFile,
		"--service-account-issuer=" + ServiceAccountIssuer,
		"--service-account-key-file=" + p.saKeyFile,
		"--service-account-signing-key-file=" + p.saKeyFile,
		"--token-auth-file=" + tokenFile,
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=" + ServiceClusterIPRange,
		"--endpoint-reconciler-type=none",
		// No controller-manager creates namespaces' "default" SA.
		"--disable-admission-plugins=ServiceAccount",
		// The agent's DaemonSet is privileged; let dry runs accept it.
		"--allow-privileged=true",
		"--profiling=false",
	}
	if opts.APIServerArgs != nil {
		cp.apiserverArgs = opts.APIServerArgs(cp.apiserverArgs)
	}
	if err := cp.startAPIServer(); err != nil {
		return nil, err
	}
	admin, err := kubernetes.NewForConfig(cp.AdminConfig())
	if err != nil {
		return nil, err
	}
	cp.admin = admin
	// /readyz can answer before the system namespaces exist; objects
	// without a namespace go to "default", so wait for it.
	err = poll(readyTimeout, cp.apiserver, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := admin.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("namespace %q never appeared: %w", metav1.NamespaceDefault, err)
	}
	t.Logf("cluster: etcd + kube-apiserver ready at %s in netns %s after %s (logs in %s)",
		cp.Host(), ns, time.Since(began).Round(time.Millisecond), dir)
	return cp, nil
}

func (cp *ControlPlane) startEtcd() error {
	etcdURL := func(port int) string { return fmt.Sprintf("http://127.0.0.1:%d", port) }
	argv := []string{
		filepath.Join(cp.binDir, EtcdBinary),
		"--name=default",
		"--data-dir=" + filepath.Join(cp.dir, "etcd-data"),
		"--listen-client-urls=" + etcdURL(EtcdClientPort),
		"--advertise-client-urls=" + etcdURL(EtcdClientPort),
		"--listen-peer-urls=" + etcdURL(EtcdPeerPort),
		"--initial-advertise-peer-urls=" + etcdURL(EtcdPeerPort),
		"--initial-cluster=default=" + etcdURL(EtcdPeerPort),
		"--initial-cluster-state=new",
		// Test data is throw-away; skipping fsync makes writes fast.
		"--unsafe-no-fsync",
		"--log-level=warn",
	}
	p, err := startProc("etcd", cp.ns, filepath.Join(cp.dir, "etcd.log"), argv)
	if err != nil {
		return err
	}
	cp.mu.Lock()
	cp.etcd = p
	cp.mu.Unlock()

	client := &http.Client{Transport: &http.Transport{DialContext: cp.dial, Proxy: nil}, Timeout: 2 * time.Second}
	healthURL := etcdURL(EtcdClientPort) + "/health"
	err = poll(readyTimeout, p, func() error {
		resp, err := client.Get(healthURL)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"health":"true"`) {
			return fmt.Errorf("%s: %s", resp.Status, body)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("etcd not healthy: %w\n--- %s (tail) ---\n%s", err, p.logPath, logTail(p.logPath, logTailLines))
	}
	return nil
}

// startAPIServer starts kube-apiserver with cp.apiserverArgs and waits for
// /readyz.
func (cp *ControlPlane) startAPIServer() error {
	cp.mu.Lock()
	if cp.apiserver != nil && !cp.apiserver.exited() {
		cp.mu.Unlock()
		return errors.New("kube-apiserver is already running")
	}
	p, err := startProc("kube-apiserver", cp.ns, filepath.Join(cp.dir, "kube-apiserver.log"), cp.apiserverArgs)
	if err != nil {
		cp.mu.Unlock()
		return err
	}
	cp.apiserver = p
	cp.mu.Unlock()

	client := cp.httpClient(5 * time.Second)
	readyz := cp.Host() + "/readyz"
	err = poll(readyTimeout, p, func() error {
		req, err := http.NewRequest(http.MethodGet, readyz, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+cp.adminToken)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 8192))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", resp.Status, tail(string(body), 10))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver not ready at %s: %w\n--- %s (tail) ---\n%s",
			readyz, err, p.logPath, logTail(p.logPath, logTailLines))
	}
	return nil
}

// poll calls check every 100ms until it succeeds, timeout passes, or p exits.
func poll(timeout time.Duration, p *proc, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%s exited (%v); last check: %w", p.name, p.waitErr, last)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s; last check: %w", timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (cp *ControlPlane) httpClient(timeout time.Duration) *http.Client {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(cp.pki.caPEM)
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext:     cp.dial,
			Proxy:           nil,
			TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		},
	}
}

func (cp *ControlPlane) stopAll() {
	cp.mu.Lock()
	api, etcd := cp.apiserver, cp.etcd
	cp.mu.Unlock()
	// Errors here are not actionable beyond the log files; Pdeathsig covers
	// anything left when the test binary exits.
	_ = api.stop(stopGrace)
	_ = etcd.stop(stopGrace)
}

// StopAPIServer stops only kube-apiserver (SIGTERM, SIGKILL after 15s) and
// waits for it to exit; etcd keeps running. A no-op if it is not running.
func (cp *ControlPlane) StopAPIServer(t testing.TB) {
	t.Helper()
	cp.mu.Lock()
	p := cp.apiserver
	cp.mu.Unlock()
	if err := p.stop(stopGrace); err != nil {
		t.Fatalf("cluster: stop kube-apiserver: %v", err)
	}
}

// StartAPIServer starts kube-apiserver again with the same flags,
// certificates, keys, port and etcd, and waits until /readyz answers (60s).
// It fails t if the apiserver is already running.
func (cp *ControlPlane) StartAPIServer(t testing.TB) {
	t.Helper()
	began := time.Now()
	if err := cp.startAPIServer(); err != nil {
		t.Fatalf("cluster: start kube-apiserver: %v", err)
	}
	t.Logf("cluster: kube-apiserver ready again after %s", time.Since(began).Round(time.Millisecond))
}

// Netns returns the name of the network namespace the control plane runs in.
func (cp *ControlPlane) Netns() string { return cp.ns }

// IP returns the address the apiserver binds to.
func (cp *ControlPlane) IP() string { return cp.ip }

// Host returns the apiserver URL, https://<ip>:6443.
func (cp *ControlPlane) Host() string {
	return "https://" + net.JoinHostPort(cp.ip, strconv.Itoa(APIServerPort))
}

// CAData returns the PEM CA certificate that signed the serving certificate.
func (cp *ControlPlane) CAData() []byte {
	return append([]byte(nil), cp.pki.caPEM...)
}

// Dialer returns a DialFunc that connects from inside the control plane's
// network namespace; use it for any client in the test process.
func (cp *ControlPlane) Dialer() DialFunc { return cp.dial }

// LogDir returns the directory holding etcd.log and kube-apiserver.log.
func (cp *ControlPlane) LogDir() string { return cp.dir }

// BinDir returns the directory of the control plane's binaries.
func (cp *ControlPlane) BinDir() string { return cp.binDir }

// CAFile returns the path of the PEM CA certificate (CAData).
func (cp *ControlPlane) CAFile() string { return cp.pki.caCertFile }

// ServiceAccountKeyFile returns the path of the RSA key that signs (and
// verifies) service account tokens.
func (cp *ControlPlane) ServiceAccountKeyFile() string { return cp.pki.saKeyFile }

// TokenConfig returns a rest.Config for the test process (dialing inside
// the namespace) that authenticates with a bearer token.
func (cp *ControlPlane) TokenConfig(token string) *rest.Config {
	return &rest.Config{
		Host:            cp.Host(),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: cp.CAData()},
		Dial:            cp.dial,
		Proxy:           func(*http.Request) (*url.URL, error) { return nil, nil },
		QPS:             100,
		Burst:           200,
	}
}

// AdminConfig returns a new rest.Config for the static admin user (group
// system:masters) that dials inside the namespace.
func (cp *ControlPlane) AdminConfig() *rest.Config { return cp.TokenConfig(cp.adminToken) }

// AdminClient returns a clientset for the admin user.
func (cp *ControlPlane) AdminClient() kubernetes.Interface { return cp.admin }

// Kubeconfig writes a kubeconfig (server https://<ip>:6443, the CA, bearer
// token) into a fresh t.TempDir() and returns its path. It is meant for
// processes that run inside a network namespace that routes to ip; clients
// in the test process must add Dialer() to the loaded config.
func (cp *ControlPlane) Kubeconfig(t testing.TB, token string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["ambient-redirect-test"] = &clientcmdapi.Cluster{
		Server:                   cp.Host(),
		CertificateAuthorityData: cp.CAData(),
	}
	cfg.AuthInfos["user"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["ambient-redirect-test"] = &clientcmdapi.Context{
		Cluster:  "ambient-redirect-test",
		AuthInfo: "user",
	}
	cfg.CurrentContext = "ambient-redirect-test"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatalf("cluster: write kubeconfig: %v", err)
	}
	return path
}

// ServiceAccountToken makes sure namespace and its ServiceAccount name
// exist, then returns a one-hour token for it from the TokenRequest API.
func (cp *ControlPlane) ServiceAccountToken(t testing.TB, namespace, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	c := cp.admin
	_, err := c.CoreV1().Namespaces().Create(ctx,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("cluster: create namespace %s: %v", namespace, err)
	}
	_, err = c.CoreV1().ServiceAccounts(namespace).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("cluster: create serviceaccount %s/%s: %v", namespace, name, err)
	}
	expiry := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("cluster: token for serviceaccount %s/%s: %v", namespace, name, err)
	}
	return tr.Status.Token
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
