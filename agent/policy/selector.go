package policy

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// labelSet converts without copying; labels.Set is a map[string]string.
func labelSet(m map[string]string) labels.Set { return labels.Set(m) }

// compileLabelSelector turns a Kubernetes label selector into a matcher.
// An empty selector matches everything; a nil one must be handled by the caller.
func compileLabelSelector(ls *metav1.LabelSelector) (labels.Selector, error) {
	for _, req := range ls.MatchExpressions {
		switch req.Operator {
		case metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn:
			if len(req.Values) == 0 {
				return nil, fmt.Errorf("matchExpressions key %q: operator %s needs at least one value", req.Key, req.Operator)
			}
		case metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist:
			if len(req.Values) > 0 {
				return nil, fmt.Errorf("matchExpressions key %q: operator %s takes no values", req.Key, req.Operator)
			}
		default:
			return nil, fmt.Errorf("matchExpressions key %q: unknown operator %q (want In, NotIn, Exists or DoesNotExist)", req.Key, req.Operator)
		}
	}
	sel, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return nil, fmt.Errorf("parsing label selector: %w", err)
	}
	return sel, nil
}

// compileMatchLabels compiles Istio-style matchLabels; nil or empty means nil
// (select everything in scope).
func compileMatchLabels(m map[string]string) (labels.Selector, error) {
	if len(m) == 0 {
		return nil, nil
	}
	sel, err := labels.ValidatedSelectorFromSet(m)
	if err != nil {
		return nil, fmt.Errorf("parsing selector.matchLabels: %w", err)
	}
	return sel, nil
}
