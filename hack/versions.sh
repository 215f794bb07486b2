# Pinned versions of the control-plane binaries and the cache they are built into. Sourced by hack/*.sh.
# kube-apiserver 1.36 supports etcd 3.5.11+ and 3.6; both build with the Go 1.26 toolchain on the machine.
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.17
HELM_VERSION=v4.3.2
KEYWARD_CACHE="${KEYWARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyward}"
KEYWARD_BIN="$KEYWARD_CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
export K8S_VERSION ETCD_VERSION HELM_VERSION KEYWARD_CACHE KEYWARD_BIN
