#!/usr/bin/env bash
# The README's first command: a local multi-node skiff cluster on this machine, a demo workload on
# it, and Service traffic shown flowing through the eBPF datapath. Needs root. Idempotent: a
# cluster already up in the data directory is reused.
#
#   SKIFF_DATA=/var/lib/skiff-up   where the cluster keeps everything (see skiff up --help)
#   SKIFF_NODES=3                  how many nodes (network namespaces, each with its own agent)
#   ./scripts/up.sh down           removes everything the cluster made (skiff down)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${SKIFF_DATA:-/var/lib/skiff-up}
NODES=${SKIFF_NODES:-3}
SKIFF=$PWD/target/release/skiff
say() { printf '\033[1m[up]\033[0m %s\n' "$*"; }

if [ "${1:-}" = down ]; then
  [ -x "$SKIFF" ] || { echo "no skiff binary at $SKIFF: nothing was brought up by this script" >&2; exit 0; }
  exec "$SKIFF" down --data-dir "$DATA"
fi

./scripts/setup.sh
say "building skiff, skiff-cni and skiff-shim (release)"
cargo build --release --locked -p skiff -p skiff-cni -p skiff-runtime --bins
say "building the demo image skiff/echo:1.0"
./scripts/build-image.sh target/images/skiff-echo-1.0.oci.tar
KUBECTL=/usr/lib/google-cloud-sdk/bin/kubectl.1.32
command -v kubectl.1.32 >/dev/null && KUBECTL=$(command -v kubectl.1.32)

say "bringing up $NODES nodes (data in $DATA)"
"$SKIFF" up --nodes "$NODES" --data-dir "$DATA" --image target/images/skiff-echo-1.0.oci.tar --keep-existing
export KUBECONFIG="$DATA/server/admin.kubeconfig"
K() { "$KUBECTL" --cache-dir "$DATA/kube-cache" "$@"; }
K get nodes -o wide

say "applying the demo workload (examples/demo.yaml): a Deployment of 3 and a Service"
K apply -f examples/demo.yaml
K rollout status deployment/echo -n demo --timeout=180s
K get pods -n demo -o wide
K get svc -n demo

say "Service traffic from a pod to the demo Service's ClusterIP, through eBPF"
"$SKIFF" demo --data-dir "$DATA"

cat <<MSG

skiff is up.
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get pods -A -o wide
  ./scripts/up.sh down       # removes every namespace, link, route, pin, cgroup and process it made
MSG
