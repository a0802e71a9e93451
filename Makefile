# nodemesh build, test and demo entry points.
#
#   sudo make test   every test tier (unit, privileged, lab end to end)
#   sudo make demo   the lab cluster with the mesh
#
# Both install what they need on a fresh Debian machine with Go: missing apt
# packages, the kube-apiserver (built once from the k8s.io/kubernetes Go
# module into the user cache, keyed by version), h2spec and SPIRE (likewise).

SHELL := /bin/bash
.DEFAULT_GOAL := build

GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
export PATH := $(dir $(GO)):$(PATH)

K8S_VERSION    := v1.34.2
CACHE_HOME     := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)
KUBE_APISERVER := $(CACHE_HOME)/nodemesh/kube-apiserver-$(K8S_VERSION)/kube-apiserver
export NODEMESH_KUBE_APISERVER := $(KUBE_APISERVER)
# kubelet, kube-controller-manager, kube-scheduler, kube-proxy and kubectl for
# real nodes on this machine, built like the API server from their own
# module (lab/kube-node) into the user cache, keyed by version.
KUBE_NODE_DIR  := $(CACHE_HOME)/nodemesh/kube-node-$(K8S_VERSION)
export NODEMESH_KUBE_NODE_DIR := $(KUBE_NODE_DIR)
K8S_LDFLAGS    := -s -w $(foreach p,k8s.io/component-base/version k8s.io/client-go/pkg/version,\
                  -X $(p).gitVersion=$(K8S_VERSION) -X $(p).gitMajor=1 \
                  -X $(p).gitMinor=$(word 2,$(subst ., ,$(K8S_VERSION))) -X $(p).gitTreeState=clean)

# h2spec, the HTTP/2 conformance suite that agent/hbone's TestH2Spec runs
# against the HBONE server; keep the version equal to h2specVersion there.
H2SPEC_VERSION := v2.2.1
H2SPEC         := $(CACHE_HOME)/nodemesh/h2spec-$(H2SPEC_VERSION)/h2spec
export NODEMESH_H2SPEC := $(H2SPEC)

# SPIRE's server and agent, for the lab test of the agents'
# --identity-source=spiffe-workload-api (lab/spire; keep the version equal
# to spire.Version there). Built from the Go module proxy in a throw-away
# module, as h2spec is, with cgo (SPIRE's sqlite datastore), cached by
# version.
SPIRE_VERSION  := v1.13.3
SPIRE_DIR      := $(CACHE_HOME)/nodemesh/spire-$(SPIRE_VERSION)
export NODEMESH_SPIRE_DIR := $(SPIRE_DIR)

# Debian packages each group of targets needs.
APT_RUNTIME  := etcd-server iproute2 nftables tcpdump
APT_GENERATE := clang llvm libbpf-dev bpftool
# haproxy is the sidecar baseline of the benchmark; the lab tier's quick
# benchmark smoke test checks that scenario too.
APT_BENCH    := haproxy
# Real nodes: containerd, runc, the reference CNI plugins;
# busybox-static for the uninstall cleanup image (docker.io cannot be pulled).
APT_CLUSTER  := containerd runc containernetworking-plugins busybox-static
# A C compiler for cgo in SPIRE's build.
APT_SPIRE    := gcc libc6-dev

BINARIES := nodemesh-agent nodemesh-ca nodemeshctl nodemesh-cni
# The build version stamped into every binary (cmd/internal/version): the
# git tag, or the commit when untagged; override with make VERSION=v1.2.3.
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS  := -X github.com/nodemesh/nodemesh/agent/version.version=$(VERSION)
FUZZTIME ?= 10s

.PHONY: build generate generate-check test test-unit test-race test-priv test-lab test-cluster deps-cluster image-docker demo bench lint fuzz \
        kube-apiserver kube-node h2spec spire deps deps-generate deps-bench deps-spire clean lab-down manifests-check image bench-go

