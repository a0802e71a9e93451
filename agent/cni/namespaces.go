package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// While its agent is down the plugin cannot ask which pods the mesh must
// capture. The agent therefore leaves its last view of the namespaces
// beside the socket, in a root-only file, and the plugin reads it only
// when the socket does not answer: a pod of a namespace the agent last saw
// outside the mesh starts (there was nothing to capture), every other pod
// is held back (CNI "try again later") until the agent is back. A missing,
// unreadable or malformed table holds every pod back, as does the plugin's
// holdWhenAgentDown "all".

// NamespaceTableName is the table's file name, in the socket's directory.
const NamespaceTableName = "namespaces.json"

// namespaceTableVersion is the format written; a reader refuses others.
const namespaceTableVersion = 1

// maxNamespaceTable bounds what the plugin reads (about 60 bytes a
// namespace: far above any cluster's count).
const maxNamespaceTable = 8 << 20

// Hold modes: which pods the plugin holds back while the agent is down.
const (
	// HoldMeshed holds the pods of namespaces the agent last saw in the
	// mesh, of namespaces it did not know, and every pod when the table is
	// missing or unreadable (the default).
	HoldMeshed = "meshed"
	// HoldAll holds every pod outside excludeNamespaces.
	HoldAll = "all"
)

// NamespaceTable is the agent's last view of which namespaces it meshes.
type NamespaceTable struct {
	Version int `json:"version"`
	// Written is when the agent wrote this view (for operators: how old
	// the plugin's knowledge is).
	Written time.Time `json:"written"`
	// Meshed are the namespaces enrolled in the mesh (label
	// nodemesh.io/mode=enabled); Unmeshed all the others the agent knew.
	Meshed   []string `json:"meshed"`
	Unmeshed []string `json:"unmeshed"`
}

// NamespaceTablePath is the table beside socket.
func NamespaceTablePath(socket string) string {
	return filepath.Join(filepath.Dir(socket), NamespaceTableName)
}

// Equal reports whether t and o list the same namespaces (Written aside).
func (t *NamespaceTable) Equal(o *NamespaceTable) bool {
	return slices.Equal(t.Meshed, o.Meshed) && slices.Equal(t.Unmeshed, o.Unmeshed)
}

// IsUnmeshed reports whether the table lists ns outside the mesh: the only
// answer that lets the plugin start a pod without the agent.
func (t *NamespaceTable) IsUnmeshed(ns string) bool {
	_, ok := slices.BinarySearch(t.Unmeshed, ns)
	return ok
}

// WriteNamespaceTable writes t (lists sorted) to path atomically, readable
// by root only.
func WriteNamespaceTable(path string, t NamespaceTable) error {
	t.Version = namespaceTableVersion
	t.Meshed = slices.Sorted(slices.Values(t.Meshed))
	t.Unmeshed = slices.Sorted(slices.Values(t.Unmeshed))
	if err := t.check(); err != nil {
		return fmt.Errorf("namespace table: %w", err)
	}
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	return writeAtomic(path, b, 0o600)
}

// ReadNamespaceTable reads and checks the table at path.
func ReadNamespaceTable(path string) (NamespaceTable, error) {
	var t NamespaceTable
	f, err := os.Open(path)
	if err != nil {
		return t, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxNamespaceTable+1))
	if err != nil {
		return t, fmt.Errorf("reading %s: %w", path, err)
	}
	if len(b) > maxNamespaceTable {
		return t, fmt.Errorf("%s is larger than %d bytes", path, maxNamespaceTable)
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return t, fmt.Errorf("decoding %s: %w", path, err)
	}
	if t.Version != namespaceTableVersion {
		return t, fmt.Errorf("%s: format version %d, want %d (an agent of another version wrote it)", path, t.Version, namespaceTableVersion)
	}
	if err := t.check(); err != nil {
		return t, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// check wants both lists sorted, without duplicates, and disjoint.
func (t *NamespaceTable) check() error {
	for _, l := range [][]string{t.Meshed, t.Unmeshed} {
		for i := range l {
			if l[i] == "" {
				return errors.New("an empty namespace name")
			}
			if i > 0 && l[i-1] >= l[i] {
				return fmt.Errorf("namespaces not sorted or repeated at %q", l[i])
			}
		}
	}
	for _, ns := range t.Meshed {
		if t.IsUnmeshed(ns) {
			return fmt.Errorf("namespace %q is listed both meshed and unmeshed", ns)
		}
	}
	return nil
}
