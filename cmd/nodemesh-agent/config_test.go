package main

import (
	"strings"
	"testing"
	"time"

	"github.com/nodemesh/nodemesh/agent/node"
	"github.com/nodemesh/nodemesh/agent/workloads"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfig(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr []string // substrings; nil = valid
		check   func(t *testing.T, c *Config)
	}{
		{"defaults from env", nil, map[string]string{"NODE_NAME": "n1", "KUBECONFIG": "/k"}, nil, func(t *testing.T, c *Config) {
			if c.NodeName != "n1" || c.Kubeconfig != "/k" || c.InCluster || c.DrainDeadline != 30*time.Second ||
				c.caID.String() != "spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-ca" || c.bundleName != "nodemesh-trust-bundle" ||
				c.AdminAddr != "127.0.0.1:15000" || c.MetricsAddr != ":15020" || c.ReadinessAddr != ":15021" || c.AccessLog {
				t.Fatalf("%+v", c)
			}
		}},
		{"in-cluster when nothing given", []string{"--node-name=n1"}, nil, nil, func(t *testing.T, c *Config) {
			if !c.InCluster {
				t.Fatal("not in-cluster")
			}
		}},
		{"flags beat env", []string{"--node-name=n2", "--trust-domain=example.org", "--drain-deadline=5s", "--access-log", "--log-level=debug"},
			map[string]string{"NODE_NAME": "n1"}, nil, func(t *testing.T, c *Config) {
				if c.NodeName != "n2" || c.td.Name() != "example.org" || c.DrainDeadline != 5*time.Second || !c.AccessLog || c.level.String() != "DEBUG" ||
					c.caID.String() != "spiffe://example.org/ns/nodemesh-system/sa/nodemesh-ca" {
					t.Fatalf("%+v", c)
				}
			}},
		{"static observer", []string{"--node-name=n1", "--static-dir=" + dir, "--dataplane=false"}, nil, nil, nil},
		{"everything wrong", []string{"--static-dir=/nonexistent", "--kubeconfig=/k", "--trust-domain=Bad Domain", "--ca-addr=http://x",
			"--drain-deadline=-1s", "--admin-addr=0.0.0.0:15000", "--metrics-addr=nope", "--log-level=loud", "--bundle-configmap=x"}, nil,
			[]string{"--node-name", "alternatives", "not a readable directory", "--trust-domain", "--ca-addr", "--drain-deadline",
				"must listen on loopback", "--metrics-addr", "--log-level", "--bundle-configmap", "--static-dir cannot provide"}, nil},
		{"bad CA ID", []string{"--node-name=n1", "--ca-spiffe-id=https://x"}, nil, []string{"--ca-spiffe-id"}, nil},
		{"bad pod-netns", []string{"--node-name=n1", "--pod-netns=cni"}, nil, []string{"--pod-netns"}, nil},
		{"cni socket relative", []string{"--node-name=n1", "--cni-socket=run/cni.sock"}, nil, []string{"--cni-socket \"run/cni.sock\": want an absolute path"}, nil},
		{"cni socket without data plane", []string{"--node-name=n1", "--static-dir=" + dir, "--dataplane=false", "--cni-socket=/run/nodemesh/cni.sock"}, nil, []string{"--cni-socket needs the data plane"}, nil},
		{"cni socket", []string{"--node-name=n1", "--cni-socket=/var/run/nodemesh/cni.sock"}, nil, nil, func(t *testing.T, c *Config) {
			if c.CNISocket != "/var/run/nodemesh/cni.sock" {
				t.Errorf("CNISocket %q", c.CNISocket)
			}
		}},
		{"cni install", []string{"--node-name=n1", "--cni-socket=/var/run/nodemesh/cni.sock", "--cni-conf-dir=/host/etc/cni/net.d", "--cni-bin-dir=/host/opt/cni/bin"},
			map[string]string{"POD_NAMESPACE": "mesh-system"}, nil, func(t *testing.T, c *Config) {
				ic := c.cniInstall()
				if ic == nil || ic.ConfDir != "/host/etc/cni/net.d" || ic.BinDir != "/host/opt/cni/bin" || ic.Plugin != "/usr/local/bin/nodemesh-cni" ||
					ic.Socket != "/var/run/nodemesh/cni.sock" || strings.Join(ic.ExcludeNamespaces, ",") != "kube-system,mesh-system" ||
					ic.HoldWhenAgentDown != "meshed" {
					t.Errorf("install %+v", ic)
				}
			}},
		{"cni install incomplete", []string{"--node-name=n1", "--cni-conf-dir=/etc/cni/net.d", "--cni-exclude-namespaces=ok,Not_OK", "--cni-hold-when-down=some"}, nil,
			[]string{"--cni-conf-dir, --cni-bin-dir and --cni-socket together", `"Not_OK"`, `--cni-hold-when-down "some": want meshed or all`}, nil},
		{"only-pod", []string{"--node-name=n1", "--only-pod=mesh/web-0", "--only-pod=mesh/a.b", "--only-pod=web", "--only-pod=Bad_NS/x", "--only-pod=ns/x/y"}, nil,
			[]string{`--only-pod "web": want NAMESPACE/NAME`, `--only-pod "Bad_NS/x": namespace`, `--only-pod "ns/x/y"`}, nil},
		{"procs: auto by default", []string{"--node-name=n1"}, nil, nil, func(t *testing.T, c *Config) {
			if c.procsN != node.ProcsAuto {
				t.Errorf("procs %d, want auto", c.procsN)
			}
		}},
		{"procs: $GOMAXPROCS keeps the runtime's choice", []string{"--node-name=n1"}, map[string]string{"GOMAXPROCS": "3"}, nil, func(t *testing.T, c *Config) {
			if c.procsN != node.ProcsRuntime {
				t.Errorf("procs %d, want runtime", c.procsN)
			}
		}},
		{"procs: fixed", []string{"--node-name=n1", "--procs=2"}, nil, nil, func(t *testing.T, c *Config) {
			if c.procsN != 2 {
				t.Errorf("procs %d, want 2", c.procsN)
			}
		}},
		{"procs: bad", []string{"--node-name=n1", "--procs=0"}, nil, []string{`--procs "0": want auto, runtime, or a number`}, nil},
		{"node mark: kubelet's lease defaults", []string{"--node-name=n1"}, nil, nil, func(t *testing.T, c *Config) {
			if c.MarkDuration != 40*time.Second || c.MarkRenew != 10*time.Second {
				t.Errorf("mark %s/%s, want 40s/10s", c.MarkDuration, c.MarkRenew)
			}
		}},
		{"node mark renew too slow", []string{"--node-name=n1", "--node-mark-duration=20s", "--node-mark-renew=15s"}, nil,
			[]string{"--node-mark-renew 15s: must be positive and at most half"}, nil},
		{"node mark duration out of range", []string{"--node-name=n1", "--node-mark-duration=500ms", "--node-mark-renew=100ms"}, nil,
			[]string{"--node-mark-duration 500ms"}, nil},
		{"cluster labels: defaults", []string{"--node-name=n1"}, nil, nil, func(t *testing.T, c *Config) {
			if c.ClusterDomain != "cluster.local" || c.ClusterID != "Kubernetes" {
				t.Errorf("cluster domain %q, id %q", c.ClusterDomain, c.ClusterID)
			}
		}},
		{"cluster labels: env and flags", []string{"--node-name=n1", "--cluster-id=east"}, map[string]string{"CLUSTER_DOMAIN": "corp.example", "CLUSTER_ID": "west"}, nil,
			func(t *testing.T, c *Config) {
				if c.ClusterDomain != "corp.example" || c.ClusterID != "east" {
					t.Errorf("cluster domain %q, id %q", c.ClusterDomain, c.ClusterID)
				}
			}},
		{"cluster labels: bad", []string{"--node-name=n1", "--cluster-domain=.cluster.local", "--cluster-id="}, nil,
			[]string{"--cluster-domain", "--cluster-id is empty"}, nil},
		{"identity: SPIRE socket path, CA flags unused", []string{"--node-name=n1", "--identity-source=spiffe-workload-api", "--spiffe-endpoint-socket=/run/spire/sockets/agent.sock",
			"--ca-addr=http://unused", "--ca-token-file=", "--static-dir=" + dir}, nil, nil, func(t *testing.T, c *Config) {
			if c.SPIFFEEndpoint != "unix:///run/spire/sockets/agent.sock" {
				t.Errorf("SPIFFEEndpoint %q", c.SPIFFEEndpoint)
			}
			if nc := c.nodeConfig(nil, nil, nil, nil); nc.IdentitySource != node.IdentitySPIFFE || nc.SPIFFEEndpoint != c.SPIFFEEndpoint {
				t.Errorf("node config %q %q", nc.IdentitySource, nc.SPIFFEEndpoint)
			}
		}},
		{"identity: SPIRE socket from env", []string{"--node-name=n1", "--identity-source=spiffe-workload-api"},
			map[string]string{"SPIFFE_ENDPOINT_SOCKET": "unix:///tmp/agent.sock"}, nil, func(t *testing.T, c *Config) {
				if c.SPIFFEEndpoint != "unix:///tmp/agent.sock" {
					t.Errorf("SPIFFEEndpoint %q", c.SPIFFEEndpoint)
				}
			}},
		{"identity: env socket does not switch from the CA", []string{"--node-name=n1"}, map[string]string{"SPIFFE_ENDPOINT_SOCKET": "unix:///tmp/agent.sock"}, nil,
			func(t *testing.T, c *Config) {
				if c.IdentitySource != node.IdentityCA {
					t.Errorf("IdentitySource %q", c.IdentitySource)
				}
			}},
		{"identity: SPIRE without a socket", []string{"--node-name=n1", "--identity-source=spiffe-workload-api"}, nil,
			[]string{"needs --spiffe-endpoint-socket"}, nil},
		{"identity: bad socket address", []string{"--node-name=n1", "--identity-source=spiffe-workload-api", "--spiffe-endpoint-socket=agent.sock"}, nil,
			[]string{`--spiffe-endpoint-socket "agent.sock"`}, nil},
		{"identity: unknown source", []string{"--node-name=n1", "--identity-source=vault"}, nil,
			[]string{`--identity-source "vault": want ca or spiffe-workload-api`}, nil},
		{"pod-netns proc", []string{"--node-name=n1", "--pod-netns=proc"}, nil, nil, func(t *testing.T, c *Config) {
			if c.PodNetns != workloads.NetnsProc {
				t.Errorf("PodNetns %q", c.PodNetns)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig(tt.args, env(tt.env))
			if err != nil {
				t.Fatal(err)
			}
			err = c.Validate()
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if tt.check != nil {
					tt.check(t, c)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
	if _, err := parseConfig([]string{"extra"}, env(nil)); err == nil {
		t.Error("stray argument accepted")
	}
}
