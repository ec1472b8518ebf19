package controller

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// API is what the agent asks of the Kubernetes API: this node's pods and
// the namespaces (list, watch, get; pods also patch), the ServiceCIDRs
// (list, watch), and whether the API server is ready. NewAPI is the
// agent's; a client-go clientset's CoreV1() pods and namespaces and
// NetworkingV1() servicecidrs have exactly these methods (the tests adapt a
// fake).
type API interface {
	Pods(namespace string) PodAPI
	Namespaces() NamespaceAPI
	ServiceCIDRs() ServiceCIDRAPI
	// Readyz is nil when the API server answers /readyz with success.
	Readyz(ctx context.Context) error
}

// PodAPI is the pods of a namespace ("" all).
type PodAPI interface {
	List(ctx context.Context, opts metav1.ListOptions) (*corev1.PodList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Pod, error)
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Pod, error)
}

// NamespaceAPI is the namespaces.
type NamespaceAPI interface {
	List(ctx context.Context, opts metav1.ListOptions) (*corev1.NamespaceList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Namespace, error)
}

// ServiceCIDRAPI is the ServiceCIDRs (cluster-scoped).
type ServiceCIDRAPI interface {
	List(ctx context.Context, opts metav1.ListOptions) (*networkingv1.ServiceCIDRList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}

// NewAPI is an API over REST clients whose scheme holds core/v1 and
// networking.k8s.io/v1 alone. client-go's clientset (kubernetes.NewForConfig)
// links a typed client and the types of every API group: half the agent's
// binary, and so several MiB of its resident memory, for three resources.
func NewAPI(cfg *rest.Config) (API, error) {
	scheme := runtime.NewScheme()
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := networkingv1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	base := rest.CopyConfig(cfg)
	base.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if base.UserAgent == "" {
		base.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	// One HTTP client under both: one connection to the API server.
	hc, err := rest.HTTPClientFor(base)
	if err != nil {
		return nil, err
	}
	clientFor := func(apiPath string, gv schema.GroupVersion) (*rest.RESTClient, error) {
		c := rest.CopyConfig(base)
		c.APIPath, c.GroupVersion = apiPath, &gv
		return rest.RESTClientForConfigAndClient(c, hc)
	}
	rc, err := clientFor("/api", corev1.SchemeGroupVersion)
	if err != nil {
		return nil, err
	}
	nc, err := clientFor("/apis", networkingv1.SchemeGroupVersion)
	if err != nil {
		return nil, err
	}
	return &restAPI{rc: rc, networking: nc, params: runtime.NewParameterCodec(scheme)}, nil
}

// timeout is the request timeout a list or watch asks the server for.
func timeout(opts metav1.ListOptions) time.Duration {
	if opts.TimeoutSeconds == nil {
		return 0
	}
	return time.Duration(*opts.TimeoutSeconds) * time.Second
}

type restAPI struct {
	rc         *rest.RESTClient // core/v1
	networking *rest.RESTClient // networking.k8s.io/v1
	params     runtime.ParameterCodec
}

func (a *restAPI) Pods(namespace string) PodAPI { return &restPods{a, namespace} }

func (a *restAPI) Namespaces() NamespaceAPI { return &restNamespaces{a} }

func (a *restAPI) ServiceCIDRs() ServiceCIDRAPI { return &restServiceCIDRs{a} }

func (a *restAPI) Readyz(ctx context.Context) error {
	return a.rc.Get().AbsPath("/readyz").Do(ctx).Error()
}

type restPods struct {
	a  *restAPI
	ns string
}

func (p *restPods) List(ctx context.Context, opts metav1.ListOptions) (*corev1.PodList, error) {
	out := &corev1.PodList{}
	err := p.a.rc.Get().Namespace(p.ns).Resource("pods").VersionedParams(&opts, p.a.params).Timeout(timeout(opts)).Do(ctx).Into(out)
	return out, err
}

func (p *restPods) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return p.a.rc.Get().Namespace(p.ns).Resource("pods").VersionedParams(&opts, p.a.params).Timeout(timeout(opts)).Watch(ctx)
}

func (p *restPods) Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Pod, error) {
	out := &corev1.Pod{}
	err := p.a.rc.Get().Namespace(p.ns).Resource("pods").Name(name).VersionedParams(&opts, p.a.params).Do(ctx).Into(out)
	return out, err
}

func (p *restPods) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Pod, error) {
	out := &corev1.Pod{}
	err := p.a.rc.Patch(pt).Namespace(p.ns).Resource("pods").Name(name).SubResource(subresources...).
		VersionedParams(&opts, p.a.params).Body(data).Do(ctx).Into(out)
	return out, err
}

type restNamespaces struct{ a *restAPI }

func (n *restNamespaces) List(ctx context.Context, opts metav1.ListOptions) (*corev1.NamespaceList, error) {
	out := &corev1.NamespaceList{}
	err := n.a.rc.Get().Resource("namespaces").VersionedParams(&opts, n.a.params).Timeout(timeout(opts)).Do(ctx).Into(out)
	return out, err
}

func (n *restNamespaces) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return n.a.rc.Get().Resource("namespaces").VersionedParams(&opts, n.a.params).Timeout(timeout(opts)).Watch(ctx)
}

func (n *restNamespaces) Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Namespace, error) {
	out := &corev1.Namespace{}
	err := n.a.rc.Get().Resource("namespaces").Name(name).VersionedParams(&opts, n.a.params).Do(ctx).Into(out)
	return out, err
}

type restServiceCIDRs struct{ a *restAPI }

func (s *restServiceCIDRs) List(ctx context.Context, opts metav1.ListOptions) (*networkingv1.ServiceCIDRList, error) {
	out := &networkingv1.ServiceCIDRList{}
	err := s.a.networking.Get().Resource("servicecidrs").VersionedParams(&opts, s.a.params).Timeout(timeout(opts)).Do(ctx).Into(out)
	return out, err
}

func (s *restServiceCIDRs) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return s.a.networking.Get().Resource("servicecidrs").VersionedParams(&opts, s.a.params).Timeout(timeout(opts)).Watch(ctx)
}
