#!/usr/bin/env bash
# Build kube-apiserver, kubectl, etcd and helm from their published Go modules, at pinned versions,
# into a version-keyed cache outside the work tree. A binary that is already cached is not rebuilt.
#
# Why wrapper modules: k8s.io/kubernetes' go.mod replaces every staging module with a local path, so
# `go install k8s.io/kubernetes/cmd/...@vX` fails. A throw-away module that requires k8s.io/kubernetes
# and points each staging module at its published version builds the real sources unchanged.
# etcd gets a wrapper of its own so minimal version selection never mixes it with kubernetes' etcd libs.
set -euo pipefail

source "$(dirname "$0")/versions.sh"

mkdir -p "$KEYWARD_BIN"
work="$KEYWARD_CACHE/build"
mkdir -p "$work"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0

log() { printf '[build] %s\n' "$*" >&2; }

have() { [ -x "$KEYWARD_BIN/$1" ]; }

build_kubernetes() {
  if have kube-apiserver && have kubectl; then return; fi
  local mod="$work/kubernetes-$K8S_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  local kdir
  kdir=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  local staging_ver="v0.${K8S_VERSION#v1.}"
  {
    echo "module keyward.local/k8sbuild"
    echo
    grep -E '^go [0-9]' "$kdir/go.mod"
    grep -E '^godebug ' "$kdir/go.mod" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # Every `k8s.io/<m> => ./staging/src/k8s.io/<m>` line becomes a replace with the published module.
    grep -E '=> \./staging/src/k8s.io/' "$kdir/go.mod" | awk -v v="$staging_ver" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package k8sbuild

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true)
  for cmd in kube-apiserver kubectl; do
    if have "$cmd"; then continue; fi
    log "building $cmd $K8S_VERSION (several minutes on two cores)"
    (cd "$mod" && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" -o "$KEYWARD_BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$KEYWARD_BIN/$cmd.tmp" "$KEYWARD_BIN/$cmd"
  done
}

build_etcd() {
  if have etcd; then return; fi
  local mod="$work/etcd-$ETCD_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  cat > "$mod/go.mod" <<GOMOD
module keyward.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package etcdbuild

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true)
  log "building etcd $ETCD_VERSION"
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$KEYWARD_BIN/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$KEYWARD_BIN/etcd.tmp" "$KEYWARD_BIN/etcd"
}

build_helm() {
  if have helm; then return; fi
  log "building helm $HELM_VERSION"
  GOBIN="$work/helm-gobin" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  mv "$work/helm-gobin/helm" "$KEYWARD_BIN/helm"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kubernetes helm)
for t in "${targets[@]}"; do
  case "$t" in
    etcd) build_etcd ;;
    kubernetes) build_kubernetes ;;
    helm) build_helm ;;
    *) echo "unknown target $t (etcd, kubernetes, helm)" >&2; exit 2 ;;
  esac
done
log "binaries ready in $KEYWARD_BIN"
