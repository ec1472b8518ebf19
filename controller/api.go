package controller

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// API is what the agent asks of the Kubernetes API: this node's pods and
// the namespaces (list, watch, get; pods also patch), and whether the API
// server is ready. NewAPI is the agent's; a client-go clientset's CoreV1()
// pods and namespaces have exactly these methods (the tests adapt a fake).
type API interface {
	Pods(namespace string) PodAPI
	Namespaces() NamespaceAPI
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

// NewAPI is an API over one REST client whose scheme holds core/v1 alone.
// client-go's clientset (kubernetes.NewForConfig) links a typed client and
// the types of every API group: half the agent's binary, and so several
// MiB of its resident memory, for two resources.
func NewAPI(cfg *rest.Config) (API, error) {
	scheme := runtime.NewScheme()
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	c.APIPath = "/api"
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, err
	}
	return &restAPI{rc: rc, params: runtime.NewParameterCodec(scheme)}, nil
}

// timeout is the request timeout a list or watch asks the server for.
func timeout(opts metav1.ListOptions) time.Duration {
	if opts.TimeoutSeconds == nil {
		return 0
	}
	return time.Duration(*opts.TimeoutSeconds) * time.Second
}

type restAPI struct {
	rc     *rest.RESTClient
	params runtime.ParameterCodec
}

func (a *restAPI) Pods(namespace string) PodAPI { return &restPods{a, namespace} }

func (a *restAPI) Namespaces() NamespaceAPI { return &restNamespaces{a} }

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
