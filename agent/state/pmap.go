package state

import "github.com/nodemesh/nodemesh/agent/internal/pmap"

// The snapshot's indexes are pmap.Maps: a new snapshot shares every shard
// with the one before and copies only those a change touches.

func hashKey(k Key) uint64 {
	return pmap.Mix(pmap.String(k.Namespace) ^ pmap.String(k.Name)*0x9e3779b97f4a7c15)
}

func hashServicePort(k servicePortKey) uint64 { return pmap.Mix(hashKey(k.svc) ^ pmap.String(k.port)) }
