#!/usr/bin/env bash
# Keyward on kind, for machines with Docker: a one-node cluster whose kube-apiserver encrypts Secrets
# through the KMS plugin running as a static pod, keys in a SoftHSM2 token, the operator from the chart.
#
#   hack/kind/keyward-kind.sh up     # build the images, make the cluster, turn encryption on
#   hack/kind/keyward-kind.sh down   # delete the cluster and its state folder (the token goes with it)
#
# Needs docker, kind, kubectl and helm on PATH (`make bootstrap` builds kubectl and helm; see
# `make -s env`). The steps are those of docs/install-kubeadm.md on a single node, where the order between
# apiservers does not matter. Not run by the test suite (no Docker on the CI machines).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${KEYWARD_KIND_CLUSTER:-keyward}"
STATE="${KEYWARD_KIND_STATE:-$PWD/.local/kind}"
VERSION="$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/keyward/Chart.yaml)"
PLUGIN_IMAGE="keyward/plugin:$VERSION"
OPERATOR_IMAGE="keyward/operator:$VERSION"
NODE="$CLUSTER-control-plane"
KEYWARD_UID=10001
PY="${PYTHON:-.venv/bin/python}"

log() { printf '[kind] %s\n' "$*" >&2; }
die() { printf '[kind] error: %s\n' "$*" >&2; exit 1; }

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (kubectl and helm: eval \"\$(make -s env)\" after make up, or add ~/.cache/keyward/bin/<versions> to PATH)"
  done
}

in_node() { docker exec "$NODE" "$@"; }

# Run the plugin image with the state folders mounted at the node paths the chart uses.
in_image() {
  docker run --rm -v "$STATE/etc-keyward:/etc/keyward" -v "$STATE/var-lib-keyward:/var/lib/keyward" \
    -e SOFTHSM2_CONF=/etc/keyward/softhsm2.conf -e KEYWARD_PIN_FILE=/etc/keyward/pin \
    -e KEYWARD_STORE_LOCK=/var/lib/keyward/store.lock "$@"
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local seconds="$1" what="$2"; shift 2
  for _ in $(seq "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "timed out after ${seconds}s waiting for $what"
}

up() {
  need docker kind kubectl helm
  [ -x "$PY" ] || die "$PY not found: run make bootstrap first"
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER" && die "kind cluster $CLUSTER exists; run: $0 down"

  log "building $PLUGIN_IMAGE and $OPERATOR_IMAGE"
  docker build -q -f images/Dockerfile --target plugin -t "$PLUGIN_IMAGE" . >/dev/null
  docker build -q -f images/Dockerfile --target operator -t "$OPERATOR_IMAGE" . >/dev/null

  log "making a SoftHSM2 token and the key 'secrets' in $STATE"
  mkdir -p "$STATE/etc-keyward" "$STATE/var-lib-keyward/softhsm/tokens"
  printf 'directories.tokendir = /var/lib/keyward/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' \
    > "$STATE/etc-keyward/softhsm2.conf"
  (umask 077; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/etc-keyward/pin")
  (umask 077; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/etc-keyward/so-pin")
  # softhsm2-util takes PINs only as arguments; this throwaway container is the only process that sees them.
  in_image --user 0 --entrypoint sh "$PLUGIN_IMAGE" -c '
    softhsm2-util --init-token --free --label keyward --pin "$(cat /etc/keyward/pin)" \
      --so-pin "$(cat /etc/keyward/so-pin)" >/dev/null &&
    rm /etc/keyward/so-pin &&
    chown -R '"$KEYWARD_UID:$KEYWARD_UID"' /var/lib/keyward /etc/keyward/pin && chmod 0400 /etc/keyward/pin'
  in_image "$PLUGIN_IMAGE" keys create secrets >/dev/null

  log "creating kind cluster $CLUSTER"
  sed "s|KEYWARD_KIND_STATE|$STATE|g" hack/kind/kind-config.yaml > "$STATE/kind-config.yaml"
  kind create cluster --name "$CLUSTER" --config "$STATE/kind-config.yaml"
  kind load docker-image --name "$CLUSTER" "$PLUGIN_IMAGE" "$OPERATOR_IMAGE"

  log "plugin: socket folder (kept across reboots by systemd-tmpfiles), then the static pod"
  in_node sh -c "echo 'd /run/keyward 0750 $KEYWARD_UID $KEYWARD_UID -' > /etc/tmpfiles.d/keyward.conf \
    && systemd-tmpfiles --create /etc/tmpfiles.d/keyward.conf"
  docker cp deploy/node/keyward-kms-plugin.yaml "$NODE:/etc/kubernetes/manifests/keyward-kms-plugin.yaml"
  wait_until 120 "the plugin's socket /run/keyward/kms.sock" in_node test -S /run/keyward/kms.sock

  log "kube-apiserver: the EncryptionConfiguration (encrypt step; one apiserver, so no read step) and its flags"
  in_node mkdir -p /etc/kubernetes/keyward
  docker cp deploy/node/encryption-config-2-encrypt.yaml "$NODE:/etc/kubernetes/keyward/encryption-config.yaml"
  in_node cat /etc/kubernetes/manifests/kube-apiserver.yaml | "$PY" hack/kubeadm_manifest.py > "$STATE/kube-apiserver.yaml"
  # Written next to the folder and moved in, so that the kubelet never reads half a file.
  docker cp "$STATE/kube-apiserver.yaml" "$NODE:/etc/kubernetes/kube-apiserver.yaml.new"
  in_node mv /etc/kubernetes/kube-apiserver.yaml.new /etc/kubernetes/manifests/kube-apiserver.yaml
  kubectl config use-context "kind-$CLUSTER" >/dev/null
  sleep 10  # the kubelet notices the new manifest and restarts the apiserver
  wait_until 180 "kube-apiserver ready with the KMS provider" kubectl get --raw '/readyz/kms-providers'

  log "operator: the chart, then the EncryptionKey the plugin serves"
  helm install keyward charts/keyward --namespace keyward --create-namespace
  kubectl apply -f deploy/examples/secrets-key.yaml
  kubectl wait --for=condition=Ready encryptionkey/secrets --timeout=180s

  log "re-encrypting the Secrets written before encryption was on"
  "$PY" -m keyward.cli.main reencrypt secrets
  wait_until 300 "the re-encryption to finish" \
    sh -c '[ "$(kubectl get encryptionkey secrets -o jsonpath={.status.reencryption.phase})" = Succeeded ]'

  kubectl create secret generic keyward-kind-check --from-literal=k=v >/dev/null
  prefix="$(in_node sh -c 'ETCDCTL_API=3 crictl exec $(crictl ps -q --name etcd) etcdctl \
      --cacert /etc/kubernetes/pki/etcd/ca.crt --cert /etc/kubernetes/pki/etcd/server.crt \
      --key /etc/kubernetes/pki/etcd/server.key get /registry/secrets/default/keyward-kind-check --print-value-only' \
      | head -c 23)"
  [ "$prefix" = "k8s:enc:kms:v2:keyward:" ] || die "etcd holds the Secret without the KMS prefix (got: $prefix)"
  log "done: Secrets are encrypted by the plugin (etcd value starts with $prefix); kubectl context kind-$CLUSTER"
}

down() {
  need kind
  kind delete cluster --name "$CLUSTER"
  # The token files belong to the image's user; remove them from a container that may.
  if [ -d "$STATE" ]; then
    docker run --rm --user 0 -v "$STATE:/state" --entrypoint sh "$PLUGIN_IMAGE" -c 'rm -rf /state/*' 2>/dev/null || true
    rm -rf "$STATE"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
