//go:build linux

package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
)

// FieldManager is the field manager recorded for objects this package writes.
const FieldManager = "ambient-redirect-e2e"

// manifestObject is one object read from a manifest file.
type manifestObject struct {
	source string // file:document
	obj    *unstructured.Unstructured
}

func (m manifestObject) String() string {
	name := m.obj.GetName()
	if ns := m.obj.GetNamespace(); ns != "" {
		name = ns + "/" + name
	}
	return fmt.Sprintf("%s %s (%s)", m.obj.GroupVersionKind().Kind, name, m.source)
}

// ApplyManifestsDryRun reads every *.yaml and *.yml file under dir
// (recursively; multi-document; List kinds are expanded) and submits each
// object with a server-side dry run (DryRun=All): Create, or Update when the
// object already exists. Nothing is persisted. It returns an error naming
// every object the apiserver rejected (validation, unknown kind, missing
// namespace, admission), or nil. Namespaced objects without a namespace go
// to "default"; like `kubectl apply --dry-run=server`, an object in a
// namespace that does not exist yet is rejected.
func (cp *ControlPlane) ApplyManifestsDryRun(t testing.TB, dir string) error {
	t.Helper()
	return cp.applyManifests(t, dir, true)
}

// ApplyManifests creates every object under dir as ApplyManifestsDryRun
// reads them, updating objects that already exist (create-or-update).
// Namespaces and CustomResourceDefinitions go first. It returns an error
// naming every object that failed; the others are applied regardless.
func (cp *ControlPlane) ApplyManifests(t testing.TB, dir string) error {
	t.Helper()
	return cp.applyManifests(t, dir, false)
}

func (cp *ControlPlane) applyManifests(t testing.TB, dir string, dryRun bool) error {
	t.Helper()
	objs, err := readManifests(dir)
	if err != nil {
		return err
	}
	if len(objs) == 0 {
		return fmt.Errorf("cluster: no objects in *.yaml/*.yml under %s", dir)
	}
	sort.SliceStable(objs, func(i, j int) bool { return applyRank(objs[i].obj) < applyRank(objs[j].obj) })

	cfg := cp.AdminConfig()
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	mapper, err := discoveryMapper(dc)
	if err != nil {
		return fmt.Errorf("cluster: discovery: %w", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*requestTimeout)
	defer cancel()
	var errs []error
	for _, m := range objs {
		gvk := m.obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if meta.IsNoMatchError(err) {
			// A CRD applied just before may have added the kind.
			if fresh, ferr := discoveryMapper(dc); ferr == nil {
				mapper = fresh
				mapping, err = mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m, err))
			continue
		}
		var ri dynamic.ResourceInterface
		if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
			if m.obj.GetNamespace() == "" {
				m.obj.SetNamespace(metav1.NamespaceDefault)
			}
			ri = dyn.Resource(mapping.Resource).Namespace(m.obj.GetNamespace())
		} else {
			m.obj.SetNamespace("")
			ri = dyn.Resource(mapping.Resource)
		}
		if err := createOrUpdate(ctx, ri, m.obj, dryRun); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m, err))
		}
	}
	mode := "applied"
	if dryRun {
		mode = "dry-run applied"
	}
	t.Logf("cluster: %s %d/%d objects from %s", mode, len(objs)-len(errs), len(objs), dir)
	if len(errs) > 0 {
		return fmt.Errorf("cluster: %d of %d objects under %s failed:\n%w", len(errs), len(objs), dir, errors.Join(errs...))
	}
	return nil
}

func discoveryMapper(dc discovery.DiscoveryInterface) (meta.RESTMapper, error) {
	groups, err := restmapper.GetAPIGroupResources(dc)
	if err != nil {
		return nil, err
	}
	return restmapper.NewDiscoveryRESTMapper(groups), nil
}

func createOrUpdate(ctx context.Context, ri dynamic.ResourceInterface, obj *unstructured.Unstructured, dryRun bool) error {
	var dr []string
	if dryRun {
		dr = []string{metav1.DryRunAll}
	}
	_, err := ri.Create(ctx, obj, metav1.CreateOptions{DryRun: dr, FieldManager: FieldManager})
	if err == nil || !apierrors.IsAlreadyExists(err) || obj.GetName() == "" {
		return err
	}
	existing, err := ri.Get(ctx, obj.GetName(), metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("exists, but get failed: %w", err)
	}
	obj = obj.DeepCopy()
	obj.SetResourceVersion(existing.GetResourceVersion())
	if _, err := ri.Update(ctx, obj, metav1.UpdateOptions{DryRun: dr, FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("exists, update failed: %w", err)
	}
	return nil
}

// applyRank orders Namespaces, then CRDs, before everything else.
func applyRank(o *unstructured.Unstructured) int {
	gk := o.GroupVersionKind().GroupKind()
	switch gk {
	case schema.GroupKind{Kind: "Namespace"}:
		return 0
	case schema.GroupKind{Group: "apiextensions.k8s.io", Kind: "CustomResourceDefinition"}:
		return 1
	}
	return 2
}

// readManifests decodes every object in *.yaml/*.yml files under dir, in
// lexical path order.
func readManifests(dir string) ([]manifestObject, error) {
	var files []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: read manifests: %w", err)
	}
	sort.Strings(files)
	var objs []manifestObject
	var errs []error
	for _, f := range files {
		got, err := decodeFile(f)
		if err != nil {
			errs = append(errs, err)
		}
		objs = append(objs, got...)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("cluster: bad manifests under %s:\n%w", dir, errors.Join(errs...))
	}
	return objs, nil
}

func decodeFile(path string) ([]manifestObject, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	var objs []manifestObject
	for doc := 1; ; doc++ {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs, nil
			}
			return objs, fmt.Errorf("%s: document %d: %w", path, doc, err)
		}
		if len(m) == 0 {
			continue // empty document (comments only, or a stray ---)
		}
		src := fmt.Sprintf("%s#%d", path, doc)
		u := &unstructured.Unstructured{Object: m}
		if u.GetAPIVersion() == "" || u.GetKind() == "" {
			return objs, fmt.Errorf("%s: apiVersion and kind are required", src)
		}
		if u.IsList() {
			list, err := u.ToList()
			if err != nil {
				return objs, fmt.Errorf("%s: %w", src, err)
			}
			for i := range list.Items {
				objs = append(objs, manifestObject{source: fmt.Sprintf("%s[%d]", src, i), obj: &list.Items[i]})
			}
			continue
		}
		objs = append(objs, manifestObject{source: src, obj: u})
	}
}