build:
	@mkdir -p bin
	@for b in $(BINARIES); do \
	  if [ -d cmd/$$b ]; then $(GO) build -ldflags "$(LDFLAGS)" -o bin/$$b ./cmd/$$b || exit 1; fi; \
	done

# apt-install helper: installs the listed packages that are missing.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root: sudo make $@)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	fi
endef

deps:
	$(call apt_install,$(APT_RUNTIME))

deps-generate:
	$(call apt_install,$(APT_GENERATE))

deps-bench:
	$(call apt_install,$(APT_RUNTIME) $(APT_BENCH))

deps-cluster:
	$(call apt_install,$(APT_RUNTIME) $(APT_CLUSTER))

deps-spire:
	$(call apt_install,$(APT_SPIRE))

# The real API server, built from the Go module in a separate module under
# lab/ so the main go.mod never requires k8s.io/kubernetes. No file
# prerequisites on purpose: a fresh clone must reuse the cached build.
kube-apiserver:
	@if [ ! -x "$(KUBE_APISERVER)" ]; then \
	  echo "building kube-apiserver $(K8S_VERSION) into $(KUBE_APISERVER) (a few minutes, once)"; \
	  mkdir -p "$(dir $(KUBE_APISERVER))" && \
	  (cd lab/kube-apiserver && GOFLAGS=-mod=mod $(GO) build -o "$(KUBE_APISERVER).tmp" .) && \
	  mv "$(KUBE_APISERVER).tmp" "$(KUBE_APISERVER)"; \
	fi

# Same pattern for the node binaries: one `go build` of the five commands,
# into a temporary directory renamed into place only when all of them built.
kube-node:
	@if [ ! -x "$(KUBE_NODE_DIR)/kubectl" ]; then \
	  echo "building kubelet, kube-controller-manager, kube-scheduler, kube-proxy, kubectl $(K8S_VERSION) into $(KUBE_NODE_DIR) (several minutes, once)"; \
	  rm -rf "$(KUBE_NODE_DIR).tmp" && mkdir -p "$(KUBE_NODE_DIR).tmp" && \
	  (cd lab/kube-node && GOFLAGS=-mod=mod $(GO) build -ldflags '$(K8S_LDFLAGS)' -o "$(KUBE_NODE_DIR).tmp/" ./...) && \
	  rm -rf "$(KUBE_NODE_DIR)" && mv "$(KUBE_NODE_DIR).tmp" "$(KUBE_NODE_DIR)"; \
	fi

# h2spec from the Go module proxy, built in a throw-away module with its
# dependencies pinned (it predates Go modules), cached by version like the
# kube-apiserver.
h2spec:
	@if [ ! -x "$(H2SPEC)" ]; then \
	  echo "building h2spec $(H2SPEC_VERSION) into $(H2SPEC)"; \
	  tmp=$$(mktemp -d) && \
	  printf '%s\n' 'module nodemesh.local/h2spec-build' 'go 1.26' \
	    'require github.com/summerwind/h2spec $(H2SPEC_VERSION)+incompatible' \
	    'require github.com/spf13/cobra v1.10.2' 'require github.com/fatih/color v1.19.0' \
	    'require golang.org/x/net v0.62.0' > "$$tmp/go.mod" && \
	  mkdir -p "$(dir $(H2SPEC))" && \
	  (cd "$$tmp" && GOFLAGS=-mod=mod $(GO) build -trimpath -ldflags '-X main.VERSION=$(H2SPEC_VERSION)' \
	    -o "$(H2SPEC).tmp" github.com/summerwind/h2spec/cmd/h2spec); \
	  rc=$$?; rm -rf "$$tmp"; [ $$rc = 0 ] || exit $$rc; \
	  mv "$(H2SPEC).tmp" "$(H2SPEC)"; \
	fi

