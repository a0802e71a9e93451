package v1alpha1

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestCRDSchemasCoverGoTypes checks that every JSON field of the Go types is
// in the CRD's OpenAPI schema and vice versa. A field missing from the schema
// would be pruned by the API server: silently dropped, which for a policy can
// widen access.
func TestCRDSchemasCoverGoTypes(t *testing.T) {
	for file, typ := range map[string]reflect.Type{
		"security.nodemesh.io_authorizationpolicies.yaml": reflect.TypeFor[AuthorizationPolicySpec](),
		"security.nodemesh.io_peerauthentications.yaml":   reflect.TypeFor[PeerAuthenticationSpec](),
	} {
		t.Run(file, func(t *testing.T) {
			b, err := os.ReadFile("../../../manifests/crds/" + file)
			if err != nil {
				t.Fatal(err)
			}
			var crd map[string]any
			if err := yaml.Unmarshal(b, &crd); err != nil {
				t.Fatal(err)
			}
			versions := dig(t, crd, "spec", "versions").([]any)
			if len(versions) != 1 {
				t.Fatalf("%d versions, want 1", len(versions))
			}
			v := versions[0].(map[string]any)
			if v["name"] != SchemeGroupVersion.Version {
				t.Fatalf("version %v, want %s", v["name"], SchemeGroupVersion.Version)
			}
			spec := dig(t, v, "schema", "openAPIV3Schema", "properties", "spec").(map[string]any)
			compare(t, "spec", typ, spec)
		})
	}
}

func dig(t *testing.T, m map[string]any, path ...string) any {
	t.Helper()
	var cur any = m
	for _, p := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			t.Fatalf("schema: %s is not an object", p)
		}
		cur = mm[p]
	}
	return cur
}

func compare(t *testing.T, path string, typ reflect.Type, schema map[string]any) {
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	switch typ.Kind() {
	case reflect.Struct:
		if schema["type"] != "object" {
			t.Errorf("%s: schema type %v, want object", path, schema["type"])
		}
		props, _ := schema["properties"].(map[string]any)
		seen := map[string]bool{}
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "" || name == "-" {
				t.Errorf("%s.%s: no JSON name", path, f.Name)
				continue
			}
			seen[name] = true
			sub, ok := props[name].(map[string]any)
			if !ok {
				t.Errorf("%s.%s: missing from the CRD schema (the API server would prune it)", path, name)
				continue
			}
			compare(t, path+"."+name, f.Type, sub)
		}
		for name := range props {
			if !seen[name] {
				t.Errorf("%s.%s: in the CRD schema but not in the Go type", path, name)
			}
		}
	case reflect.Slice:
		if schema["type"] != "array" {
			t.Errorf("%s: schema type %v, want array", path, schema["type"])
			return
		}
		items, _ := schema["items"].(map[string]any)
		compare(t, path+"[]", typ.Elem(), items)
	case reflect.Map:
		if schema["type"] != "object" {
			t.Errorf("%s: schema type %v, want object", path, schema["type"])
			return
		}
		ap, _ := schema["additionalProperties"].(map[string]any)
		compare(t, path+"{}", typ.Elem(), ap)
	case reflect.String:
		if schema["type"] != "string" {
			t.Errorf("%s: schema type %v, want string", path, schema["type"])
		}
	default:
		t.Errorf("%s: unexpected Go kind %s", path, typ.Kind())
	}
}
