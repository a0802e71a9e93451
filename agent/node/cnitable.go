package node

import (
	"context"
	"log/slog"
	"time"

	"github.com/nodemesh/nodemesh/agent/cni"
	"github.com/nodemesh/nodemesh/agent/state"
)

// cniTableInterval is how often the agent looks for namespace changes to
// write into the CNI plugin's namespace table.
const cniTableInterval = time.Second

// keepNamespaceTable writes the CNI plugin's namespace table (agent/cni:
// which namespaces the mesh covers, for the plugin to read while this
// agent is down) once the cluster state is synced, and again whenever a
// namespace joins, leaves or changes mode. The file stays when the agent
// stops: that is when the plugin needs it. It returns with ctx.
func keepNamespaceTable(ctx context.Context, store *state.Store, path string, log *slog.Logger) {
	var (
		version uint64
		written *cni.NamespaceTable
		failing bool
	)
	tick := time.NewTicker(cniTableInterval)
	defer tick.Stop()
	for {
		if snap := store.Snapshot(); snap.Synced() && snap.Version() != version {
			version = snap.Version()
			t := namespaceTable(snap)
			if written == nil || !t.Equal(written) {
				t.Written = time.Now()
				err := cni.WriteNamespaceTable(path, t)
				switch {
				case err != nil && !failing:
					// The plugin then holds back the pods the old table
					// (or its absence) does not clear: fail closed.
					log.Warn("writing the CNI plugin's namespace table", "path", path, "err", err)
				case err == nil:
					written = &t
					log.Debug("CNI plugin's namespace table written", "path", path, "meshed", len(t.Meshed), "unmeshed", len(t.Unmeshed))
				}
				failing = err != nil
				if failing {
					version = 0 // try again at the next tick
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// namespaceTable is snap's namespaces by mode, sorted by name.
func namespaceTable(snap *state.Snapshot) cni.NamespaceTable {
	var t cni.NamespaceTable
	for _, ns := range snap.Namespaces() {
		if ns.Enrolled {
			t.Meshed = append(t.Meshed, ns.Name)
		} else {
			t.Unmeshed = append(t.Unmeshed, ns.Name)
		}
	}
	return t
}