# spire-server and spire-agent from github.com/spiffe/spire at
# SPIRE_VERSION: a throw-away module that requires only SPIRE, so every
# dependency is at the version SPIRE's own go.mod pins (checked against
# go.sum's database like any module download), both commands built in one
# `go build` into a temporary directory renamed into place only when both
# built. The version is stamped as SPIRE's release build stamps it:
# without the leading v (SPIRE's datastore parses it as semver at start, and
# panics on "v1.13.3"); both binaries must then print it before the build
# counts.
spire:
	@if [ ! -x "$(SPIRE_DIR)/spire-server" ] || [ ! -x "$(SPIRE_DIR)/spire-agent" ]; then \
	  command -v gcc >/dev/null || { echo "building SPIRE needs a C compiler for cgo (sqlite): apt-get install gcc libc6-dev, or sudo make deps-spire"; exit 1; }; \
	  echo "building spire-server and spire-agent $(SPIRE_VERSION) into $(SPIRE_DIR) (a few minutes, once)"; \
	  tmp=$$(mktemp -d) && \
	  printf '%s\n' 'module nodemesh.local/spire-build' 'go 1.26' \
	    'require github.com/spiffe/spire $(SPIRE_VERSION)' > "$$tmp/go.mod" && \
	  rm -rf "$(SPIRE_DIR).tmp" && mkdir -p "$(SPIRE_DIR).tmp" && \
	  (cd "$$tmp" && CGO_ENABLED=1 GOFLAGS=-mod=mod $(GO) build -trimpath \
	    -ldflags '-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=$(SPIRE_VERSION:v%=%)' \
	    -o "$(SPIRE_DIR).tmp/" github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent); \
	  rc=$$?; rm -rf "$$tmp"; [ $$rc = 0 ] || { rm -rf "$(SPIRE_DIR).tmp"; exit $$rc; }; \
	  for b in spire-server spire-agent; do \
	    v=$$("$(SPIRE_DIR).tmp/$$b" --version 2>&1); \
	    [ "$$v" = "$(SPIRE_VERSION:v%=%)" ] || { echo "the $$b just built does not run: $$v"; rm -rf "$(SPIRE_DIR).tmp"; exit 1; }; \
	  done; \
	  rm -rf "$(SPIRE_DIR)" && mv "$(SPIRE_DIR).tmp" "$(SPIRE_DIR)"; \
	fi

GENERATED_DIRS := redirect agent/policy/v1alpha1 agent/l7/v1alpha1

# bpf2go for the eBPF objects (needs clang), deepcopy-gen for the CRD types.
generate: deps-generate
	$(GO) generate $(addprefix ./,$(addsuffix /...,$(GENERATED_DIRS)))

# Regenerating must leave the committed output unchanged.
generate-check: generate
	@if [ -n "$$(git status --porcelain -- $(GENERATED_DIRS))" ]; then \
	  echo "make generate changed committed files; commit the regenerated output:"; \
	  git status --porcelain -- $(GENERATED_DIRS); git --no-pager diff --stat -- $(GENERATED_DIRS); exit 1; \
	fi

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Test tiers, chosen by test name: TestPriv* need root (netns, BPF, cgroups),
# TestLab* need the lab's real API server, TestCluster* real kubelet +
# containerd nodes (lab/cluster, docs/cluster.md); everything else is a unit test.
test: deps deps-bench deps-cluster deps-spire kube-apiserver kube-node h2spec spire lint generate-check test-unit test-race test-priv test-lab test-cluster

test-unit: h2spec
	@echo "== tier 1: unit tests"
	$(GO) test -count=1 -skip '^Test(Priv|Lab|Cluster)' ./...

# The agent's concurrent packages again under the race detector (unit tier:
# in-memory fakes at capture and SVIDs, no root).
RACE_PKGS = ./agent/proxy/ ./agent/hbone/ ./agent/dataplane/... ./agent/enforce/ ./agent/resolve/ \
	./agent/workloads/ ./agent/telemetry/ ./agent/node/ ./agent/admin/ ./agent/state/ ./agent/exposure/ ./identity/svid/
test-race:
	@echo "== tier 1b: the agent's concurrent packages under -race"
	$(GO) test -count=1 -race -skip '^Test(Priv|Lab)' $(RACE_PKGS)

test-priv: deps
	@echo "== tier 2: privileged tests (root: network namespaces, BPF, cgroups)"
	$(GO) test -count=1 -run '^TestPriv' ./...

# The agent end-to-end test runs its agents built with -race
# (NODEMESH_AGENT_RACE=1); a race they report fails it.
# TestLabSpireIdentitySource runs a real SPIRE (make spire,
# $NODEMESH_SPIRE_DIR).
test-lab: deps deps-bench deps-spire kube-apiserver spire
	@echo "== tier 3: lab end-to-end tests (real kube-apiserver)"
	NODEMESH_AGENT_RACE=1 $(GO) test -count=1 -p 1 -timeout 20m -run '^TestLab' ./...

# The cluster tests install the images `make image` built, as a user would.
# The tier installs manifests/overlays/cluster, which pins the images' tag
# to dev: its archive is always built with that tag, whatever IMAGE_TAG is.
test-cluster: deps-cluster kube-apiserver kube-node
	@echo "== tier 4: cluster tests (real kubelet + containerd nodes, docs/cluster.md)"
	$(GO) run ./lab/cluster/mkimage -tag dev -ldflags "$(LDFLAGS)" -o bin/images-dev.tar
	NODEMESH_IMAGES=$(CURDIR)/bin/images-dev.tar $(GO) test -count=1 -p 1 -timeout 30m -run '^TestCluster' ./lab/cluster/

fuzz:
	@set -e; for f in $$(grep -rl --include='*_test.go' '^func Fuzz' .); do \
	  pkg=./$$(dirname $$f); \
	  for t in $$(grep -h -o '^func Fuzz[A-Za-z0-9_]*' $$f | sed 's/^func //'); do \
	    echo "== $$pkg $$t ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

demo: deps kube-apiserver build
	./bin/nodemeshctl lab demo

# The benchmark: no mesh, nodemesh L4 and HAProxy mTLS sidecars on the lab,
# interleaved; report, JSON and charts in results/ (bench/README.md).
BENCH_OUT ?= results
bench: deps-bench kube-apiserver build
	./bin/nodemeshctl bench --profile $(or $(BENCH_PROFILE),full) --out $(BENCH_OUT)

# Go micro-benchmarks of the hot paths (tunnel, capture, policy, histogram).
bench-go: deps kube-apiserver
	@mkdir -p $(BENCH_OUT)
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./... | tee $(BENCH_OUT)/go-bench.txt

# Install proof on the lab's real API server: CRDs, server-side dry-run of
# every manifest (kustomize and the Helm chart), agents and CA running on
# their own service-account tokens.
manifests-check: deps kube-apiserver
	$(GO) test -count=1 -p 1 -timeout 20m -run '^TestLab(Install|HelmInstall)' -v ./manifests/

# Container images without a Docker engine: static binaries on an empty base,
# one archive for `ctr -n k8s.io images import bin/images.tar` (lab/cluster/image).
# With Docker/BuildKit, manifests/Dockerfile builds the same two images on distroless.
IMAGE_TAG ?= dev
image:
	$(GO) run ./lab/cluster/mkimage -tag $(IMAGE_TAG) -ldflags "$(LDFLAGS)" -o bin/images.tar

# The same two images on distroless, with a Docker engine (BuildKit).
image-docker:
	docker build -f manifests/Dockerfile --build-arg VERSION=$(VERSION) --target agent -t localhost/nodemesh-agent:$(IMAGE_TAG) .
	docker build -f manifests/Dockerfile --build-arg VERSION=$(VERSION) --target ca -t localhost/nodemesh-ca:$(IMAGE_TAG) .

lab-down: build
	./bin/nodemeshctl lab down

clean:
	rm -rf bin results
